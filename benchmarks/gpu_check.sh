#!/usr/bin/env bash
# One GPU window: the acceptance check (benchmarks/gpu_check.py: every family's parity on the
# device, torchrun on one GPU, throughput at real sizes against the plain path, peak memory), then
# extract.py's per-step table at the paper model's size. Results under $OUT (default gpu_check/).
#   DEVICE=cuda OUT=gpu_check bash benchmarks/gpu_check.sh
# Sized for one 10-minute command: gpu_check stops starting checks after its 480 s budget (and
# writes its files after every check), the table after BUDGET (120) s of timed repeats.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-gpu_check}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
${PYTHON:-python3} benchmarks/gpu_check.py --device "$DEVICE" --out "$OUT" ${TINY:+--tiny}
status=$?
[ "$DEVICE" = cpu ] && exit $status
${PYTHON:-python3} benchmarks/extract.py --device "$DEVICE" --image-size 256 --channels 256 --batch "${BATCH:-64}" --repeats "${REPEATS:-5}" \
    --selections "${SELECTIONS:-24;19}" --budget "${BUDGET:-120}" --json "$OUT/gpu_extract.json"
exit $status
