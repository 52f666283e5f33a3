# PRISM experiment harness. `just --list` shows every recipe.
set shell := ["bash", "-euo", "pipefail", "-c"]

# Keep freed blocks up to 32 MiB in the heap rather than faulting them in again every step (prism/workers.py:
# 12-13% of a tiny model's SFT step here, beside another node). Matrix nodes and sweep workers get the same, and a
# `prism` command or benchmark started without them restarts itself under them; your own values win.
export MALLOC_MMAP_THRESHOLD_ := env_var_or_default("MALLOC_MMAP_THRESHOLD_", "33554432")
export MALLOC_TRIM_THRESHOLD_ := env_var_or_default("MALLOC_TRIM_THRESHOLD_", "1073741824")

# Create .venv and install the project with the CPU constraints (a no-op when already up to date).
setup:
    #!/usr/bin/env bash
    set -euo pipefail
    # A .venv copied, moved or linked here from another checkout runs that checkout's python and code (its scripts
    # name it), whatever this folder holds: rebuild it. venv writes the folder it was made for into pyvenv.cfg.
    made_for=$(sed -n 's/^command = .* -m venv //p' .venv/pyvenv.cfg 2>/dev/null || true)
    if [ -n "$made_for" ] && [ "$(realpath -m "$made_for")" != "$(pwd -P)/.venv" ]; then
        echo ".venv was made for $made_for: rebuilding it here" >&2
        rm -rf .venv
    fi
    want=$(cat pyproject.toml constraints-cpu.txt | sha256sum | cut -c1-16)
    stamp=.venv/.prism-installed
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "prism needs Python >= 3.11 as python3" >&2; exit 1; }
    [ -x .venv/bin/python ] || python3 -m venv .venv
    start=$(date +%s)
    # uv installs the stack in about 90 s where pip took about 270 s (CI). It does not read pip's configuration,
    # so the wheel folders, indexes and constraints pip is set up with here are passed on; pip is the fallback.
    if [ -x .venv/bin/uv ] || .venv/bin/pip install -q --disable-pip-version-check uv >/dev/null 2>&1; then
        uv_args=(--index-strategy unsafe-best-match)  # pip's rule: the best version across all indexes
        while IFS='=' read -r key value; do
            value=${value//\'/}
            case "${key##*.}" in
                index-url) uv_args+=(--index-url "$value") ;;
                extra-index-url) for v in $value; do uv_args+=(--extra-index-url "$v"); done ;;
                find-links) for v in $value; do uv_args+=(--find-links "$v"); done ;;
                constraint) for v in $value; do uv_args+=(--constraint "$v"); done ;;
            esac
        done < <(.venv/bin/pip config list 2>/dev/null)
        # --compile-bytecode as pip does: with PYTHONDONTWRITEBYTECODE set, every process would otherwise compile
        # torch and transformers again on import (the 2-process tests ran twice as long without it)
        .venv/bin/uv pip install -q --compile-bytecode --python .venv/bin/python "${uv_args[@]}" -c constraints-cpu.txt -e ".[dev]"
        # lmms-eval pulls a CUDA torchvision whose import fails beside the CPU torch; nothing here needs it.
        .venv/bin/uv pip uninstall -q --python .venv/bin/python torchvision 2>/dev/null || true
    else
        .venv/bin/pip install -q --disable-pip-version-check -c constraints-cpu.txt -e ".[dev]"
        .venv/bin/pip uninstall -y -q torchvision 2>/dev/null || true
    fi
    echo "$want" > "$stamp"
    echo "installed into .venv in $(( $(date +%s) - start )) s ($(du -sh .venv | cut -f1))"

# Check the import layers (pyproject.toml's import-linter contracts), then run the test suite (CPU, no network).
# Extra arguments go to pytest.
test *args: setup
    .venv/bin/lint-imports --no-cache
    .venv/bin/python -m pytest {{args}}

# Rebuild a paper table (table1 or ablations) on the embedded default (--jobs N nodes at once; default: the cores).
reproduce name *args: setup
    .venv/bin/prism reproduce {{name}} {{args}}

