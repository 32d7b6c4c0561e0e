# The two commands: `make demo` and `make test`. Both set themselves up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build by default (it lies on this machine's disk). CUDA users: make test TORCH_SPEC="torch==2.13.0 --index-url ..."
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,zarr,napari,export

.PHONY: setup test demo lint bench bench-gpu clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

setup: $(VENV)/.installed

test: setup
	OMP_NUM_THREADS=2 $(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

demo: setup
	OMP_NUM_THREADS=2 $(VENV)/bin/embseg demo --output demo_output

bench: setup
	OMP_NUM_THREADS=2 $(PY) benchmarks/run.py $(BENCH_ARGS)

# GPU figures (training memory, 3D voxels/s) on the CUDA device: benchmarks/gpu.py
bench-gpu: setup
	$(PY) benchmarks/gpu.py $(GPU_ARGS)

clean:
	rm -rf $(VENV) demo_output .pytest_cache
