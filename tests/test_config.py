"""configurator.py: literals < config file < command line, and every bad input named clearly."""
import os

import pytest
import torch

import configurator
from configurator import configure


def defaults():
    return dict(target="smollm2", learning_rate=6e-4, max_steps=100, compile=False, layer_ids=None,
                sizes=[1, 2], _private=3)


@pytest.fixture(autouse=True)
def other_script(tmp_path, monkeypatch):
    """A fake sibling script declaring `task`, so keys of other scripts are known."""
    (tmp_path / "evaluate.py").write_text("import os\ntask = 'gsm8k'\nnum_prompts = 5\nconfig = configure(globals())\nlate = 1\n")
    monkeypatch.setattr(configurator, "HERE", str(tmp_path))


def run(argv, d=None):
    d = defaults() if d is None else d
    return configure(d, argv, verbose=False), d


def test_precedence_and_forms(tmp_path):
    """Config file overrides literals; --k=v and --k v override the file; values may contain '='."""
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text("max_steps = 7\ntarget = 'tiny-qwen3'\ntask = 'mbpp'\n")
    cfg, d = run([str(cfg_file), "--max_steps", "9", "--target=a=b", "--compile"])
    assert cfg["max_steps"] == 9 and d["max_steps"] == 9
    assert cfg["target"] == "a=b" and cfg["compile"] is True
    assert "task" not in cfg and "_private" not in cfg   # another script's key: accepted, ignored here


def test_int_for_float_and_lists():
    """Integers are accepted for float keys; lists parse as literals; None keys take any literal."""
    cfg, _ = run(["--learning_rate=1", "--sizes=[3,4]", "--layer_ids=[0,2]"])
    assert cfg["learning_rate"] == 1.0 and type(cfg["learning_rate"]) is float
    assert cfg["sizes"] == [3, 4] and cfg["layer_ids"] == [0, 2]


def test_unknown_key_names_close_matches():
    """A key no script declares fails and suggests the close matches."""
    with pytest.raises(SystemExit, match="unknown key 'lerning_rate'.*learning_rate"):
        run(["--lerning_rate=1e-3"])


def test_unknown_key_in_config_file(tmp_path):
    """The same check applies to config files, naming the file."""
    f = tmp_path / "bad.py"
    f.write_text("max_stepz = 3\n")
    with pytest.raises(SystemExit, match="unknown key 'max_stepz'.*bad.py.*max_steps"):
        run([str(f)])


def test_wrong_type():
    """A float for an int key is refused with the expected type."""
    with pytest.raises(SystemExit, match="'max_steps' expects int"):
        run(["--max_steps=1.5"])


def test_malformed_value():
    """Text that is no literal, for a non-string key, is refused."""
    with pytest.raises(SystemExit, match="malformed value for 'sizes'"):
        run(["--sizes=[1,"])


def test_bool_parsing_and_missing_value():
    """Booleans accept true/false; a non-bool flag without a value is an error."""
    cfg, _ = run(["--compile=false"])
    assert cfg["compile"] is False
    with pytest.raises(SystemExit, match="--max_steps needs a value"):
        run(["--max_steps"])


def test_keys_after_configure_call_are_not_config(tmp_path):
    """Only literals before configure() are keys: `late` is unknown."""
    with pytest.raises(SystemExit, match="unknown key 'late'"):
        run(["--late=2"])
    with pytest.raises(SystemExit, match="config file"):
        run(["not_a_config.txt"])


def test_no_config_key_means_two_things(monkeypatch):
    """The real scripts' namespaces: a key declared by several scripts is a SHARED_KEYS key (one meaning), and no two
    keys are a short suffix apart. Power: the old traps (build_cache's num_prompts beside evaluate's, evaluate's
    draft beside train's drafter) are reported."""
    import os
    monkeypatch.setattr(configurator, "HERE", os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    real = {s: configurator.script_defaults(os.path.join(configurator.HERE, s)) for s in configurator.SCRIPTS}
    assert configurator.collisions(real) == []
    old = {**real, "build_cache.py": {**real["build_cache.py"], "num_prompts": 256}}
    old["evaluate.py"] = {**real["evaluate.py"], "num_prompts": 0, "draft": ""}
    problems = configurator.collisions(old)
    assert any(p.startswith("num_prompts is declared by build_cache.py, evaluate.py") for p in problems)
    assert any(p.startswith("draft (evaluate.py) and drafter (train.py)") for p in problems)


def test_atomic_path_files_are_readable_like_open(tmp_path):
    """A file written through atomic_path gets the mode open() gives (0666 & ~umask), even when the writer made it
    private: safetensors' save_file creates 0600 files, which a serving engine under another user could not read."""
    from safetensors.torch import save_file

    from configurator import atomic_path
    with open(tmp_path / "plain", "w"):
        pass
    want = os.stat(tmp_path / "plain").st_mode & 0o777
    with atomic_path(str(tmp_path / "w.safetensors")) as tmp:
        save_file({"x": torch.zeros(1)}, tmp)
        assert os.stat(tmp).st_mode & 0o777 == 0o600  # the writer's own mode: the guard below has work to do
    assert os.stat(tmp_path / "w.safetensors").st_mode & 0o777 == want
