"""demo.sh: the shell parses, and its closing table reads the reports evaluate.py writes."""
import json
import os
import re
import subprocess
import sys

from conftest import ROOT

DEMO = open(os.path.join(ROOT, "demo.sh")).read()


def test_demo_script_parses():
    subprocess.run(["bash", "-n", os.path.join(ROOT, "demo.sh")], check=True)


def _report(path, taus, speedup):
    tasks = {name: {"tau": tau} for name, tau in taus.items()}
    overall = {"tau": sum(taus.values()) / len(taus) - 0.01, "accept_rate_conditional": [0.5, 0.25, None, None],
               "tokens_per_s": 10.0 * speedup, "baseline_tokens_per_s": 10.0, "speedup": speedup}
    path.write_text(json.dumps({"config": {}, "tasks": tasks, "overall": overall}))


def test_demo_table(tmp_path):
    table = re.search(r"<<'PY'\n(.*?)\nPY\n", DEMO, re.S).group(1)
    for d in ("dspark", "dflash", "eagle3"):
        for suffix, speedup in (("", 0.5), ("_t1", 1.25)):
            _report(tmp_path / f"{d}{suffix}.json", {"gsm8k": 1.5, "humaneval": 1.1}, speedup)
    out = subprocess.run([sys.executable, "-c", table, str(tmp_path)], capture_output=True, text=True,
                         check=True).stdout
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["dspark"], ["dflash"], ["eagle3"])]
    assert len(rows) == 6 and "shipped" not in out  # no shipped.json: no shipped row
    assert all(r[3] == "1.30" for r in rows)  # macro = mean of the task taus, not the overall tau
    slow = [line for line in out.splitlines() if "slower than plain decoding" in line]
    assert len(slow) == 3 and all(" 0 " in line for line in slow)  # exactly the speedup < 1 rows say so
    _report(tmp_path / "shipped.json", {"gsm8k": 2.0, "humaneval": 1.5}, 1.2)
    out = subprocess.run([sys.executable, "-c", table, str(tmp_path)], capture_output=True, text=True,
                         check=True).stdout
    assert re.search(r"^shipped\s+0\s+\S+\s+1\.75\s", out, re.M)
