# Two commands on a fresh machine: `make train` and `make test`. Both create .venv first.
VENV ?= .venv
CUDA_VENV ?= .venv-cuda
PY := $(VENV)/bin/python
NPROC ?= 2
ARGS ?=

.PHONY: install train test benchmark benchmark-dsl gpu-check gpu-check-cpu

$(VENV)/.installed: pyproject.toml requirements-common.txt requirements-cpu.txt \
		requirements-cpu-nodeps.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-cpu.txt
	$(PY) -m pip install -q --no-deps -r requirements-cpu-nodeps.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

install: $(VENV)/.installed

# Trains BPR-MF on the bundled lastfm data with $(NPROC) ranks; extra Hydra overrides in ARGS.
train: install
	$(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) -m dsl_dist.train $(ARGS)

test: install
	$(PY) -m pytest -q

benchmark: install
	$(PY) benchmarks/train_benchmark.py mf_gowalla_dense +experiment=mf_gowalla $(ARGS)

benchmark-dsl: install
	$(PY) benchmarks/train_benchmark.py mf_gowalla_dsl_d0.2 +experiment=mf_gowalla_dsl sparsity.density=0.2 $(ARGS)
	$(PY) benchmarks/train_benchmark.py mf_gowalla_dsl_d0.1 +experiment=mf_gowalla_dsl sparsity.density=0.1 $(ARGS)
	$(PY) benchmarks/dsl_vs_dense.py

# The CUDA path in one command on a GPU machine (benchmarks/gpu_check.py): its own environment
# with requirements-cuda.txt and this package (with its test extra, for pytest), nothing else;
# writes benchmarks/results/gpu_check.json.
$(CUDA_VENV)/.installed: pyproject.toml requirements-common.txt requirements-cuda.txt
	python3 -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/python -m pip install -q -r requirements-cuda.txt
	$(CUDA_VENV)/bin/python -m pip install -q -e '.[test]'
	touch $@

gpu-check: $(CUDA_VENV)/.installed
	$(CUDA_VENV)/bin/python benchmarks/gpu_check.py $(ARGS)

# The same steps on CPU, tiny (what CI runs through tests/test_gpu_check.py).
gpu-check-cpu: install
	$(PY) benchmarks/gpu_check.py --cpu --out runs/gpu_check_cpu.json
