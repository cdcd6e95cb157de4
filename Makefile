# Set-up is part of every target: the first run creates .venv and installs diffprobe into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
SHARED_CIFAR := ../shared/data/cifar10-train.tar.gz
DEMO_OUT ?= runs/demo-features

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

# The main job, offline. Until diffprobe ships its own pre-trained checkpoint, it runs the
# paper's extraction step on real CIFAR-10 with a small ADM-format checkpoint of RANDOM weights.
demo: $(STAMP)
	@echo "diffprobe demo: ADM-format checkpoint with random weights (../shared/fixtures/adm), real CIFAR-10 images"
	$(BIN)/diffprobe blocks adm:../shared/fixtures/adm/adm_uncond_tiny.pt
	$(BIN)/diffprobe extract adm:../shared/fixtures/adm/adm_uncond_tiny.pt $(DEMO_DATA) --limit 2000 \
		--blocks 13,16,19 --t 30,90,150 --pool 1,2 --out $(DEMO_OUT)
	$(BIN)/diffprobe store $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/extract.py

clean:
	rm -rf $(VENV) runs .pytest_cache
