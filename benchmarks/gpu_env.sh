# Sourced by gpu_check.sh and gpu_train.sh on the device machine: the carried packages of .gpu/wheels
# (benchmarks/gpu_prepare.sh) installed into /tmp and on PYTHONPATH, DIFFPROBE_SHARED pointed at the
# carried .gpu/shared, and a check that every package diffprobe needs imports (exit 2 if not).
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
pythonpath=$PWD
# Installed outside the image (bare after each lease), and only where diffusers is missing: a machine
# that has it (this one, tests running side by side) keeps its own and never rewrites a shared folder.
if ! $PY -c "import diffusers" >/dev/null 2>&1 && ls .gpu/wheels/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-site .gpu/wheels/*.whl || exit 1
    pythonpath=$PWD:/tmp/gpu-site
fi
export PYTHONPATH=$pythonpath
if [ -z "${DIFFPROBE_SHARED:-}" ] && [ -d .gpu/shared ]; then export DIFFPROBE_SHARED=$PWD/.gpu/shared; fi
$PY -c "import torch, torchvision, diffusers, timm, transformers as t; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'timm', timm.__version__, 'transformers', t.__version__)" \
    || { echo "a package is missing: run benchmarks/gpu_prepare.sh where pip works and carry .gpu"; exit 2; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
