# Two entry points: `make demo` (the whole data-free distillation on scikit-learn's digits) and `make test`.
# Each installs the environment on first use through tools/install.sh.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_ARGS ?=

.PHONY: install demo test lint mutants

install:
	bash tools/install.sh

demo: install
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) scripts/digits_demo.py $(DEMO_ARGS)

lint: install
	$(VENV)/bin/ruff check .

# One BLAS/OpenMP thread per process: tests start mpiexec ranks beside pytest, and oversubscribed threads made
# tiny models 10-100x slower on 2 cores. Two pytest workers (pytest-xdist), one per core of the CI machine:
# 8.7 minutes instead of 13.7 there.
test: lint
	OMP_NUM_THREADS=1 PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m pytest -q -n 2 tests

# Mutation testing of the core (mutmut; outside CI, it takes hours on 2 cores): report in
# experiments/mutants/report.md, read in docs/TESTING.md. MUTANTS='evaluations.metrics*' narrows it.
mutants: install
	bash tools/mutants.sh $(MUTANTS)
