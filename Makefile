# Two commands on a fresh machine: `make train` and `make test`. Both create .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
NPROC ?= 2
ARGS ?=

.PHONY: install train test benchmark benchmark-dsl wheelhouse gpu-check gpu-check-cpu

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
# `dsl-dist train` validates and prepares once, then starts the ranks as torchrun does.
train: install
	$(VENV)/bin/dsl-dist train --nproc $(NPROC) $(ARGS)

test: install
	$(PY) -m pytest -q

benchmark: install
	$(PY) benchmarks/train_benchmark.py mf_gowalla_dense +experiment=mf_gowalla $(ARGS)

benchmark-dsl: install
	$(PY) benchmarks/train_benchmark.py mf_gowalla_dsl_d0.2 +experiment=mf_gowalla_dsl sparsity.density=0.2 $(ARGS)
	$(PY) benchmarks/train_benchmark.py mf_gowalla_dsl_d0.1 +experiment=mf_gowalla_dsl sparsity.density=0.1 $(ARGS)
	$(PY) benchmarks/dsl_vs_dense.py

# GPU machines, often without internet and with their own torch (docs/gpu.md). On a networked
# machine, `make wheelhouse GPU_TORCH=2.11 GPU_PY=3.12` downloads into $(WHEELHOUSE) the CUDA
# fbgemm-gpu and torchrec released for that torch and the small packages such images lack; on
# the GPU machine, `make gpu-check` installs them from there with no index (when the folder is
# there; else the packages already installed are used) beside the image's torch, and runs
# benchmarks/gpu_check.py, which refuses a torch / fbgemm-gpu / torchrec set that does not fit.
WHEELHOUSE ?= wheelhouse
GPU_SITE ?= .gpu-site
GPU_PYTHON ?= python3
GPU_TORCH ?= 2.13
GPU_PY ?= 3.12

wheelhouse:
	$(GPU_PYTHON) benchmarks/gpu_env.py wheelhouse --torch $(GPU_TORCH) --python $(GPU_PY) \
		--out $(WHEELHOUSE)

gpu-check:
	if [ -d $(WHEELHOUSE) ]; then $(GPU_PYTHON) benchmarks/gpu_env.py install \
		--wheelhouse $(WHEELHOUSE) --target $(GPU_SITE); fi
	PYTHONPATH=$(GPU_SITE):$(CURDIR) $(GPU_PYTHON) benchmarks/gpu_check.py $(ARGS)

# The same steps on CPU, tiny (what CI runs through tests/test_gpu_check.py).
gpu-check-cpu: install
	$(PY) benchmarks/gpu_check.py --cpu --out runs/gpu_check_cpu.json
