"""A catalogue of user mistakes, each run through `prism.cli.main` in a fresh working folder.

Every case must end the same way (issue #18):
  1. exit status 2 (an argparse refusal raises SystemExit(2): its code counts);
  2. exactly one line on stderr, starting with `prism: error:`, with no traceback; argparse's own refusals are
     one line too (prism.cli's parser prints `prism: error: <what argparse says> (see '<command> --help')`
     instead of the usage block), so they follow the same rule. stderr is captured at the file descriptor
     (capfd), so a library's log line counts even when its handler holds the original sys.stderr. The one
     exception: a library's progress bar (redrawn with carriage returns, like transformers' "Loading weights"
     before a resumed stage finds its checkpoint corrupted) is not a line of the message. The line names what is
     wrong: the file (with its line, record or row where there is one) and the field, checked by the fragments;
  3. the working folder unchanged: every path under it, each file's sha256, size and mtime, each folder's
     mtime (so a temporary file made and removed counts too), and nothing under outputs/.

A case is (id, setup, argv, fragments). `setup(shared)` writes the bad input into the working folder (the current
directory); `shared.world` and `shared.policy` are the session's tiny world export and random embedded-s checkpoint
(tests/conftest.py), built only when a case asks for them, and `{world}` / `{policy}` in argv and fragments name
them. No case may prompt (a prompt fails the test), start a matrix or a sweep's trials (guards below), or train:
each is refused before its first step.
"""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from prism.cli import main

# ----------------------------------------------------------------------------------------------------
# Setup helpers: each returns a setup function writing one thing into the working folder
# ----------------------------------------------------------------------------------------------------


def nothing(shared):
    pass


def text(name: str, content: str):
    def setup(shared):
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        Path(name).write_text(content, encoding="utf-8")
    return setup


def raw(name: str, content: bytes):
    def setup(shared):
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        Path(name).write_bytes(content)
    return setup


def folder(name: str):
    def setup(shared):
        Path(name).mkdir(parents=True)
    return setup


def both(*setups):
    def setup(shared):
        for one in setups:
            one(shared)
    return setup


def png_bytes() -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


