# A newcomer's two commands: `make demo` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo lint clean

setup: $(STAMP)
	$(PY) scripts/build_ext.py

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q

demo: setup
	$(PY) scripts/model_table.py
	$(PY) scripts/bench_lip.py

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf build
