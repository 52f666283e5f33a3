"""A stage refused through `prism train` (bad data file, bad checkpoint, corrupted checkpoint, an output folder
that cannot be written): exit status 2, one line naming the file and what is wrong, and no run directory or file
left behind (an existing one unchanged)."""

import errno
import hashlib
import json
import os
import pathlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from prism.cli import main
from prism.config import SFTConfig, load_config, write_config_yaml
from prism.runtime import INDEX_FILE, STATE_FILE, save_checkpoint


def one_line(capsys) -> str:
    """stderr, asserted to be exactly one line besides progress bars (redrawn with carriage returns)."""
    err = capsys.readouterr().err
    lines = [line for line in err.split("\n") if line and not line.startswith("\r")]
    assert len(lines) == 1 and err.endswith("\n") and "Traceback" not in err, err
    return lines[0]


def tree(folder: pathlib.Path) -> dict[str, tuple[bytes, int]] | None:
    """Every file under `folder` with its bytes and mtime (None when the folder does not exist)."""
    if not folder.exists():
        return None
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def sft_args(world, policy_dir, out, *extra):
    return ["train", "sft", "model.preset=embedded-s", f"model.path={policy_dir}", "model.dtype=float32",
            "model.mixed_precision=no", f"data_files=[{world}/sft.json]", "max_length=512",
            "per_device_batch_size=4", "gradient_accumulation_steps=1", "max_steps=1", f"output_dir={out}", *extra]


def sharegpt_with_a_bad_line(path: pathlib.Path) -> pathlib.Path:
    """Line 3 is not JSON (a missing comma)."""
    turn = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}], "images": []}
    path.write_text("[\n" + json.dumps(turn) + ",\n" + json.dumps(turn).replace('], "images"', '] "images"') + "\n]\n")
    return path


def parquet_with_a_bad_row(source: pathlib.Path, path: pathlib.Path) -> pathlib.Path:
    """`source`'s rows, row 1 without a ground truth."""
    rows = pq.read_table(source).to_pylist()
    rows[1]["reward_model"]["ground_truth"] = None
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# ----------------------------------------------------------------------------------------------------
# Bad data and bad checkpoints: nothing is written
# ----------------------------------------------------------------------------------------------------


def test_sft_with_a_bad_data_line_leaves_no_run_directory(world, policy_dir, tmp_path, capsys):
    data = sharegpt_with_a_bad_line(tmp_path / "sft.json")
    out = tmp_path / "runs" / "sft"
    assert main(sft_args(world, policy_dir, out, f"data_files=[{data}]")) == 2
    assert one_line(capsys) == f"prism: error: {data}:3: invalid JSON: Expecting ',' delimiter"
    assert not (tmp_path / "runs").exists()


def test_sft_resumed_with_a_bad_data_line_leaves_its_directory_unchanged(world, policy_dir, tmp_path, capsys):
    data = sharegpt_with_a_bad_line(tmp_path / "sft.json")
    out = tmp_path / "sft"
    args = sft_args(world, policy_dir, out, f"data_files=[{data}]")
    write_config_yaml(load_config(SFTConfig, overrides=args[2:]), out / "config.yaml")  # an interrupted run's
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5}\n')
    before = tree(out)
    assert main(args) == 2
    assert f"{data}:3: invalid JSON" in one_line(capsys)
    assert tree(out) == before


def test_sft_with_a_checkpoint_that_is_not_a_model_leaves_no_run_directory(world, policy_dir, tmp_path, capsys):
    bad_model = tmp_path / "model"
    bad_model.mkdir()
    (bad_model / "README.md").write_text("weights to come\n")
    out = tmp_path / "sft"
    assert main(sft_args(world, policy_dir, out, f"model.path={bad_model}")) == 2
    assert str(bad_model) in one_line(capsys)
    assert not out.exists()


def test_rlvr_with_a_bad_data_row_leaves_no_run_directory(world, policy_dir, tmp_path, capsys):
    data = parquet_with_a_bad_row(world / "rl.parquet", tmp_path / "rl.parquet")
    out = tmp_path / "rlvr"
    assert main(["train", "rlvr", "model.preset=embedded-s", f"model.path={policy_dir}", "model.dtype=float32",
                 "model.mixed_precision=no", f"data_files=[{data}]", "rollout.backend=hf",
                 "rollout.prompts_per_step=2", "rollout.rollouts_per_prompt=2", "steps=1", f"output_dir={out}"]) == 2
    assert one_line(capsys) == (f"prism: error: {data}: row 1: field 'reward_model.ground_truth': "
                                "expected a string, got None")
    assert not out.exists()


