# Two entry points do all set-up on a fresh machine:
#   make demo   - run the main job (an agent task) on embedded defaults
#   make test   - install everything and run the test suite
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench-prefill train-demo clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# Pin torch first: the local CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m runtime.cli run "What is 17 times 23? Remember the result."

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

# Train the demo agent model (resumable: run again to continue), then score it on 100 held-out tasks
# through the whole runtime.
train-demo: $(STAMP)
	$(PY) -m model_worker.training --out .engram/demo-train
	$(PY) -m runtime.evaluation --model .engram/demo-train

bench-prefill: $(STAMP)
	$(PY) benchmarks/prefill.py --quick

clean:
	rm -rf $(VENV) .pytest_cache
