#!/usr/bin/env bash
# Everything the GPU figures in the closing notes come from, in one go (a GPU node with torch; prism on
# PYTHONPATH or installed). Writes outputs/bench/gpu-*.json and outputs/gpu-smoke/ (a short embedded
# base -> sft -> rlvr run on cuda under bf16 mixed precision, proving the stage recipes' device path).
# bench/gpu_check.py alone (Qwen3-VL-2B architecture, FSDP2 mixed precision, SFT + rollout + RLVR) fits 10 minutes.
set -euo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

python3 bench/gpu_check.py
rm -f outputs/bench/gpu-qwen3-vl-*.json
for preset in qwen3-vl-4b qwen3-vl-8b; do
  for phase in rollout update sft; do python3 bench/gpu_scale.py --preset $preset --phases $phase; done
done

out=outputs/gpu-smoke
rm -rf "$out" && mkdir -p "$out"
python3 -m prism.cli world export --out "$out/world" base_size=512 sft_size=512 teacher_size=64 rl_size=256 bench_size=8
python3 -m prism.cli train base --config experiments/configs/embedded/base.yaml model.processor_path="$out/world/tokenizer" \
  data_files="[$out/world/base.json]" max_steps=40 model.mixed_precision=bf16 output_dir="$out/base"
python3 -m prism.cli train sft --config experiments/configs/embedded/sft.yaml model.path="$out/base/model" \
  data_files="[$out/world/sft.json]" max_steps=40 model.mixed_precision=bf16 output_dir="$out/sft"
python3 -m prism.cli train rlvr --config experiments/configs/embedded/rlvr.yaml model.path="$out/sft/model" \
  data_files="[$out/world/rl.parquet]" steps=4 model.mixed_precision=bf16 algorithm=dapo output_dir="$out/rlvr"
tail -n 2 "$out/rlvr/metrics.jsonl"
