#!/usr/bin/env bash
# Everything the GPU figures in the closing notes come from, in one go (a GPU node with torch; prism on
# PYTHONPATH or installed), each part time-boxed so that one failing part leaves the others' figures. Writes
# outputs/bench/gpu-*.json and outputs/gpu-smoke/ (a short embedded base -> sft -> rlvr run on cuda under bf16
# mixed precision, proving the stage recipes' device path); where $OUT is set (the device tool), copies them there.
#   1. bench/gpu_check.py: Qwen3-VL-2B's architecture, FSDP2 mixed precision, SFT + HF rollout + RLVR update;
#   2. the smoke run of the stage recipes;
#   3. bench/gpu_scale.py: Qwen3-VL-4B and -8B's architectures, the rollout (256 new tokens: the HF decode loop of
#      512 took over 75 s twice on 4B) in one process, the update and SFT in another.
# The part budgets come from the first run on an H200 (2026-12-04: gpu_check 103 s, the smoke run's base + SFT 60 s).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
OUT="${OUT:-outputs/bench}"
mkdir -p outputs/bench "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

part() {  # part SECONDS NAME COMMAND...: run, time-boxed, and say how it ended
  local seconds=$1 name=$2; shift 2
  local start=$SECONDS
  timeout "$seconds" "$@"; local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start)) s"
}

part 110 gpu_check python3 bench/gpu_check.py

out=outputs/gpu-smoke
rm -rf "$out" && mkdir -p "$out"
smoke() {
  set -e
  python3 -m prism.cli world export --out "$out/world" base_size=512 sft_size=512 teacher_size=64 rl_size=256 bench_size=8
  python3 -m prism.cli train base --config experiments/configs/embedded/base.yaml model.processor_path="$out/world/tokenizer" \
    data_files="[$out/world/base.json]" max_steps=40 model.mixed_precision=bf16 output_dir="$out/base"
  python3 -m prism.cli train sft --config experiments/configs/embedded/sft.yaml model.path="$out/base/model" \
    data_files="[$out/world/sft.json]" max_steps=40 model.mixed_precision=bf16 output_dir="$out/sft"
  python3 -m prism.cli train rlvr --config experiments/configs/embedded/rlvr.yaml model.path="$out/sft/model" \
    data_files="[$out/world/rl.parquet]" steps=4 model.mixed_precision=bf16 algorithm=dapo output_dir="$out/rlvr"
}
export -f smoke; export out
part 130 smoke bash -c smoke
for stage in base sft rlvr; do
  [ -f "$out/$stage/metrics.jsonl" ] && tail -n 1 "$out/$stage/metrics.jsonl" | cut -c1-600
done
tail -c 20000 "$out"/*/metrics.jsonl > "$OUT/gpu-smoke-metrics.txt" 2>/dev/null || true

rm -f outputs/bench/gpu-qwen3-vl-*.json
for preset_seconds in qwen3-vl-4b:65:50 qwen3-vl-8b:75:60; do
  IFS=: read -r preset first second <<<"$preset_seconds"
  part "$first" "$preset rollout" python3 bench/gpu_scale.py --preset "$preset" --phases rollout --new-tokens 256
  part "$second" "$preset update,sft" python3 bench/gpu_scale.py --preset "$preset" --phases update,sft
done
[ "$OUT" != outputs/bench ] && cp outputs/bench/gpu-*.json "$OUT"/ 2>/dev/null
ls -la "$OUT"
