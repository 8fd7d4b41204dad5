#!/usr/bin/env bash
# One GPU piece of the campaign, on the device machine (from the repository root), after benchmarks/gpu_prepare.sh
# here and with .whl .devdata .corpus carried: each argument is one benchmarks/campaign_gpu.py invocation (job and
# options, without --out), run side by side on the one GPU; each job's states and summary come back in $OUT
# (as <job>.<variant>.pt and <job>.summary.json, a grid's cells as <job>.state.json; at most 8 files).
#   bash benchmarks/gpu_piece.sh \
#     "pretrain-et-oro --minutes 8 --corpus .corpus/et-oro.npz --variant main" \
#     "ethanol --minutes 8 --variant b32 optim.batch_size=32 optim.lr=3e-4 optim.lr_patience=60"
#   bash benchmarks/gpu_piece.sh "grid-et-4x96 --minutes 8 --shards 12 --molecules ethanol" \
#     "md-naphthalene --minutes 8"                  (with gpu_prepare.sh --all-splits ethanol naphthalene)
# Adopt a state here by copying it over benchmarks/campaign/state/<job>.pt (see campaign_gpu.py); a grid's cells with
# python benchmarks/campaign_gpu.py <job> --adopt FOLDER.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?OUT: the folder whose files come back (the device tool sets it)}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_piece: installing .whl/ failed: run benchmarks/gpu_prepare.sh here and carry .whl" >&2; exit 3; }
export PYTHONPATH=/tmp/site OREO_DATA_DIR="$PWD/.devdata" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
pids=()
jobs_=()
for spec in "$@"; do
    job=${spec%% *}
    jobs_+=("$job")
    # shellcheck disable=SC2086
    python3 benchmarks/campaign_gpu.py $spec --out "/tmp/gpu/$job" > "/tmp/gpu-$job.log" 2>&1 &
    pids+=($!)
done
rc=0
for k in "${!pids[@]}"; do
    wait "${pids[$k]}" || rc=1
    job=${jobs_[$k]}
    echo "== ${job}"
    tail -n 12 "/tmp/gpu-$job.log"
    for f in /tmp/gpu/"$job"/*.pt; do [ -f "$f" ] && cp "$f" "$OUT/$job.$(basename "$f")"; done
    [ -f "/tmp/gpu/$job/summary.json" ] && cp "/tmp/gpu/$job/summary.json" "$OUT/$job.summary.json"
    [ -f "/tmp/gpu/$job/state.json" ] && cp "/tmp/gpu/$job/state.json" "$OUT/$job.state.json"   # a grid's cells
done
exit $rc
