#!/usr/bin/env bash
# The medical quality grid in one go, for a GPU (on a 2-core CPU it takes days): every cell of the acceptance
# table (dense, LoRA, one-stage with and without distillation, taylor / magnitude / random two-stage, at kept 0.7
# and 0.5), the one-stage levers (per-layer shapes, MLP channels only, every weight tuned after pruning, ATP's
# decision generator, a longer gate phase), and a 4x token budget. Each group is one resumable
# benchmarks/quality.py run; the groups run at once, JOBS (default 1) times a group's share of cells each: 13 cells
# at once with JOBS 1. A SmolLM2 cell holds about 3.5 GiB of GPU memory while it trains and up to 11 GiB while it
# is tested (on an 80 GiB H100, 25 cells at once ran out of memory): size JOBS to the GPU.
#
#   bash benchmarks/quality_grid.sh OUT [JOBS] [-- options for every tailored call]
#
# OUT/<group>/quality-medical.{md,json} are the tables, OUT/<group>.log the progress, OUT/runs/<group> the runs.
set -u
out=$(realpath -m "${1:?usage: quality_grid.sh OUT [JOBS] [-- tailored options]}")
jobs=${2:-1}
shift $(($# < 2 ? $# : 2))
[ "${1:-}" = "--" ] && shift
mkdir -p "$out"
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

group() {  # group name, cells at once (times JOBS), quality.py options, -- and tailored options
    local name=$1 share=$2
    shift 2
    python3 benchmarks/quality.py --suite medical --jobs $((share * jobs)) --out "$out/$name" \
        --runs "$out/runs/$name" "$@" >"$out/$name.log" 2>&1 &
}

group main 3 --distill one_stage -- "$@"
group steps-800 3 --methods lora one_stage taylor -- --trainer.max_steps 800 "$@"
group per-layer 1 --methods one_stage -- --model.pruning.uniform false "$@"
group channels-only 2 --methods one_stage taylor -- --model.pruning.units '[channels]' "$@"
group all-weights 2 --methods one_stage taylor -- --model.pruning.recovery_weights all "$@"
group generator 1 --methods one_stage -- --model.pruning.logits generator "$@"
group recovery-0.4 1 --methods one_stage -- --model.pruning.recovery 0.4 "$@"
wait
grep -h "^failed" "$out"/*.log  # failed cells: run the script again to retry them
cat "$out"/*/quality-medical.md 2>/dev/null
exit 0
