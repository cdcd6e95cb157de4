# Sourced by gpu_check.sh and gpu_train.sh on the device machine: checks that every package diffprobe
# needs imports; where one does not and .gpu/wheels (benchmarks/gpu_prepare.sh) is carried, installs
# those into /tmp and puts them on PYTHONPATH (the image is bare after each lease, and a machine that
# has them, this one with tests side by side, never rewrites a shared folder); points
# DIFFPROBE_SHARED at the carried .gpu/shared. Exit 2 when a package is still missing.
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD
check="import torch, torchvision, diffusers, timm, transformers as t; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'timm', timm.__version__, 'transformers', t.__version__)"
if ! versions=$($PY -c "$check" 2>/dev/null); then
    if ls .gpu/wheels/*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-site .gpu/wheels/*.whl || exit 1
        export PYTHONPATH=$PWD:/tmp/gpu-site
    fi
    versions=$($PY -c "$check") || { echo "a package is missing: run benchmarks/gpu_prepare.sh where pip works and carry .gpu"; exit 2; }
fi
echo "$versions"
if [ -z "${DIFFPROBE_SHARED:-}" ] && [ -d .gpu/shared ]; then export DIFFPROBE_SHARED=$PWD/.gpu/shared; fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
