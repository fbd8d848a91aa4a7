# Two commands set everything up on a fresh machine:
#   make demo   create .venv if missing, install, build the emoji corpus, pre-train on CPU, evaluate, report
#               (runs/demo/report.html); re-running reuses the corpus and the checkpoints
#   make test   create .venv if missing, install, run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install test test-all demo smoke toy-data bench clean-runs

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -m '' $(PYTEST_ARGS)

data/toy/shards/manifest.json:
	$(MAKE) install
	$(PY) scripts/make_toy_images.py --out data/toy --count 500
	$(VENV)/bin/mmpretrain shards make --images data/toy --captions data/toy/captions.csv --out data/toy/shards --max-count 100

toy-data: data/toy/shards/manifest.json

demo: $(STAMP)
	$(PY) scripts/demo.py

smoke: $(STAMP) toy-data
	$(VENV)/bin/mmpretrain train configs/experiment/smoke.yaml train.resume=latest
	$(PY) scripts/summarize_run.py runs/smoke

bench: $(STAMP) toy-data
	$(PY) benchmarks/train_throughput.py

clean-runs:
	rm -rf runs
