#!/usr/bin/env bash
# One GPU session: fixture parity on CUDA (fp32 with TF32 off; bf16/fp16 by cosine), then the
# extraction benchmark at the paper model's size (256×256, 256 channels, random weights).
#   FIXTURE=path/to/fixtures/adm DEVICE=cuda BATCH=64 bash benchmarks/gpu_check.sh
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
FIXTURE=${FIXTURE:-../shared/fixtures/adm}
DEVICE=${DEVICE:-cuda}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
${PYTHON:-python3} - "$FIXTURE" "$DEVICE" <<'PY'
import sys
import torch
from safetensors.torch import load_file
import diffprobe
from diffprobe.precision import Compute
fixture, dev = sys.argv[1], sys.argv[2]
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
exp = load_file(f"{fixture}/adm_uncond_tiny.expected.safetensors")
x, t = exp["x_t"].to(dev), exp["t"].to(dev)
bb = diffprobe.load_backbone(f"adm:{fixture}/adm_uncond_tiny.pt", device=dev)
with torch.inference_mode():
    f = bb.forward_features(x, t, "all")
    out = bb.model(x, t)
err = max((f[b].cpu() - exp[f"block_{b:02d}"]).abs().max().item() for b in f)
print(f"{dev} fp32 fixture parity: max block error {err:.3g}, out error {(out.cpu() - exp['out']).abs().max().item():.3g}")
for prec in ("bf16", "fp16") if dev.startswith("cuda") else ("bf16",):
    c = Compute(torch.device(dev), prec, True)
    m = c.prepare(diffprobe.load_backbone(f"adm:{fixture}/adm_uncond_tiny.pt", device=dev))
    with torch.inference_mode(), c.autocast():
        g = m.forward_features(c.batch(x), t, "all")
    cos = min(torch.nn.functional.cosine_similarity(g[b].float().flatten().cpu(), exp[f"block_{b:02d}"].flatten(), dim=0).item() for b in g)
    print(f"{dev} {prec} channels_last: worst block cosine to the fixture {cos:.5f}")
PY
[ "$DEVICE" = cpu ] && exit 0
${PYTHON:-python3} benchmarks/extract.py --device "$DEVICE" --image-size 256 --channels 256 --batch "${BATCH:-64}" --repeats "${REPEATS:-5}" --selections "${SELECTIONS:-24;19}" --budget "${BUDGET:-600}" ${OUT:+--json $OUT/gpu_extract.json}
