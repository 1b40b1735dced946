# The README's two commands are `make run` and `make test`; both set everything up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: setup build run test test-fast bench bench-quick cuda-check clean

$(VENV)/.installed: requirements-ci.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-ci.txt
	touch $@

setup: $(VENV)/.installed  ## virtual environment with pinned requirements

SOURCES := setup.py pyproject.toml $(shell find csrc -name "*.cpp" -o -name "*.h" -o -name "*.cu" -o -name "*.cuh")

$(VENV)/.built: $(VENV)/.installed $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

build: $(VENV)/.built  ## compile biasfast._C and install biasfast in editable mode (again only when sources change)

run: build  ## the main job on the embedded default data
	$(VENV)/bin/biasfast run

test: build  ## the full test suite (Triton kernels run under the interpreter when there is no GPU)
	$(PY) -m pytest tests

bench: build  ## the benchmark suites, full sizes (see benchmarks/RESULTS.md)
	$(PY) -m pytest benchmarks --benchmark-group-by=group --benchmark-columns=min,median,mean,rounds

bench-quick: build  ## every benchmark once, on small shapes, so the suites cannot rot
	BIASFAST_BENCH_QUICK=1 $(PY) -m pytest benchmarks -q --benchmark-disable

cuda-check: setup  ## compile every csrc/cuda/*.cu with nvcc (a compile check; nothing runs)
	$(PY) tools/cuda_compile_check.py

clean:
	rm -rf build *.egg-info biasfast/_C*.so
