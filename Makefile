# tide: `make run` / `make test` set up .venv on first use; `make test` also installs the
# system packages the tests use (scripts/system-packages.sh).
#
# torch is installed first and pinned to the local CPU wheel: letting pip resolve
# torch from the project's range could pull a newer multi-GB CUDA build.
# EXTRAS selects the optional dependency groups (add `kernels` for Triton, ~1 GB).

PYTHON ?= python3
VENV   := .venv
TORCH  ?= torch==2.13.0
EXTRAS ?= test
comma  := ,
STAMP  := $(VENV)/.tide-installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: venv system-packages test run run-single bench clean-venv

venv: $(STAMP)

# System packages the tests use (Prometheus and promtool): installed with apt-get (sudo when
# not root) if missing; a clear error naming the package where that is not possible.
system-packages:
	bash scripts/system-packages.sh

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install '$(TORCH)'
	$(VENV)/bin/pip install -e '.[$(EXTRAS)]'
	touch $@

test: venv system-packages
	$(VENV)/bin/python -m pytest -q tests

run: venv
	$(VENV)/bin/tide train configs/pipeline.yaml --then-serve

run-single: venv
	$(VENV)/bin/tide train configs/debug.yaml

bench: venv
	$(VENV)/bin/python bench/bench_model.py

clean-venv:
	rm -rf $(VENV)
