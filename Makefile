# A newcomer's two commands: `make demo` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test quick demo lint clean

setup: $(STAMP)
	$(PY) scripts/build_ext.py

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q

# Under a minute on 2 cores: everything but subprocess/training/torchrun runs and the SLURM cluster.
quick: setup
	$(PY) -m pytest -q -m "not slow and not slurm"

DEMO := demo_out

# The main job on a CPU: a small JPEG dataset, a tiny LIP-ResNet trained and evaluated; the eval JSON line last.
demo: setup
	$(PY) scripts/make_demo_data.py --out $(DEMO)/data --classes 6 --train-per-class 100 --val-per-class 40 --seed 0
	rm -rf $(DEMO)/run
	$(PY) train.py --config configs/demo.yaml output_dir=$(DEMO)/run data.root=$(DEMO)/data
	@echo "view the run:  $(VENV)/bin/tensorboard --logdir $(DEMO)/run/tb"
	$(PY) eval.py --config configs/demo.yaml --checkpoint $(DEMO)/run/checkpoints/last.pth \
		output_dir=$(DEMO)/run data.root=$(DEMO)/data

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf build $(DEMO)
