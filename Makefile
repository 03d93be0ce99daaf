# The two set-up commands of the README (`make run`, `make test`) and their helpers.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
# Rules call the `flashnet` command: the virtualenv's bin folder comes first on PATH.
export PATH := $(abspath $(VENV))/bin:$(PATH)
# pytest exits 5 when a selection holds no test: not a failure here.
PYTEST := $(PYTHON) -m pytest
ALLOW_EMPTY := || [ $$? -eq 5 ]

.PHONY: run status test test-fast test-e2e install

run: $(INSTALLED)  ## the whole pipeline on the generated sample data, locally, on the CPU
	snakemake --profile profiles/local
	@echo "report: $$(pwd)/results/report/report.html (and results/report/summary.md)"

status: $(INSTALLED)  ## where each run stands; CONFIG=my.yaml for the runs of another --configfile
	flashnet status $(if $(CONFIG),--configfile $(CONFIG))

test: $(INSTALLED)  ## what CI runs: the fast suite, then the end-to-end group (needs root)
	tests/e2e/cluster/system-deps.sh
	$(PYTEST) -m "not e2e" $(ALLOW_EMPTY)
	FLASHNET_REQUIRE_SLURM=1 FLASHNET_REQUIRE_BROWSER=1 $(PYTEST) -m e2e $(ALLOW_EMPTY)

test-fast: $(INSTALLED)  ## the fast suite alone
	$(PYTEST) -m "not e2e" $(ALLOW_EMPTY)

test-e2e: $(INSTALLED)  ## the end-to-end group alone (real SLURM daemons; needs root)
	FLASHNET_REQUIRE_SLURM=1 FLASHNET_REQUIRE_BROWSER=1 $(PYTEST) -m e2e $(ALLOW_EMPTY)

install: $(INSTALLED)

# Exact pins (constraints.txt) keep pip on the local torch build instead of the newest CUDA one.
$(INSTALLED): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@
