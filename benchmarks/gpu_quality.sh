#!/bin/bash
# Issue 18's quality cells on a GPU machine, the third device command after .gpu/step1.sh and .gpu/step2.sh (which
# install the wheels and SmolLM2 into /tmp/site; carry .gpu/b/flan8), e.g. in fp32 like the CPU's cells:
#   bash benchmarks/gpu_quality.sh 470 4 --setting flan8_recipe --seeds 1 --methods fedprox fedqp fedmut --bf16 false
# (docs/quality_scale_analysis.md, "Running the cells on a GPU"). Measured on an H200 (2026-11-30): four fp32 workers
# finish four FLAN-8 cells in ~8 minutes (a round of 8 clients 31-36 s in each, then ROUGE-L); `--bf16 false` cells
# equal the CPU's fp32 cells to 8e-6 per client, where bf16 ones differ by 0.2-4%.
# DEADLINE seconds, WORKERS processes sharing the GPU; the rest goes to `quality_scale.py run`. A literal `--then`
# splits the rest into plans taken in order: every worker finishes (or finds locked) the first plan's cells before
# it starts on the second's, e.g. the rows the goal is about over 3 seeds first, then the other rows:
#   ... 420 8 --setting flan8_recipe --methods local fedit perfit --then --setting flan8_recipe --methods main
#
# Every worker walks the same plan; a cell's lock makes it one worker's (`quality_grid.CellLock`), so the workers
# form a queue. A worker repeats its pass while cells were skipped (locked by another worker, or a fedit_ft waiting
# for its fedit to fork from), until nothing is left or the deadline. At the deadline the workers get SIGINT: a cell
# cut short loses its unfinished round only, but stays on this machine (partial cells do not travel, see
# quality_transfer.py). Then the records of every cell go to $OUT/quality_records.tar.gz and the logs, as one
# archive, to $OUT/quality_logs.tar.gz (the device tool returns at most 8 files).
set -u
deadline=${1:?DEADLINE seconds}; workers=${2:?WORKERS}; shift 2
# what .gpu/step2.sh exports, for a command of its own
export PYTHONPATH=${PYTHONPATH:-$PWD/src:/tmp/site} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
root=${QUALITY_ROOT:-/tmp/q}; flan8=${FLAN8:-.gpu/b/flan8}; out=${OUT:-/tmp/out}; logs=$(mktemp -d)
mkdir -p "$root" "$out"
end=$(( $(date +%s) + deadline ))
plans=(); current=""
for a in "$@"; do
  if [ "$a" = "--then" ]; then plans+=("$current"); current=""; else current+=" $(printf '%q' "$a")"; fi
done
plans+=("$current")
worker() {
  local log="$logs/worker$1.log" plan
  for plan in "${plans[@]}"; do
    while [ "$(date +%s)" -lt "$end" ]; do
      eval "timeout --signal=INT --kill-after=30 $(( end - $(date +%s) )) python3 benchmarks/quality_scale.py run \
        --root \"\$root\" --flan8 \"\$flan8\" --threads 2 --no-report $plan" >> "$log" 2>&1
      # another pass only when this one ended normally and skipped cells (locked by others, or waiting to fork)
      tail -n 1 "$log" | grep -q "^cells: .*skipped [1-9]" || break
      sleep 5
    done
  done
}
for w in $(seq 1 "$workers"); do worker "$w" & sleep 3; done   # staggered: each takes the next free cell
wait
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv > "$logs/gpu.txt" 2>&1
for plan in "${plans[@]}"; do
  eval "python3 benchmarks/quality_scale.py plan --root \"\$root\" --flan8 \"\$flan8\" $plan" 2>&1 | tee -a "$logs/plan.txt" | head -60
done
python3 benchmarks/quality_transfer.py pack --root "$root" --out "$out/quality_records.tar.gz" 2>&1 | tee "$logs/pack.txt"
tar -czf "$out/quality_logs.tar.gz" -C "$logs" .
