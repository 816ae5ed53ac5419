#!/usr/bin/env bash
# The quality grid in one go, for a GPU (on a 2-core CPU it takes days): every cell of the medical acceptance table
# (dense, LoRA, one-stage with and without distillation, taylor / magnitude / random two-stage, at kept 0.7 and 0.5);
# the levers (4x the tokens per step, per-layer shapes, distillation from the pretrained or the corrected teacher for
# one-stage and Taylor alike; the quickstart at 4x the tokens); and the legal suite with the defaults (the check that
# they generalise: never tuned on). Each group is one resumable benchmarks/quality/quality.py run; the groups run at once, JOBS
# (default 1) times a group's share of cells each: 12 cells at once with JOBS 1. A SmolLM2 cell holds about 3.5 GiB of
# GPU memory while it trains (more with 16-row batches): size JOBS to the GPU. Tests run TEST_BATCH rows per batch
# (default 32). On one GPU, start CUDA MPS first (`nvidia-cuda-mps-control -d`) so that the cells' small kernels run
# side by side: on an H200, 22 cells at once then finished the grid in about 5 minutes.
#
#   bash benchmarks/quality/quality_grid.sh OUT [JOBS] [-- options for every tailored call]
#
# OUT/<group>/quality-<suite>.{md,json} are the tables, OUT/<group>.log the progress, OUT/runs/<group> the runs.
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
    python3 benchmarks/quality/quality.py --suite medical --jobs $((share * jobs)) --out "$out/$name" \
        --runs "$out/runs/$name" --test-batch-size "${TEST_BATCH:-32}" "$@" >"$out/$name.log" 2>&1 &
}

group main 4 --distill one_stage -- "$@"
group batch-16 2 --methods lora one_stage taylor -- --data.batch_size 16 "$@"
group per-layer 1 --methods one_stage -- --model.pruning.uniform false "$@"
group distill-base 1 --methods one_stage taylor --distill one_stage taylor --distilled-only \
    -- --model.distill.teacher base --model.distill.temperature 1 "$@"
group distill-corrected 1 --methods one_stage taylor --distill one_stage taylor --distilled-only \
    -- --model.distill.teacher corrected --model.distill.temperature 1 "$@"
group legal 2 --suite legal --methods dense lora one_stage taylor -- "$@"
group quickstart-batch-16 1 --suite quickstart --budgets 0.7 --methods lora one_stage taylor \
    --distill one_stage taylor --distilled-only --distill-weight 1 -- --data.batch_size 16 "$@"
wait
grep -h "^failed" "$out"/*.log  # failed cells: run the script again to retry them
cat "$out"/*/quality-*.md 2>/dev/null
exit 0
