#!/usr/bin/env bash
# One GPU window: the acceptance check (benchmarks/gpu_check.py: every family's parity on the
# device, throughput at real sizes against the plain path, torchrun on one GPU, compiled against
# eager, peak memory), then, with the time left, extract.py's per-selection table at the paper
# model's size. Results under $OUT (default gpu_check/).
#   bash benchmarks/gpu_prepare.sh                      # here, first: .gpu/ holds what the device lacks
#   DEVICE=cuda OUT=gpu_check bash benchmarks/gpu_check.sh   # there, with .gpu carried
# Sized for one 10-minute command: gpu_check stops starting checks after CHECK_BUDGET (420) s and
# writes its files after every check; the table runs only when 4 minutes of WINDOW (570 s) are left.
set -u
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-gpu_check}
source benchmarks/gpu_env.sh
$PY benchmarks/gpu_check.py --device "$DEVICE" --out "$OUT" --budget "${CHECK_BUDGET:-420}" ${TINY:+--tiny} ${SKIP:+--skip "$SKIP"}
status=$?
[ "$DEVICE" = cpu ] && exit $status
left=$(( ${WINDOW:-570} - SECONDS ))
if [ "$left" -ge 240 ]; then  # its JSON is written at the end: 3 minutes kept for building, warm-ups and compiling
    timeout "$left" $PY benchmarks/extract.py --device "$DEVICE" --image-size 256 --channels 256 --batch "${BATCH:-64}" --repeats "${REPEATS:-5}" \
        --selections "${SELECTIONS:-24;19}" --budget $(( left - 180 )) --json "$OUT/gpu_extract.json"
else
    echo "extract.py's table skipped: $left s of the window left (gpu_check's ADM-256 rows hold the same figures)"
fi
exit $status