LFS_POINTER = (b"version https://git-lfs.github.com/spec/v1\n"
               b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 12345\n")


def turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


GOOD_RECORD = {"messages": [turn("user", "<image>How many shapes?"), turn("assistant", "3")], "images": ["a.png"]}


def sharegpt(records, image: bytes | None = None, name: str = "sft.json"):
    """sft.json holding `records` (a.png beside it holds `image`, a real PNG by default; None: no a.png)."""
    def setup(shared):
        Path(name).write_text(json.dumps(records), encoding="utf-8")
        if image is not None:
            Path(name).with_name("a.png").write_bytes(image)
    return setup


def with_record(**changes) -> list[dict]:
    return [{**GOOD_RECORD, **changes}]


def rl_row(**changes) -> dict:
    row = {"data_source": "count", "prompt": [turn("user", "<image>How many shapes?")],
           "images": [{"bytes": png_bytes(), "path": None}], "ability": "visual_reasoning",
           "reward_model": {"style": "rule", "ground_truth": "3", "choices": None},
           "extra_info": {"id": "count-0", "index": 0, "split": "train", "choices": None}}
    return {**row, **changes}


def rl_parquet(rows, drop: str | None = None, name: str = "rl.parquet"):
    def setup(shared):
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(rows) if rows else pa.Table.from_pylist([rl_row()]).slice(0, 0)
        pq.write_table(table.drop_columns([drop]) if drop else table, name)
    return setup


PAIR = {"prompt": "<image>How many shapes?", "image": "a.png", "teacher_caption": "<caption>\n- a red circle\n</caption>",
        "student_caption": "<caption>\n- a circle\n</caption>", "teacher_cot": "<think>\n1 + 2 = 3\n</think>\n<answer>3</answer>",
        "student_cot": "<think>\n3\n</think>\n<answer>3</answer>"}


def pairs(*lines: str, image: bytes | None = b"", name: str = "pairs.jsonl"):
    """pairs.jsonl of `lines` (a.png beside it: a real PNG unless `image` is given; None: no a.png)."""
    def setup(shared):
        Path(name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        if image is not None:
            Path(name).with_name("a.png").write_bytes(image or png_bytes())
    return setup


def checkpoint(name: str = "model", corrupt=None):
    """A copy of the session's random embedded-s checkpoint as `name`, then `corrupt(folder)`."""
    def setup(shared):
        shutil.copytree(shared.policy, name)
        if corrupt is not None:
            corrupt(Path(name))
    return setup


def truncate_weights(model: Path):
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def lfs_weights(model: Path):
    (model / "model.safetensors").write_bytes(LFS_POINTER)


def text_only_config(model: Path):
    (model / "config.json").write_text(json.dumps({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
                                                   "hidden_size": 64, "vocab_size": 512}))


def remote_code_config(model: Path):
    """A model type transformers does not know, whose code ships with the checkpoint (auto_map)."""
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="prism_custom_vl", architectures=["CustomVLForConditionalGeneration"],
                  auto_map={"AutoConfig": "modeling_custom.CustomVLConfig",
                            "AutoModelForImageTextToText": "modeling_custom.CustomVLForConditionalGeneration"})
    (model / "config.json").write_text(json.dumps(config))
    (model / "modeling_custom.py").write_text("raise SystemExit('the checkpoint code ran')\n")


def remove_config(model: Path):
    (model / "config.json").unlink()


def only_readme(model: Path):
    for path in model.iterdir():
        path.unlink()
    (model / "README.md").write_text("weights to come\n")


# ----------------------------------------------------------------------------------------------------
# Stage directories
# ----------------------------------------------------------------------------------------------------

SFT = ["train", "sft", "model.preset=embedded-s", "model.path={policy}", "model.dtype=float32",
       "model.mixed_precision=no", "data_files=[{world}/sft.json]", "max_length=512", "per_device_batch_size=4",
       "gradient_accumulation_steps=1", "max_steps=1", "output_dir=run"]


def sft_run(*extra: str) -> list[str]:
    return [*SFT, *extra]


def recorded_sft_config(*changes: str, done: bool = False):
    """run/config.yaml of the SFT run of `sft_run(*changes)` (as an earlier run would have left it)."""
    def setup(shared):
        from prism.config import SFTConfig, load_config, write_config_yaml

        overrides = [a.format(world=shared.world, policy=shared.policy) for a in sft_run(*changes)[2:]]
        write_config_yaml(load_config(SFTConfig, overrides=overrides), Path("run/config.yaml"))
        if done:
            Path("run/DONE").write_text("")
    return setup


def done_without_config(shared):
    Path("run").mkdir()
    Path("run/DONE").write_text("")


def corrupted_sft_checkpoint(shared):
    """An interrupted run of `sft_run()` whose step-1 checkpoint has a byte appended to its trainer state."""
    import torch

    from prism.runtime import STATE_FILE, save_checkpoint

    recorded_sft_config()(shared)
    saved = save_checkpoint(Path("run"), 1, model_state={"w": torch.zeros(2)})
    with open(saved / STATE_FILE, "ab") as handle:
        handle.write(b"\0")


# ----------------------------------------------------------------------------------------------------
# Matrix and sweep files
# ----------------------------------------------------------------------------------------------------

# A one-size, one-cell matrix (stage YAMLs are relative to the repository root).
MATRIX = """name: mini
kind: table1
pipelines: [sft+prism]
rl: [none]
instruct_row: false
presets:
  embedded:
    world: [base_size=16, sft_size=16, teacher_size=4, rl_size=8, bench_size=2]
    seeds: [0]
    discriminator_backbone: s
    sizes:
      s:
        overrides:
          base: [model.preset=embedded-s]
          sft: [model.preset=embedded-s]
          disc_warmup: [policy.preset=embedded-s]
          align: [model.preset=embedded-s]
    stages:
      base: {config: experiments/configs/embedded/base.yaml}
      sft: {config: experiments/configs/embedded/sft.yaml, overrides: [max_steps=2]}
      disc_warmup: {config: experiments/configs/embedded/disc_warmup.yaml}
      align: {config: experiments/configs/embedded/align.yaml}
    eval: {suite: embedded, limit: 1}
"""


def matrix(*replacements: tuple[str, str]):
    """m.yaml: MATRIX with each (old, new) replaced (each old text must be there)."""
    content = MATRIX
    for old, new in replacements:
        assert old in content, old
        content = content.replace(old, new)
    return text("m.yaml", content)


SWEEP = """name: smoke
matrix: table1
preset: smoke
size: s
trials: 3
eval_limit: 1
stage_overrides:
  align: [steps=3]
space:
  align.alpha: {type: float, low: 0.0, high: 1.0}
  disc_warmup.num_experts: {type: categorical, choices: [2, 4]}
"""


def sweep(*replacements: tuple[str, str]):
    content = SWEEP
    for old, new in replacements:
        assert old in content, old
        content = content.replace(old, new)
    return text("s.yaml", content)


EVAL = ["eval", "--checkpoint", "model", "--suite", "embedded", "--world", "{world}", "--limit", "1"]
NOT_UTF8_YAML = b"seed: 1\n# caf\xe9\n"

# ----------------------------------------------------------------------------------------------------
# The catalogue: (id, setup, argv, fragments of the error line)
# ----------------------------------------------------------------------------------------------------

CASES = [
    # --- Configs and overrides: the file:line (or the override) and the field, for every command that reads one.
    ("world-yaml-unknown-key", text("w.yaml", "seed: 1\nimage_sise: 96\n"), ["world", "stats", "--config", "w.yaml"],
     ["w.yaml:2", "'image_sise'", "did you mean 'image_size'"]),
    ("world-yaml-wrong-type", text("w.yaml", "seed: 1\nimage_size: big\n"), ["world", "stats", "--config", "w.yaml"],
     ["w.yaml:2", "'image_size'", "expected an int", "'big'"]),
    ("world-yaml-out-of-range", text("w.yaml", "wrong_answer_rate: 1.5\n"), ["world", "stats", "--config", "w.yaml"],
     ["w.yaml:1", "'wrong_answer_rate'", "1.5"]),
    ("world-yaml-malformed", text("w.yaml", "seed: [1\n"), ["world", "stats", "--config", "w.yaml"],
     ["w.yaml:2", "invalid YAML"]),
    ("world-yaml-not-utf8", raw("w.yaml", NOT_UTF8_YAML), ["world", "stats", "--config", "w.yaml"],
     ["w.yaml:2", "not UTF-8", "byte 13"]),
    ("world-yaml-duplicate-key", text("w.yaml", "seed: 1\nseed: 2\n"), ["world", "stats", "--config", "w.yaml"],
     ["w.yaml:2", "'seed'", "duplicate key"]),
    ("world-yaml-not-a-mapping", text("w.yaml", "- seed\n- 1\n"), ["world", "stats", "--config", "w.yaml"],
     ["w.yaml:1", "mapping"]),
    ("world-config-missing", nothing, ["world", "stats", "--config", "nope.yaml"], ["nope.yaml", "no such config file"]),
    ("world-config-is-a-directory", folder("w.yaml"), ["world", "stats", "--config", "w.yaml"],
     ["w.yaml", "a folder, not a YAML config file"]),
    ("world-override-without-equals", nothing, ["world", "stats", "image_size"], ["override 'image_size'", "key=value"]),
    ("world-override-unknown-key", nothing, ["world", "stats", "imag_size=3"],
     ["override 'imag_size=3'", "did you mean 'image_size'"]),
    ("world-override-wrong-type", nothing, ["world", "stats", "image_size=abc"],
     ["override 'image_size=abc'", "'image_size'", "expected an int"]),
    ("world-export-override-out-of-range", nothing, ["world", "export", "--out", "w", "sft_size=-1"],
     ["override 'sft_size=-1'", "'sft_size'"]),
    ("train-sft-yaml-unknown-key", text("sft.yaml", "model:\n  preset: embedded-s\nmax_lenght: 10\n"),
     ["train", "sft", "--config", "sft.yaml"], ["sft.yaml:3", "'max_lenght'", "did you mean 'max_length'"]),
    ("train-sft-yaml-wrong-type", text("sft.yaml", "max_length: long\n"), ["train", "sft", "--config", "sft.yaml"],
     ["sft.yaml:1", "'max_length'", "expected an int"]),
    ("train-sft-override-bad-yaml-value", nothing, ["train", "sft", "max_length=[1"], ["override 'max_length=[1'"]),
    ("train-sft-yaml-section-not-a-mapping", text("sft.yaml", "epochs: 1\noptim: 0.1\n"),
     ["train", "sft", "--config", "sft.yaml"], ["sft.yaml:2", "'optim'", "mapping"]),
    ("train-sft-config-missing", nothing, ["train", "sft", "--config", "sft.yaml"], ["sft.yaml", "no such config file"]),
    ("train-sft-config-is-a-directory", folder("sft.yaml"), ["train", "sft", "--config", "sft.yaml"],
     ["sft.yaml", "a folder, not a YAML config file"]),
    ("train-base-yaml-not-utf8", raw("base.yaml", NOT_UTF8_YAML), ["train", "base", "--config", "base.yaml"],
     ["base.yaml:2", "not UTF-8", "byte 13"]),
    ("train-align-yaml-malformed", text("align.yaml", "steps: 3\n  alpha: 0.5\n"),
     ["train", "align", "--config", "align.yaml"], ["align.yaml:2", "invalid YAML"]),
    ("train-base-override-out-of-range", nothing, ["train", "base", "optim.lr=-1"],
     ["override 'optim.lr=-1'", "'optim.lr'", "> 0"]),
    ("train-disc_warmup-override-cross-field", nothing, ["train", "disc_warmup", "top_k=5"],
     ["override 'top_k=5'", "'top_k'", "num_experts"]),
    ("train-rlvr-override-not-divisible", nothing, ["train", "rlvr", "update.mini_batches=3"],
     ["override 'update.mini_batches=3'", "mini_batches"]),
    ("train-rlvr-override-unknown-key", nothing, ["train", "rlvr", "algorithim=dapo"],
     ["override 'algorithim=dapo'", "did you mean 'algorithm'"]),
    ("train-rlvr-override-bad-choice", nothing, ["train", "rlvr", "algorithm=ppo"],
     ["override 'algorithm=ppo'", "'algorithm'", "'grpo'"]),
    ("eval-yaml-unknown-key", both(checkpoint(), text("eval.yaml", "sed: 1\n")), [*EVAL, "--config", "eval.yaml"],
     ["eval.yaml:1", "'sed'", "did you mean 'seed'"]),
    ("eval-yaml-malformed", both(checkpoint(), text("eval.yaml", "embedded: {top_p: 0.5\n")),
     [*EVAL, "--config", "eval.yaml"], ["eval.yaml", "invalid YAML"]),
    ("eval-override-out-of-range", checkpoint(), [*EVAL, "embedded.top_p=0"],
     ["override 'embedded.top_p=0'", "'embedded.top_p'"]),
    ("matrix-yaml-unknown-key", matrix(("pipelines:", "pipelnes:")), ["matrix", "plan", "m.yaml"],
     ["m.yaml:3", "'pipelnes'", "did you mean 'pipelines'"]),
    ("matrix-yaml-wrong-type", matrix(("seeds: [0]", "seeds: zero")), ["matrix", "plan", "m.yaml"],
     ["m.yaml:9", "'presets.embedded.seeds'", "a list of int"]),
    ("sweep-yaml-unknown-key", sweep(("matrix: table1", "matirx: table1")), ["sweep", "run", "s.yaml"],
     ["s.yaml:2", "'matirx'", "did you mean 'matrix'"]),
    ("sweep-yaml-wrong-type", sweep(("trials: 3", "trials: many")), ["sweep", "run", "s.yaml"],
     ["s.yaml:5", "'trials'", "expected an int"]),

    # --- Command-line arguments: argparse's refusals and the values it cannot check, as one line.
    ("cli-unknown-command", nothing, ["trian"], ["invalid choice: 'trian'", "train"]),
    ("cli-unknown-stage", nothing, ["train", "sfft"], ["invalid choice: 'sfft'", "'sft'", "prism train --help"]),
    ("cli-unknown-table", nothing, ["reproduce", "table9"], ["no matrix 'table9'", "table1"]),
    ("cli-matrix-jobs-zero", nothing, ["matrix", "run", "table1", "--jobs", "0"], ["--jobs", "'0'", ">= 1"]),
    ("cli-reproduce-jobs-negative", nothing, ["reproduce", "table1", "--jobs", "-1"], ["--jobs", "'-1'", ">= 1"]),
    ("cli-matrix-seeds-zero", nothing, ["matrix", "plan", "table1", "--seeds", "0"], ["--seeds", "0"]),
    ("cli-sweep-workers-zero", nothing, ["sweep", "run", "discriminator", "--workers", "0"], ["--workers", "0"]),
    ("cli-world-per-family-zero", nothing, ["world", "stats", "--per-family", "0"], ["--per-family", "'0'", ">= 1"]),
    ("cli-world-show-per-family-negative", nothing, ["world", "show", "--per-family", "-2"], ["--per-family", "'-2'"]),
    ("cli-world-show-unknown-split", nothing, ["world", "show", "--split", "val"], ["--split", "invalid choice: 'val'"]),
    ("cli-eval-missing-checkpoint", nothing, ["eval", "--suite", "embedded"], ["required", "--checkpoint"]),
    ("cli-eval-limit-zero", checkpoint(), [*EVAL[:-1], "0"], ["--limit", "0"]),
    ("cli-eval-limit-not-a-number", nothing, [*EVAL[:-1], "all"], ["--limit", "invalid int value: 'all'"]),
    ("cli-data-check-missing-path", nothing, ["data", "check"], ["required", "path"]),
    ("cli-data-check-unknown-kind", nothing, ["data", "check", "x.json", "--kind", "csv"], ["--kind", "'csv'"]),
    ("cli-reward-missing-jsonl", nothing, ["reward", "score"], ["required", "--jsonl"]),
    ("cli-matrix-unknown-launcher", nothing, ["matrix", "plan", "table1", "--launcher", "pbs"],
     ["--launcher", "'pbs'"]),
    ("cli-train-unknown-option", nothing, ["train", "sft", "--max-steps", "3"], ["unrecognized arguments: --max-steps"]),
    ("cli-eval-checkpoint-missing", nothing, EVAL, ["model", "does not exist"]),
    ("cli-eval-hub-checkpoint-offline", nothing, ["eval", "--checkpoint", "no-such-org/no-such-model", "--suite",
                                                  "embedded", "--world", "{world}"],
     ["no-such-org/no-such-model", "--checkpoint"]),
    ("cli-submit-checkpoint-missing", nothing, ["submit", "model"], ["model", "no such checkpoint folder"]),

    # --- Data files through `prism data check` (every image opened and verified) and through a stage.
    ("data-sharegpt-bad-role", sharegpt([{**GOOD_RECORD, "messages": [turn("bot", "<image>hi"), turn("assistant", "3")]}],
                                        png_bytes()),
     ["data", "check", "sft.json"], ["sft.json", "record [0]", "'messages[0].role'", "'bot'"]),
    ("data-sharegpt-missing-content", sharegpt(with_record(messages=[{"role": "user"}, turn("assistant", "3")]),
                                               png_bytes()),
     ["data", "check", "sft.json"], ["sft.json", "record [0]", "'messages[0].content'"]),
    ("data-sharegpt-unknown-field", sharegpt(with_record(imgs=[]), png_bytes()), ["data", "check", "sft.json"],
     ["sft.json", "record [0]", "'imgs'"]),
    ("data-sharegpt-last-turn-not-assistant",
     sharegpt(with_record(messages=[turn("assistant", "hi"), turn("user", "<image>?")]), png_bytes()),
     ["data", "check", "sft.json"], ["sft.json", "record [0]", "'messages[1].role'", "'assistant'"]),
    ("data-sharegpt-image-count", sharegpt(with_record(images=["a.png", "a.png"]), png_bytes()),
     ["data", "check", "sft.json"], ["sft.json", "record [0]", "'images'", "1 image(s)"]),
    ("data-sharegpt-image-missing", sharegpt([GOOD_RECORD]), ["data", "check", "sft.json"],
     ["sft.json", "record [0]", "'images[0]'", "an existing image file", "a.png"]),
    ("data-sharegpt-image-not-an-image", sharegpt([GOOD_RECORD], b"not an image\n"), ["data", "check", "sft.json"],
     ["sft.json", "record [0]", "'images[0]'", "a readable image", "a.png"]),
    ("data-sharegpt-image-lfs-pointer", sharegpt([GOOD_RECORD], LFS_POINTER), ["data", "check", "sft.json"],
     ["sft.json", "record [0]", "'images[0]'", "not a Git LFS pointer", "git lfs pull"]),
    ("data-sharegpt-image-truncated", sharegpt([GOOD_RECORD], png_bytes()[:-30]), ["data", "check", "sft.json"],
     ["sft.json", "record [0]", "'images[0]'", "a readable image"]),
    ("data-sharegpt-not-utf8", raw("sft.json", b'[{"messages": [{"role": "user", "content": "caf\xe9"}]}]'),
     ["data", "check", "sft.json"], ["sft.json", "not UTF-8", "byte 47"]),
    ("data-sharegpt-empty-file", raw("sft.json", b""), ["data", "check", "sft.json"], ["sft.json", "empty file"]),
    ("data-sharegpt-empty-list", text("sft.json", "[]\n"), ["data", "check", "sft.json"],
     ["sft.json", "top level", "a non-empty JSON list"]),
    ("data-sharegpt-bad-json-line", text("sft.json", "[\n" + json.dumps(GOOD_RECORD) + "\n" + json.dumps(GOOD_RECORD)
                                         + "\n]\n"),
     ["data", "check", "sft.json"], ["sft.json:3", "invalid JSON", "delimiter"]),
    ("data-check-a-folder", folder("sft.json"), ["data", "check", "sft.json"], ["sft.json", "a folder, not a data file"]),
    ("data-check-missing-file", nothing, ["data", "check", "sft.json"], ["sft.json", "no such file"]),
    ("data-check-unknown-suffix", text("sft.csv", "a,b\n"), ["data", "check", "sft.csv"],
     ["sft.csv", "cannot tell the format", "--kind"]),
    ("data-rl-missing-column", rl_parquet([rl_row()], drop="reward_model"), ["data", "check", "rl.parquet"],
     ["rl.parquet", "missing column 'reward_model'"]),
    ("data-rl-wrong-type", rl_parquet([rl_row(reward_model={"style": "rule", "ground_truth": 3, "choices": None})]),
     ["data", "check", "rl.parquet"], ["rl.parquet", "row 0", "'reward_model.ground_truth'", "expected a string"]),
    ("data-rl-no-rows", rl_parquet([]), ["data", "check", "rl.parquet"], ["rl.parquet", "no rows"]),
    ("data-rl-not-parquet", text("rl.parquet", "data_source,prompt\n"), ["data", "check", "rl.parquet"],
     ["rl.parquet", "not a readable parquet file"]),
    ("data-rl-image-not-an-image", rl_parquet([rl_row(images=[{"bytes": b"GIF89a, not really", "path": None}])]),
     ["data", "check", "rl.parquet"], ["rl.parquet", "row 0", "'images[0].bytes'", "a readable image"]),
    ("data-warmup-empty-file", pairs(), ["data", "check", "pairs.jsonl"], ["pairs.jsonl", "no pairs"]),
    ("data-warmup-bad-json-line", pairs(json.dumps(PAIR), '{"prompt": '), ["data", "check", "pairs.jsonl"],
     ["pairs.jsonl:2", "invalid JSON"]),
    ("data-warmup-missing-field", pairs(json.dumps({k: v for k, v in PAIR.items() if k != "student_cot"})),
     ["data", "check", "pairs.jsonl"], ["pairs.jsonl", "line 1", "'student_cot'", "a non-empty string"]),
    ("data-warmup-image-missing", pairs(json.dumps(PAIR), image=None), ["data", "check", "pairs.jsonl"],
     ["pairs.jsonl", "line 1", "'image'", "an existing image file"]),
    ("train-sft-data-image-not-an-image", sharegpt([GOOD_RECORD], b"not an image\n"),
     sft_run("data_files=[sft.json]"), ["sft.json", "record [0]", "'images[0]'", "a readable image"]),
    ("train-sft-data-folder-without-json", folder("data"), sft_run("data_files=[data]"),
     ["data_files", "data", "holds no .json file"]),
    ("train-disc_warmup-empty-pairs", pairs(), ["train", "disc_warmup", "model.preset=embedded-s",
                                                "model.path={policy}", "policy.preset=embedded-s",
                                                "policy.path={policy}", "data_files=[pairs.jsonl]", "output_dir=run"],
     ["pairs.jsonl", "no pairs"]),
    ("train-rlvr-data-missing-column", rl_parquet([rl_row()], drop="prompt"),
     ["train", "rlvr", "model.preset=embedded-s", "model.path={policy}", "data_files=[rl.parquet]",
      "rollout.backend=hf", "steps=1", "output_dir=run"], ["rl.parquet", "missing column 'prompt'"]),

    # --- Checkpoints: config class, readable weights, remote code refused without a prompt, checksums.
    ("eval-checkpoint-truncated-weights", checkpoint(corrupt=truncate_weights), EVAL,
     ["model.safetensors", "truncated"]),
    ("eval-checkpoint-lfs-pointer", checkpoint(corrupt=lfs_weights), EVAL, ["model.safetensors", "Git LFS pointer"]),
    ("eval-checkpoint-text-only-llm", checkpoint(corrupt=text_only_config), EVAL,
     ["model", "no vision-language model", "Qwen3ForCausalLM"]),
    ("eval-checkpoint-remote-code", checkpoint(corrupt=remote_code_config), EVAL,
     ["model", "code shipped with it", "refused"]),
    ("eval-checkpoint-without-config", checkpoint(corrupt=remove_config), EVAL, ["model", "config.json"]),
    ("eval-checkpoint-not-a-model", checkpoint(corrupt=only_readme), EVAL, ["model", "not a checkpoint folder"]),
    ("train-sft-checkpoint-truncated-weights", checkpoint(corrupt=truncate_weights), sft_run("model.path=model"),
     ["model.safetensors", "truncated"]),
    ("train-sft-checkpoint-lfs-pointer", checkpoint(corrupt=lfs_weights), sft_run("model.path=model"),
     ["model.safetensors", "Git LFS pointer"]),
    ("train-sft-checkpoint-text-only-llm", checkpoint(corrupt=text_only_config), sft_run("model.path=model"),
     ["model", "no vision-language model"]),
    ("train-sft-checkpoint-remote-code", checkpoint(corrupt=remote_code_config), sft_run("model.path=model"),
     ["model", "code shipped with it", "refused"]),
    ("train-sft-checkpoint-without-config", checkpoint(corrupt=remove_config), sft_run("model.path=model"),
     ["model", "config.json"]),
    ("train-sft-checkpoint-missing", nothing, sft_run("model.path=model"), ["model", "does not exist"]),
    ("train-sft-unknown-model-preset", nothing, sft_run("model.preset=embedded-xs"),
     ["'embedded-xs'", "embedded-s"]),
    ("train-sft-resume-checksum-mismatch", corrupted_sft_checkpoint, sft_run(),
     ["trainer_state.pt", "sha256", "checkpoint.json", "delete"]),
    ("train-rlvr-checkpoint-not-a-model", checkpoint(corrupt=only_readme),
     ["train", "rlvr", "model.preset=embedded-s", "model.path=model", "data_files=[{world}/rl.parquet]",
      "rollout.backend=hf", "steps=1", "output_dir=run"], ["model", "not a checkpoint folder"]),

    # --- Stage directories: only the same config may finish or resume a run directory.
    ("stage-done-without-config", done_without_config, sft_run(), ["run", "marked finished", "no config.yaml"]),
    ("stage-config-differs", recorded_sft_config("max_steps=2"), sft_run(),
     ["run", "another SFTConfig", "config_hash"]),
    ("stage-finished-config-differs", recorded_sft_config("max_steps=2", done=True), sft_run(),
     ["run", "another SFTConfig"]),
    ("stage-config-malformed", text("run/config.yaml", "max_steps: [1\n"), sft_run(),
     ["config.yaml", "invalid YAML"]),
    ("stage-output-dir-is-a-file", text("run", "not a folder\n"), sft_run(), ["output_dir run is a file, not a folder"]),

    # --- Matrix files: `prism matrix plan <file>` (and report), the file:line of the setting. The lines of stage
    # overrides, stage config paths and the discriminator backbone come from experiments/matrix.py (issue #18).
    ("matrix-unknown-preset", matrix(), ["matrix", "plan", "m.yaml", "--preset", "huge"],
     ["matrix mini", "no preset 'huge'", "embedded"]),
    ("matrix-malformed", matrix(("pipelines: [sft+prism]", "pipelines: [sft+prism")), ["matrix", "plan", "m.yaml"],
     ["m.yaml", "invalid YAML"]),
    ("matrix-unknown-stage", matrix(("      base: {config", "      bsae: {config")), ["matrix", "plan", "m.yaml"],
     ["m.yaml:19", "'presets.embedded.stages.bsae'", "base"]),
    ("matrix-unknown-model-preset", matrix(("sft: [model.preset=embedded-s]", "sft: [model.preset=embedded-xs]")),
     ["matrix", "plan", "m.yaml"], ["m.yaml:15", "stage sft", "unknown model preset 'embedded-xs'"]),
    ("matrix-bad-stage-override-key", matrix(("overrides: [max_steps=2]", "overrides: [max_stesp=2]")),
     ["matrix", "plan", "m.yaml"], ["m.yaml:20", "stage sft", "field 'max_stesp'", "did you mean 'max_steps'"]),
    ("matrix-bad-stage-config-path", matrix(("embedded/align.yaml", "embedded/algin.yaml")),
     ["matrix", "plan", "m.yaml"], ["m.yaml:22", "stage align", "algin.yaml: no such config file"]),
    ("matrix-bad-discriminator-backbone", matrix(("discriminator_backbone: s", "discriminator_backbone: xl")),
     ["matrix", "plan", "m.yaml"], ["m.yaml:10", "discriminator_backbone", "'xl'"]),
    ("matrix-no-seeds", matrix(("seeds: [0]", "seeds: []")), ["matrix", "plan", "m.yaml"],
     ["m.yaml:9", "'presets.embedded.seeds'", "at least one seed"]),
    ("report-matrix-without-runs", matrix(), ["report", "m.yaml"], ["mini", "no evaluated cell", "prism matrix run"]),
    ("report-unknown-preset", matrix(), ["report", "m.yaml", "--preset", "huge"], ["no preset 'huge'"]),

    # --- Sweep files: the whole space and the preset resolved before a trial runs.
    ("sweep-unknown-field", sweep(("align.alpha:", "align.alpah:")), ["sweep", "run", "s.yaml"],
     ["s.yaml:10", "space.align.alpah=0.0", "field 'alpah'", "unknown key"]),
    ("sweep-log-range-from-zero", sweep(("high: 1.0}", "high: 1.0, log: true}")), ["sweep", "run", "s.yaml"],
     ["s.yaml:10", "'space.align.alpha.low'", "log-scale"]),
    ("sweep-unknown-preset", sweep(("preset: smoke", "preset: smokey")), ["sweep", "run", "s.yaml"],
     ["s.yaml:3", "field 'preset'", "no preset 'smokey'"]),
    ("sweep-unknown-matrix", sweep(("matrix: table1", "matrix: table9")), ["sweep", "run", "s.yaml"],
     ["s.yaml:2", "field 'matrix'", "no matrix 'table9'"]),
    ("sweep-space-key-not-a-stage", sweep(("align.alpha:", "rlvr.alpha:")), ["sweep", "run", "s.yaml"],
     ["s.yaml:10", "'space.rlvr.alpha'", "align.<field>"]),
    ("sweep-empty-range", sweep(("low: 0.0, high: 1.0", "low: 1.0, high: 0.5")), ["sweep", "run", "s.yaml"],
     ["s.yaml:10", "'space.align.alpha.low'", "low < high"]),
    ("sweep-value-refused-by-its-stage", sweep(("choices: [2, 4]", "choices: [2, 0]")), ["sweep", "run", "s.yaml"],
     ["s.yaml:11", "space.disc_warmup.num_experts=0", "field 'num_experts'"]),
    ("sweep-report-never-run", sweep(), ["sweep", "report", "s.yaml"], ["smoke", "prism sweep run"]),
    ("sweep-unknown-name", nothing, ["sweep", "run", "nosweep"], ["no sweep 'nosweep'", "discriminator"]),

    # --- Reward input: `prism reward score --jsonl`, the file:line and the field.
    ("reward-missing-field", text("r.jsonl", '{"response": "x", "ground_truth": "1"}\n{"response": "x"}\n'),
     ["reward", "score", "--jsonl", "r.jsonl"], ["r.jsonl:2", "'ground_truth'", "missing"]),
    ("reward-bad-json", text("r.jsonl", '{"response": "x", "ground_truth": "1"\n'),
     ["reward", "score", "--jsonl", "r.jsonl"], ["r.jsonl:1", "invalid JSON"]),
    ("reward-not-utf8", raw("r.jsonl", b'{"response": "x", "ground_truth": "1"}\n{"response": "caf\xe9"}\n'),
     ["reward", "score", "--jsonl", "r.jsonl"], ["r.jsonl:2", "not UTF-8"]),
    ("reward-not-an-object", text("r.jsonl", '["x", "1"]\n'), ["reward", "score", "--jsonl", "r.jsonl"],
     ["r.jsonl:1", "a JSON object"]),
    ("reward-unknown-field", text("r.jsonl", '{"response": "x", "ground_truth": "1", "answer": "1"}\n'),
     ["reward", "score", "--jsonl", "r.jsonl"], ["r.jsonl:1", "'answer'"]),
    ("reward-wrong-type", text("r.jsonl", '{"response": "x", "ground_truth": 1}\n'),
     ["reward", "score", "--jsonl", "r.jsonl"], ["r.jsonl:1", "'ground_truth'", "a string"]),
    ("reward-bad-choices", text("r.jsonl", '{"response": "x", "ground_truth": "A", "choices": ["4", "5"]}\n'),
     ["reward", "score", "--jsonl", "r.jsonl"], ["r.jsonl:1", "'choices'"]),
    ("reward-missing-file", nothing, ["reward", "score", "--jsonl", "r.jsonl"], ["r.jsonl", "cannot read"]),

    # --- Evaluation, submission and reports.
    ("eval-unknown-suite", nothing, ["eval", "--checkpoint", "model", "--suite", "papers"],
     ["--suite", "invalid choice: 'papers'"]),
    ("eval-unknown-benchmark", checkpoint(), ["eval", "--checkpoint", "model", "--suite", "paper", "paper.tasks=[mmmu]"],
     ["override 'paper.tasks=[mmmu]'", "'paper.tasks[0]'", "did you mean 'mmmu_val'"]),
    ("eval-world-not-an-export", both(checkpoint(), folder("world")),
     ["eval", "--checkpoint", "model", "--suite", "embedded", "--world", "world"], ["world", "no world.json"]),
    ("eval-paper-without-judge", checkpoint(), ["eval", "--checkpoint", "model", "--suite", "paper"],
     ["judge"]),
    ("submit-not-evaluated", checkpoint(), ["submit", "model"], ["model", "no finished evaluation", "prism eval"]),
    ("submit-not-a-folder", text("model", "weights\n"), ["submit", "model"], ["model", "no such checkpoint folder"]),

    # --- Output paths that cannot take the output.
    ("output-world-export-to-a-file", text("w", "a file\n"), ["world", "export", "--out", "w"],
     ["--out w is a file, not a folder"]),
    ("output-world-show-under-a-file", text("w", "a file\n"), ["world", "show", "--out", "w/sheet.png"],
     ["--out w/sheet.png", "the folder w is a file"]),
    ("output-world-show-onto-a-folder", folder("sheet.png"), ["world", "show", "--out", "sheet.png"],
     ["--out sheet.png is a folder, not a file"]),
    ("output-eval-out-is-a-file", both(checkpoint(), text("evals", "a file\n")), [*EVAL, "--out", "evals"],
     ["--out", "evals is a file, not a folder"]),
]


# ----------------------------------------------------------------------------------------------------
# The test
# ----------------------------------------------------------------------------------------------------


class Shared:
    """The session's world export and random checkpoint, built on first use."""

    def __init__(self, request):
        self._request = request

    @property
    def world(self) -> Path:
        return self._request.getfixturevalue("world")

    @property
    def policy(self) -> Path:
        return self._request.getfixturevalue("policy_dir")

    def fill(self, template: str) -> str:
        names = {key: getattr(self, key) for key in ("world", "policy") if "{" + key + "}" in template}
        return template.format(**names) if names else template


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under `root` (itself included): a folder's mtime, a file's sha256, size and mtime."""
    found = {}
    for path in [root, *sorted(root.rglob("*"))]:
        stat = path.lstat()
        key = path.relative_to(root).as_posix()
        if path.is_dir() and not path.is_symlink():
            found[key] = ("folder", stat.st_mtime_ns)
        else:
            found[key] = ("file", hashlib.sha256(path.read_bytes()).hexdigest(), stat.st_size, stat.st_mtime_ns)
    return found


def refuse(*args, **kwargs):
    raise AssertionError("a mistake case got as far as running a matrix, a sweep's trials or a prompt")


def test_case_ids_are_unique_and_the_catalogue_is_large():
    ids = [case[0] for case in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 85


@pytest.mark.parametrize("setup, argv, fragments", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_a_mistake_is_one_line_exit_2_and_leaves_the_folder_unchanged(setup, argv, fragments, tmp_path, monkeypatch,
                                                                       capfd, request):
    import builtins

    import experiments.matrix
    import experiments.sweep

    monkeypatch.setattr(builtins, "input", refuse)  # transformers' "run the custom code? [y/N]"
    monkeypatch.setattr(experiments.matrix, "run_local", refuse)
    monkeypatch.setattr(experiments.matrix, "run_slurm", refuse)
    monkeypatch.setattr(experiments.sweep, "create_study", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing here may download
    shared = Shared(request)
    argv = [shared.fill(arg) for arg in argv]
    fragments = [shared.fill(fragment) for fragment in fragments]
    monkeypatch.chdir(tmp_path)
    setup(shared)
    before = snapshot(tmp_path)
    capfd.readouterr()

    try:
        code = main(argv)
    except SystemExit as stop:  # argparse
        code = stop.code
    err = capfd.readouterr().err

    assert code == 2, err
    lines = [line for line in err.split("\n") if line and not line.startswith("\r")]  # progress bars aside
    assert "Traceback" not in err and err.endswith("\n") and len(lines) == 1, err
    line = lines[0]
    assert line.startswith("prism: error: "), line
    missing = [fragment for fragment in fragments if fragment not in line]
    assert not missing, f"{line!r} lacks {missing}"
    assert not (tmp_path / "outputs").exists()
    assert snapshot(tmp_path) == before
