# detlab: `make demo` runs the main job on built-in data; `make test` runs the test suite.
# Both create .venv and install from pyproject.toml + constraints.txt when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all test-fast bench ui data clean-results help hooks

help:
	@echo "make demo   - Table 2 at profile demo on a local Ray + MLflow (sqlite), then the table"
	@echo "make test   - the test suite but the heavy end-to-end scenarios (what CI runs, ~12 min on 2 cores)"
	@echo "make test-all - every test, the heavy scenarios too (~55 min on 2 cores)"
	@echo "make test-fast - the inner loop, under a minute: every test under half a second (-m 'not slow and not medium')"
	@echo "make bench  - benchmarks (ratios measured in one process)"
	@echo "make ui     - MLflow UI on 127.0.0.1 over the local store"
	@echo "make data   - prepare the built-in datasets (shapes, trees)"

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@echo "installing detlab and its pins into $(VENV) (torch, ray, mlflow: about 3 minutes, 6.7 GB)"
	$(PY) -m pip install -e '.[dev]' -c constraints.txt
	touch $(STAMP)

# git hooks keep .detlab-source.json current: the commit of runs whose code travelled without .git
# (`ray job submit --working-dir .`); see lab/records/provenance.py
hooks:
	@$(PYTHON) lab/records/provenance.py --install-hooks

demo: $(STAMP) hooks
	$(PY) jobs/table2.py --profile demo

# CI must finish within 30 minutes on 2 cores: the tests marked heavy (cluster e2e, node loss, driver
# kills, outages mid-run; each over a minute) run with `make test-all`
# Two pytest processes at once: the tests that start Ray (slow but not server; heavy too in test-all), one
# at a time, beside all the others (those marked server start only moto S3 or mlflow, never Ray). Run
# alone, the suite kept 2 cores 59 % busy: it waits on the processes it starts. No two Ray clusters ever
# run at once. The Ray tests are the longer chain, so the others run under `nice`: they take the cores
# the Ray tests leave idle instead of slowing them. The first one's output follows the second's.
SLOW_LOG := $(VENV)/.tests-that-start-ray.log
define two_pytests
	@echo "running the tests marked $(1) in the background (output: $(SLOW_LOG), shown at the end)"
	@$(PY) -m pytest -q -p no:cacheprovider -m "$(1)" > $(SLOW_LOG) 2>&1 & ray=$$!; \
	nice -n 10 $(PY) -m pytest -q -m "$(2)"; rest=$$?; \
	wait $$ray; rc=$$?; echo "=== the tests marked $(1) ==="; cat $(SLOW_LOG); \
	echo "=== exit: $(2): $$rest, $(1): $$rc ==="; test $$rest -eq 0 -a $$rc -eq 0
endef

test: $(STAMP) hooks
	$(call two_pytests,slow and not server and not heavy,(not slow or server) and not heavy)

test-all: $(STAMP) hooks
	$(call two_pytests,(slow or heavy) and not server,not (slow or heavy) or server)

# the inner loop: everything but the tests marked slow (they start Ray or a server) or medium (over half a
# second: they train or run a subprocess); `make test` runs those too
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not medium"

bench: $(STAMP)
	$(PY) bench/bench_nms.py
	$(PY) bench/bench_train_step.py
	$(PY) bench/bench_recipe.py
	$(PY) bench/bench_gfl.py
	$(PY) bench/bench_eval.py
	$(PY) bench/bench_scaling.py
	$(PY) bench/bench_sweep.py
	$(PY) bench/bench_determinism.py

ui: $(STAMP)
	$(VENV)/bin/detlab ui

data: $(STAMP)
	$(VENV)/bin/detlab data shapes --profile demo
	$(VENV)/bin/detlab data trees --profile demo

clean-results:
	rm -rf results mlruns

# GPU acceptance check on a CUDA machine (<= 8 min; one CHECK line each). GPU_CHECK_ARGS=--cpu-dry-run
# runs the same code paths on CPU.
.PHONY: gpu-check
gpu-check: $(STAMP)
	bash bench/gpu_check.sh $(GPU_CHECK_ARGS)