# The embedded world: `just world stats`, `just world export --out outputs/world`, `just world show`.
world *args: setup
    .venv/bin/prism world {{args}}

# Run one stage to the end, resuming a killed run: `just train STAGE --config F [key=value ...]`, STAGE one of
# base, sft, disc_warmup, align, rlvr (`just train sft --help` lists its config fields).
train *args: setup
    .venv/bin/prism train {{args}}

# Evaluate a checkpoint through lmms-eval: `just eval --checkpoint DIR --suite embedded [--limit N] [--world DIR]`.
eval *args: setup
    .venv/bin/prism eval {{args}}

# Score a JSONL file of responses with the RLVR reward.
reward-score file: setup
    .venv/bin/prism reward score --jsonl {{file}}

# Benchmarks: JSON under outputs/bench/.
bench-world: setup
    .venv/bin/python bench/world_throughput.py

# RLVR step and SFT throughput vs TRL's GRPOTrainer on the same tiny models (needs the bench extra: trl).
bench-rlvr *args: setup
    .venv/bin/python -c "import trl" 2>/dev/null || .venv/bin/pip install -q --disable-pip-version-check --no-deps "trl==1.16.0"
    .venv/bin/python bench/rlvr_vs_trl.py {{args}}

# RLVR gains over SFT per size, algorithm and seed, each evaluated through lmms-eval (needs the SFT stages).
rlvr-gains *args: setup
    .venv/bin/python bench/rlvr_gains.py {{args}}

# Two runs of a matrix (folders where `just reproduce` ran), paired cell by cell on the same items and seeds.
paired-runs run_a run_b *args: setup
    .venv/bin/python bench/paired_runs.py {{run_a}} {{run_b}} {{args}}

# Evaluations run by hand (`prism eval` folders, one per seed and label), each label paired with the first.
paired-evals +labels: setup
    .venv/bin/python bench/paired_evals.py {{labels}}

# Held-out accuracy per family at each kept checkpoint of a stage run (train with keep_last_checkpoints=0).
checkpoint-curve run +args: setup
    .venv/bin/python bench/checkpoint_curve.py {{run}} {{args}}

# Calibrate the embedded world: base + SFT of a preset, held-out accuracy per family (S ~12 min, M ~25 min).
calibrate-world preset="embedded-s" *args: setup
    .venv/bin/python bench/calibrate_world.py --preset {{preset}} {{args}}

# Seconds per PRISM alignment step by phase and peak RSS (needs the embedded sft and disc_warmup stages).
bench-align *args: setup
    .venv/bin/python bench/align_step.py {{args}}

# One discriminator pass by row grouping, experts forward and precision: `just bench-disc-split --threads 1`.
bench-disc-split *args: setup
    .venv/bin/python bench/disc_split.py {{args}}

# FLOPs and seconds per kind of work (SFT step, rollout, RLVR update, discriminator, evaluation) beside the GEMM
# peaks of the model's shapes, per tiny preset: outputs/bench/throughput.json (`--profile` adds top operators).
bench-throughput *args: setup
    .venv/bin/python bench/throughput.py {{args}}

# Evaluation with the decode loop against transformers' generate on the same checkpoints and items (greedy
# responses compared, sampled runs timed): `just bench-eval-decode outputs/stages/<sft>/model`.
bench-eval-decode +checkpoints: setup
    .venv/bin/python bench/eval_decode.py {{checkpoints}}

# On a GPU node: a few SFT and RLVR steps of Qwen3-VL-2B's architecture (random weights) under FSDP2 bf16 mixed
# precision, with HF rollouts: tokens/s, MFU, peak memory in outputs/bench/gpu-check.json (`--tiny` runs it on CPU).
bench-gpu *args: setup
    .venv/bin/python bench/gpu_check.py {{args}}

# Optuna sweep (one worker per core, sharing a SQLite study), then its report: `just sweep discriminator`.
sweep name *args: setup
    .venv/bin/prism sweep run {{name}} {{args}}
