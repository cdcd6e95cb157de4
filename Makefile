# Set-up is part of every target: the first run creates .venv and installs diffprobe into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
SHARED_CIFAR := ../shared/data/cifar10-train.tar.gz
DEMO_OUT ?= runs/demo
DEMO_MODEL := adm:../shared/fixtures/adm/adm_uncond_tiny.pt

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
# paper's pipeline on real CIFAR-10 with a small ADM-format checkpoint of RANDOM weights:
# extraction, a block × timestep × pool sweep with controls, linear and attention heads on the
# best setting, and a prediction from the saved run.
demo: $(STAMP)
	@echo "diffprobe demo: ADM-format checkpoint with random weights (../shared/fixtures/adm), real CIFAR-10 images"
	$(BIN)/diffprobe blocks $(DEMO_MODEL)
	$(BIN)/diffprobe sweep $(DEMO_MODEL) $(DEMO_DATA) --limit 2000 --blocks 3,8,13,18,23 --t 10,90,300 \
		--pool 1,2 --head linear --head attention --head-epochs 15 --out $(DEMO_OUT)
	@# An image to classify with the saved run: one CIFAR-10 ship from the archive.
	if [ -f $(SHARED_CIFAR) ]; then \
		$(BIN)/python -c "import tarfile,sys; t=tarfile.open(sys.argv[1]); open(sys.argv[2],'wb').write(t.extractfile('cifar10/train/ship/0000.jpg').read())" $(SHARED_CIFAR) $(DEMO_OUT)/example-ship.jpg && \
		$(BIN)/diffprobe predict $(DEMO_OUT)/head-linear $(DEMO_OUT)/example-ship.jpg --top-k 3; fi

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/extract.py

clean:
	rm -rf $(VENV) runs .pytest_cache
