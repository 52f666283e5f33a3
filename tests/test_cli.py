"""The `prism` command: user mistakes end in one line and exit status 2; outputs are machine-readable."""

import json

import pytest

from prism.cli import main


def test_unknown_config_key_is_one_line_naming_file_line_and_field(tmp_path, capsys):
    config = tmp_path / "world.yaml"
    config.write_text("seed: 1\nimage_sise: 96\n")
    assert main(["world", "stats", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "world.yaml:2" in err and "image_sise" in err and "image_size" in err


def test_bad_override_names_the_override(capsys):
    assert main(["world", "stats", "image_size=100"]) == 2
    assert "override 'image_size=100'" in capsys.readouterr().err


def test_reward_score_prints_one_json_line_per_input(tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    good = "<caption>\n- a red bar\n</caption>\n<think>\n2 + 3 = 5.\n</think>\n<answer>5</answer>"
    rows = [{"response": good, "ground_truth": "5"}, {"response": "5", "ground_truth": "5"},
            {"response": good.replace(">5<", ">(B) 5<"), "ground_truth": "B", "choices": {"A": "4", "B": "5"}}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["reward", "score", "--jsonl", str(path)]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["score"] for r in out] == [1.0, 0.0, 1.0]
    assert out[1]["format"] == 0.0 and out[0]["extracted_answer"] == "5"


def test_reward_score_bad_line_is_named(tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    path.write_text('{"response": "x", "ground_truth": "1"}\n{"response": "x"}\n')
    assert main(["reward", "score", "--jsonl", str(path)]) == 2
    assert "r.jsonl:2" in capsys.readouterr().err


def test_data_check_names_the_bad_record(tmp_path, capsys):
    path = tmp_path / "sft.json"
    path.write_text(json.dumps([{"messages": [{"role": "bot", "content": "hi"}], "images": []}]))
    assert main(["data", "check", str(path)]) == 2
    assert "record [0]: field 'messages[0].role'" in capsys.readouterr().err


def test_reproduce_an_unknown_table_is_one_line(capsys):
    assert main(["reproduce", "table9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no matrix 'table9'" in err and "table1" in err


def test_matrix_plan_prints_the_dag_and_runs_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["matrix", "plan", "table1", "--preset", "smoke"]) == 0
    out = capsys.readouterr().out
    assert "matrix table1, preset smoke: 18 cells, 39 nodes" in out and "39 of 39 nodes to run" in out
    assert not (tmp_path / "outputs" / "stages").exists()


def test_world_show_writes_a_png(tmp_path, capsys):
    out = tmp_path / "sheet.png"
    assert main(["world", "show", "--out", str(out), "--per-family", "1"]) == 0
    assert out.read_bytes()[:8] == bytes.fromhex("89504e470d0a1a0a")


def test_train_config_errors_are_one_line(tmp_path, capsys):
    config = tmp_path / "sft.yaml"
    config.write_text("model:\n  preset: embedded-s\nmax_lenght: 10\n")
    assert main(["train", "sft", "--config", str(config), "optim.lr=1e-4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "sft.yaml:3" in err and "max_lenght" in err and "max_length" in err


def test_train_overrides_after_the_config_reach_the_stage(tmp_path, capsys):
    assert main(["train", "rlvr", "update.mini_batches=3"]) == 2  # prompts_per_step=32 is not divisible by 3
    assert "override 'update.mini_batches=3'" in capsys.readouterr().err


def test_train_align_without_a_discriminator_is_one_line(tmp_path, capsys):
    assert main(["train", "align", f"output_dir={tmp_path}/out"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "discriminator.path is not set" in err
    assert not (tmp_path / "out").exists()


def test_train_missing_data_names_the_file(tmp_path, capsys):
    assert main(["train", "sft", "model.preset=embedded-s", f"model.processor_path={tmp_path}",
                 f"data_files=[{tmp_path}/none.json]", f"output_dir={tmp_path}/out"]) == 2
    assert "none.json: no such file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before the stage wrote anything


def test_train_help_lists_every_config_field_and_version_prints(capsys):
    from prism.cli import main
    from prism.config import SFTConfig, describe_fields

    with pytest.raises(SystemExit) as done:
        main(["train", "sft", "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    keys = [key for key, _, _ in describe_fields(SFTConfig)]
    assert "optim.lr" in keys and "model.mixed_precision" in keys
    assert all(f"  {key} = " in out for key in keys)
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("prism ")


def test_ctrl_c_is_one_line_and_exit_130_and_debug_shows_the_traceback(monkeypatch, capsys):
    import prism.cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(prism.cli, "cmd_world_stats", interrupted)
    assert main(["world", "stats"]) == 130
    assert capsys.readouterr().err == "prism: interrupted\n"
    with pytest.raises(KeyboardInterrupt):
        main(["--debug", "world", "stats"])


def test_ctrl_c_during_a_stage_says_where_it_resumes(tmp_path, monkeypatch, capsys):
    from prism.config import SFTConfig
    from prism.stages import STAGES
    from prism.stages.common import write_stage_config

    run_dir = tmp_path / "sft"

    def recipe(cfg):  # interrupted once it has recorded its config (a checkpoint may follow)
        if cfg.max_steps == 2:
            write_stage_config(run_dir, cfg)
        raise KeyboardInterrupt

    monkeypatch.setitem(STAGES, "sft", (SFTConfig, recipe))
    assert main(["train", "sft", f"output_dir={run_dir}", "max_steps=1"]) == 130  # before any write
    assert capsys.readouterr().err == "prism: interrupted\n"
    assert main(["train", "sft", f"output_dir={run_dir}", "max_steps=2"]) == 130
    assert capsys.readouterr().err == f"prism: interrupted; run the same command again to resume sft in {run_dir}\n"


def test_debug_re_raises_user_errors_and_other_os_errors_are_not_user_errors(monkeypatch):
    import errno

    import prism.cli
    from prism.config import ConfigError

    with pytest.raises(ConfigError, match="image_size=100"):
        main(["--debug", "world", "stats", "image_size=100"])

    def missing(args):  # not a fault of the output folder: a bug, with its traceback
        raise OSError(errno.ENOENT, "No such file or directory", "/nowhere")

    monkeypatch.setattr(prism.cli, "cmd_world_stats", missing)
    with pytest.raises(FileNotFoundError):
        main(["world", "stats"])


def test_a_refused_data_check_imports_no_torch(tmp_path):
    """Telling a user error from a bug needs no import: the refusal is as fast as the reader that made it."""
    import subprocess
    import sys

    bad = tmp_path / "bad.json"
    bad.write_text('[{"messages": 3}]\n')
    code = ("import sys; from prism.cli import main; rc = main(['data', 'check', sys.argv[1]]); "
            "print(rc, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code, str(bad)], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["2", "False"]
    assert result.stderr.startswith(f"prism: error: {bad}: record [0]: field 'messages'")


def test_the_prism_command_runs_under_the_workers_allocator_settings():
    """`prism ...` started outside `just` or the matrix restarts itself under glibc's heap settings (prism.workers);
    a caller passing its own arguments (a test, a script) is never restarted."""
    import os
    import platform
    import subprocess
    import sys

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's malloc")
    plain = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    code = ("import os, sys\nprint(os.environ.get('MALLOC_MMAP_THRESHOLD_'), flush=True)\n"
            "from prism.cli import main\nsys.argv = ['prism', 'train', 'sftt']\nmain()")
    result = subprocess.run([sys.executable, "-c", code], env=plain, capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["None", str(32 << 20)]  # printed before and after the restart
    assert result.returncode == 2 and "invalid choice: 'sftt'" in result.stderr
    called = "from prism.cli import main\ntry:\n    main(['train', 'sftt'])\nexcept SystemExit:\n    pass\nprint('once')"
    result = subprocess.run([sys.executable, "-c", called], env=plain, capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["once"]


def test_a_refused_argument_imports_neither_torch_nor_numpy():
    """argparse refuses before any command runs: building the parser must not load the world generator (numpy, PIL)
    or a recipe (torch), so the refusal comes back in a fraction of a second."""
    import subprocess
    import sys

    code = ("import sys\nfrom prism.cli import main\ntry:\n    main(['train', 'sftt'])\nexcept SystemExit as stop:\n"
            "    print(stop.code, sorted({'torch', 'numpy', 'PIL'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["2", "[]"]
    assert result.stderr.strip().startswith("prism: error: argument STAGE: invalid choice: 'sftt'")
