# Set-up is part of every target: the first run creates .venv and installs diffprobe into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
SHARED_CIFAR := ../shared/data/cifar10-train.tar.gz
DEMO_OUT ?= runs/demo

ifneq ($(wildcard $(SHARED_CIFAR)),)
DEMO_DATA := --data $(SHARED_CIFAR)
else
DEMO_DATA := --data torchvision:CIFAR10 --download
endif

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The main job, offline: the paper's pipeline on real CIFAR-10 with diffprobe's shipped checkpoint
# (checkpoints/diffprobe-cifar10): block × timestep × pool sweep, controls (pixels, random weights),
# linear, MLP, attention and fusion heads on the best block's map, a DDIM sample grid, REPORT.md; then a prediction
# with the saved MLP head.
demo: $(STAMP)
	$(BIN)/diffprobe demo $(DEMO_DATA) --out $(DEMO_OUT)
	@# An image to classify with the saved run: a CIFAR-10 ship from the validation split (held out of pre-training).
	if [ -f $(SHARED_CIFAR) ]; then \
		$(BIN)/python -c "import tarfile,sys; t=tarfile.open(sys.argv[1]); open(sys.argv[2],'wb').write(t.extractfile('cifar10/train/ship/0015.jpg').read())" $(SHARED_CIFAR) $(DEMO_OUT)/example-ship.jpg && \
		$(BIN)/diffprobe predict $(DEMO_OUT)/heads/mlp $(DEMO_OUT)/example-ship.jpg --top-k 3; fi
	@echo "report: $(DEMO_OUT)/REPORT.md"

test: $(STAMP)
	$(BIN)/python -m pytest

# Extraction, pre-training, online, latent and end-to-end pipeline benchmarks, each diffprobe's path against a plain reference
# in the same run, in what this machine runs fast (bf16 variants only where bf16 is native); ≤ 5 minutes
# on 2 cores. BENCH_ARGS go to every benchmark: --as-no-fast-bf16 (the AVX2-only path), --bf16-variants.
BENCH_ARGS ?=
bench: $(STAMP)
	$(BIN)/python benchmarks/all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
