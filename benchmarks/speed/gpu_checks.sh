#!/usr/bin/env bash
# The GPU figures of docs/performance.md in one go, for a borrowed GPU with little time: each step has its own time
# limit, and a step that fails or runs out of time does not stop the next. Everything is written to OUT.
#
#   bash benchmarks/speed/gpu_checks.sh OUT [-- options for end_to_end.py's tailored fit calls]
#
# 1. speed.py --device cuda --compile: training step time and memory against plain LoRA (bf16), compiled decoder
#    layers, packing, pruned inference, export, and tokens/s + MFU of a random ~1.1B Llama at 8 x 1024
#    (OUT/speed-cuda.json; about 4 minutes on an H100 without --compile).
# 2. end_to_end.py: configs/llama3-8b-medical.yaml on random Llama-3-8B weights, plain LoRA then tailored, through
#    every phase, the export and its reload; measured peaks next to the memory arithmetic (OUT/end-to-end.json).
#    Needs the config's data (data.data_dir) and the embedded SmolLM2 (its tokenizer) on the machine.
set -u
out=$(realpath -m "${1:?usage: gpu_checks.sh OUT [-- end_to_end.py tailored options]}")
shift
[ "${1:-}" = "--" ] && shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" 2>&1

timeout "${SPEED_SECONDS:-240}" python3 benchmarks/speed/speed.py --device cuda --compile \
    --out "$out/speed-cuda.json" >"$out/speed.log" 2>&1
echo "speed.py: exit $? (log: $out/speed.log)"

timeout "${END_TO_END_SECONDS:-240}" python3 benchmarks/speed/end_to_end.py --steps "${STEPS:-40}" \
    --out "$out/end-to-end.json" -- "$@" >"$out/end-to-end.log" 2>&1
echo "end_to_end.py: exit $? (log: $out/end-to-end.log)"
tail -n 30 "$out/end-to-end.log"
exit 0