def test_align_with_a_bad_data_row_leaves_no_run_directory(world, policy_dir, tmp_path, capsys):
    data = parquet_with_a_bad_row(world / "teacher.parquet", tmp_path / "teacher.parquet")
    out = tmp_path / "align"
    assert main(["train", "align", "model.preset=embedded-s", f"model.path={policy_dir}",
                 "discriminator.preset=embedded-s", f"discriminator.path={policy_dir}", f"data_files=[{data}]",
                 "rollout.backend=hf", "rollout.prompts_per_step=2", "rollout.rollouts_per_prompt=2",
                 "update.micro_batch_size=2", "steps=1", f"output_dir={out}"]) == 2
    assert f"{data}: row 1: field 'reward_model.ground_truth'" in one_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("source", ["pairs", "teacher"])
def test_disc_warmup_with_a_bad_pair_line_or_teacher_row_leaves_no_run_directory(world, policy_dir, tmp_path,
                                                                                 capsys, source):
    if source == "pairs":  # read from data_files: the world's first pair, then a line cut short
        first = json.loads((world / "warmup_pairs.jsonl").read_text().splitlines()[0])
        first["image"] = str(world / first["image"])
        data = tmp_path / "pairs.jsonl"
        data.write_text(json.dumps(first) + '\n{"prompt": \n')
        setting, expected = f"data_files=[{data}]", f"{data}:2: invalid JSON"
    else:  # generated from the teacher prompts
        data = parquet_with_a_bad_row(world / "teacher.parquet", tmp_path / "teacher.parquet")
        setting, expected = f"teacher_files=[{data}]", f"{data}: row 1: field 'reward_model.ground_truth'"
    out = tmp_path / "disc_warmup"
    assert main(["train", "disc_warmup", "model.preset=embedded-s", f"model.path={policy_dir}",
                 "policy.preset=embedded-s", f"policy.path={policy_dir}", setting, f"output_dir={out}"]) == 2
    assert expected in one_line(capsys)
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------
# A corrupted checkpoint: a user error naming the file, the recorded and the found checksum
# ----------------------------------------------------------------------------------------------------


def test_a_checkpoint_whose_checksum_does_not_match_is_one_line(world, policy_dir, tmp_path, capsys):
    out = tmp_path / "sft"
    args = sft_args(world, policy_dir, out)
    write_config_yaml(load_config(SFTConfig, overrides=args[2:]), out / "config.yaml")
    checkpoint = save_checkpoint(out, 1, model_state={"w": torch.zeros(2)})
    with open(checkpoint / STATE_FILE, "ab") as handle:  # a flipped disk block, or an edit
        handle.write(b"\0")
    recorded = json.loads((checkpoint / INDEX_FILE).read_text())["files"][STATE_FILE]
    found = hashlib.sha256((checkpoint / STATE_FILE).read_bytes()).hexdigest()
    before = tree(out)
    assert main([*args, "log_every_steps=5"]) == 2  # a bookkeeping field changed: config.yaml is not rewritten
    err = one_line(capsys)
    assert err.startswith(f"prism: error: {checkpoint / STATE_FILE}: sha256 {found}, but ")
    assert f"records {recorded}" in err and f"delete {checkpoint}" in err
    assert tree(out) == before


def test_a_tracker_that_is_not_installed_is_refused_before_anything_is_written(world, policy_dir, tmp_path, capsys,
                                                                             monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "tensorboard" else find_spec(name, *rest))
    out = tmp_path / "sft"
    assert main(sft_args(world, policy_dir, out, "tracking=tensorboard")) == 2
    assert one_line(capsys) == ("prism: error: tracking='tensorboard' but tensorboard is not installed: "
                                "pip install tensorboard, or set tracking: none")
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------
# An output folder that cannot be written: one line naming the path and the reason
# ----------------------------------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder anyway")
def test_a_read_only_output_folder_is_one_line(world, policy_dir, tmp_path, capsys):
    parent = tmp_path / "shared"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        assert main(sft_args(world, policy_dir, parent / "sft")) == 2
    finally:
        parent.chmod(0o755)
    assert one_line(capsys) == f"prism: error: {parent / 'sft'}: Permission denied"
    assert list(parent.iterdir()) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_full_disk_or_read_only_file_system_is_one_line(world, policy_dir, tmp_path, capsys, monkeypatch, code):
    real_write = pathlib.Path.write_bytes

    def fail_halfway(self, data):  # the atomic writer's temporaries: half of the file, then the fault
        if not (self.name.startswith(".") and ".tmp" in self.name):
            return real_write(self, data)
        real_write(self, data[: len(data) // 2])
        raise OSError(code, os.strerror(code))  # as write() raises it: no file name

    monkeypatch.setattr(pathlib.Path, "write_bytes", fail_halfway)
    out = tmp_path / "sft"
    assert main(sft_args(world, policy_dir, out)) == 2
    assert one_line(capsys) == f"prism: error: {out / 'config.yaml'}: {os.strerror(code)}"
    assert list(out.iterdir()) == []  # no config.yaml, no temporary
