#!/usr/bin/env bash
# The quality grid in one go, for a GPU (on a 2-core CPU it takes days; it still runs there with JOBS 1): the
# protocol of docs/quality.md on the medical suite (dense, LoRA, one-stage, and the two-stage rivals: Taylor with the
# config's uniform split, Taylor at one-stage's learned shape, a grid of Taylor splits, and tune-prune-tune: Taylor
# after tuning the dense model for one-stage's pre-transition steps) at 75% and 50% of the dense model's total
# parameters, every seed of SEEDS and every token budget of MULTIPLIERS; magnitude and random scores; one-stage with
# distillation; the legal suite with the same defaults (the check that they generalise: never tuned on); the
# quickstart. Each group is one resumable benchmarks/quality/quality.py run; the groups run at once, JOBS
# (default 1) times a group's share of cells each: 9 cells at once with JOBS 1. A SmolLM2 cell holds about 3.5 GiB
# of GPU memory while it trains: size JOBS to the GPU. Tests run TEST_BATCH rows per batch (default 32). On one GPU,
# start CUDA MPS first (`nvidia-cuda-mps-control -d`) so that the cells' small kernels run side by side.
#
#   bash benchmarks/quality/quality_grid.sh OUT [JOBS] [-- options for every tailored call]
#   SEEDS="0 1 2 3 4" MULTIPLIERS="1 4 16" bash benchmarks/quality/quality_grid.sh OUT 2   # a GPU: 16x the tokens too
#
# SEEDS defaults to "0 1 2 3 4", MULTIPLIERS to "1 4" (the CPU-sized budgets; add 16 on a GPU).
# OUT/<group>/seed-<n>/quality-<suite>.{md,json} are the tables, OUT/<group>.log the progress, OUT/runs/<group> the
# runs; `python benchmarks/quality/quality_summary.py OUT` pools the seeds.
set -u
out=$(realpath -m "${1:?usage: quality_grid.sh OUT [JOBS] [-- tailored options]}")
jobs=${2:-1}
shift $(($# < 2 ? $# : 2))
[ "${1:-}" = "--" ] && shift
mkdir -p "$out"
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
read -r -a seeds <<<"${SEEDS:-0 1 2 3 4}"
read -r -a multipliers <<<"${MULTIPLIERS:-1 4}"

group() {  # group name, cells at once (times JOBS), quality.py options, -- and tailored options
    local name=$1 share=$2
    shift 2
    python3 benchmarks/quality/quality.py --suite medical --jobs $((share * jobs)) --out "$out/$name" \
        --runs "$out/runs/$name" --test-batch-size "${TEST_BATCH:-32}" --seeds "${seeds[@]}" "$@" \
        >"$out/$name.log" 2>&1 &
}

group main 4 --steps-multiplier "${multipliers[@]}" -- "$@"
group scores 1 --methods magnitude random --steps-multiplier 1 -- "$@"
group distill 1 --methods one_stage --distill one_stage --distilled-only --steps-multiplier 1 -- "$@"
group legal 2 --suite legal --methods dense lora one_stage taylor taylor_learned_shape --steps-multiplier 1 -- "$@"
group quickstart 1 --suite quickstart --total-kept 0.75 --methods lora one_stage taylor --steps-multiplier 1 -- "$@"
wait
grep -h "^failed" "$out"/*.log  # failed cells: run the script again to retry them
cat "$out"/*/seed-*/quality-*.md 2>/dev/null
exit 0
