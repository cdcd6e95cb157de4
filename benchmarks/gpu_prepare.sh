#!/usr/bin/env bash
# Run HERE, before a GPU window: gathers in .gpu/ (git-ignored) what the device machine lacks, to be
# carried with the command:
#   bash benchmarks/gpu_prepare.sh
#   device run: command "bash benchmarks/gpu_check.sh", carry [".gpu"]
# - .gpu/wheels: diffusers at the version installed here. The H200 image holds torch, torchvision,
#   timm, transformers, safetensors, scikit-learn and matplotlib, but not diffusers; gpu_check.sh
#   installs what is here into /tmp and puts it on PYTHONPATH.
# - .gpu/shared: the ADM fixture (parity, torchrun) and the CIFAR-10 archive (gpu_train.sh), since
#   ../shared beside the checkout does not travel; gpu_check.sh points DIFFPROBE_SHARED at it.
# The tree and what is carried must stay under 64 MiB together: this adds about 34 MB.
set -eu
PY=${PYTHON:-.venv/bin/python}
SHARED=${DIFFPROBE_SHARED:-../shared}
case "$(realpath "$SHARED")" in "$(realpath .)/.gpu"*) echo "DIFFPROBE_SHARED points into .gpu, which this script remakes: unset it"; exit 1;; esac
rm -rf .gpu
mkdir -p .gpu/wheels .gpu/shared/fixtures .gpu/shared/data
version=$($PY -c "import diffusers; print(diffusers.__version__)")
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 \
    -d .gpu/wheels "diffusers==$version"
cp -r "$SHARED/fixtures/adm" .gpu/shared/fixtures/
cp "$SHARED/data/cifar10-train.tar.gz" .gpu/shared/data/
chmod -R u+w .gpu
echo "carry .gpu ($(du -sh .gpu | cut -f1)); the checkout's tracked files: $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) bytes"
