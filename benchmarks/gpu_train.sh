#!/usr/bin/env bash
# With the device time gpu_check.sh leaves: train the shipped checkpoint further and bring its EMA back.
#   bash benchmarks/gpu_prepare.sh                              # here: .gpu/ holds diffusers and the CIFAR-10 archive
#   device run: "LIMIT_S=180 bash benchmarks/gpu_train.sh", carry [".gpu"]
# The first call warm-starts from checkpoints/diffprobe-cifar10/ema.pt (pretrain --init-from); while
# the machine stays warm, RUN (git-ignored, kept between calls) holds the training state and the next
# call resumes it exactly. After LIMIT_S seconds, SIGTERM makes pretrain save and stop. Under $OUT: ema.pt in
# 15 MB pieces (the device returns files of at most 16 MiB, 8 at most), ema.json, loss.csv, train.log and
# the run's config and state (training-state.pt without its weights). Back here, from the checkout's root:
#   mkdir -p runs/gpu-pretrain && cp FILES_AT/* runs/gpu-pretrain/ && cat runs/gpu-pretrain/ema.pt.part-* > runs/gpu-pretrain/ema.pt
#   diffprobe export runs/gpu-pretrain --data ../shared/data/cifar10-train.tar.gz --out checkpoints/diffprobe-cifar10
# Recipe: DDPM's CIFAR-10 one (Ho et al. 2020: batch 128, lr 2e-4, EMA 0.9999); a GPU has room for it.
set -u -o pipefail
OUT=${OUT:-gpu_train}  # the device tool sets OUT: what is written there comes back
RUN=${RUN:-runs/gpu-pretrain}
source benchmarks/gpu_env.sh
mkdir -p "$OUT"
data=${DATA:-${DIFFPROBE_SHARED:-../shared}/data/cifar10-train.tar.gz}
timeout -s TERM -k 60 "${LIMIT_S:-180}" $PY -m diffprobe pretrain --data "$data" --out "$RUN" --steps "${STEPS:-1000000}" \
    --init-from checkpoints/diffprobe-cifar10/ema.pt --device "${DEVICE:-cuda}" --batch-size "${BATCH:-128}" --lr 2e-4 \
    --save-every "${SAVE_EVERY:-2000}" 2>&1 | tr '\r' '\n' | tee "$OUT/train.log" | tail -40
status=${PIPESTATUS[0]}
# 124: the time limit fired and pretrain saved on SIGTERM; anything else but 0 failed, and an ema.pt
# left by an earlier call on this machine must not go back as this one's
if [ "$status" -ne 0 ] && [ "$status" -ne 124 ]; then echo "pretrain failed (exit $status): see $OUT/train.log"; exit 1; fi
[ -f "$RUN/ema.pt" ] || { echo "no $RUN/ema.pt: training saved nothing"; exit 1; }
split -b 15M -d "$RUN/ema.pt" "$OUT/ema.pt.part-"
cp "$RUN/ema.json" "$RUN/loss.csv" "$OUT/"
# export reads the run's config and state from training-state.pt; its weights and Adam moments (150 MB) stay there
$PY - "$RUN" "$OUT" <<'PY'
import sys, torch
run, out = sys.argv[1:]
blob = torch.load(f"{run}/training-state.pt", map_location="cpu", weights_only=True)
torch.save({k: blob[k] for k in ("config", "state")}, f"{out}/training-state.pt")
print(f"step {blob['state']['step']}, on {blob['state'].get('hardware')}")
PY
[ $? -eq 0 ] || exit 1
ls -la "$OUT"
