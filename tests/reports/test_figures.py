"""Training-curve figures: drawn from the runs' metrics.jsonl, one line per matrix cell (the mean and band of its
seeds), and nothing drawn for a metric no run logged."""

import json
import math
from pathlib import Path

from matplotlib.collections import PolyCollection

from experiments.matrix import Cell, Node, Plan
from reports.figures import FAMILIES, Panel, curve_figure, stage_runs, training_figures


def write_run(path: Path, rows: list[dict], done: bool = True) -> Path:
    path.mkdir(parents=True)
    path.joinpath("metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    if done:
        path.joinpath("DONE").touch()
    return path


def lines_of(axis) -> dict[str, tuple[list, list]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in axis.get_lines()}


def test_a_single_run_is_drawn_with_the_values_of_its_file(tmp_path):
    run = write_run(tmp_path / "sft", [{"step": 1, "loss": 2.5}, {"step": 2, "loss": math.nan},
                                       {"step": 3, "loss": None}, {"step": 4, "loss": 1.25, "lr": 1e-5}])
    figure = curve_figure({"sft": {"s": [run]}}, (Panel("sft", "loss", "loss"),), "Loss")
    (axis,) = figure.axes
    assert lines_of(axis) == {"s": ([1, 4], [2.5, 1.25])}  # NaN and missing values are not points
    assert axis.get_xlabel() == "SFT step" and figure.get_suptitle() == "Loss"


def test_several_seeds_are_drawn_as_their_mean_over_shared_steps_with_a_min_max_band(tmp_path):
    seed0 = write_run(tmp_path / "a0", [{"step": 1, "entropy": 1.0}, {"step": 2, "entropy": 0.5},
                                        {"step": 3, "entropy": 0.25}])
    seed1 = write_run(tmp_path / "a1", [{"step": 1, "entropy": 3.0}, {"step": 2, "entropy": 1.5}])
    other = write_run(tmp_path / "b0", [{"step": 1, "entropy": 0.75}])
    runs = {"rlvr": {"s · sft · grpo": [seed0, seed1], "s · sft+prism · grpo": [other]}}
    figure = curve_figure(runs, (Panel("rlvr", "entropy", "entropy"),), "RL")
    (axis,) = figure.axes
    assert lines_of(axis) == {"s · sft · grpo (mean, min-max of 2 seeds)": ([1, 2], [2.0, 1.0]),
                              "s · sft+prism · grpo": ([1], [0.75])}
    (band,) = [c for c in axis.collections if isinstance(c, PolyCollection)]
    band_y = sorted({round(float(y), 6) for y in band.get_paths()[0].vertices[:, 1]})
    assert band_y == [0.5, 1.0, 1.5, 3.0]  # min and max of the seeds at steps 1 and 2


def test_a_metric_no_run_logged_gets_no_axis_and_a_family_with_none_gets_no_figure(tmp_path):
    run = write_run(tmp_path / "r", [{"step": 1, "clipfrac": 0.1, "ppo_kl": 0.01}])
    panels = (Panel("rlvr", "entropy", "entropy"), Panel("rlvr", "clipfrac", "clip fraction"),
              Panel("rlvr", "ppo_kl", "KL"), Panel("rlvr", "kl_ref", "KL ref"))
    figure = curve_figure({"rlvr": {"s": [run]}}, panels, "RL")
    assert [a.get_title() for a in figure.axes] == ["clip fraction", "KL"]
    assert curve_figure({"rlvr": {"s": [run]}}, (Panel("rlvr", "kl_ref", "KL ref"),), "RL") is None
    assert curve_figure({}, panels, "RL") is None


def chain_plan(root: Path, seeds: tuple[int, ...]) -> Plan:
    """Per seed: base-s -> sft -> (rlvr) and sft -> warm-up (on another size's base) -> align -> rlvr; three cells."""
    nodes: dict[str, Node] = {}
    cells = []

    def node(kind: str, name: str, deps: list[str], rows: list[dict] | None, done: bool = True) -> str:
        key = str(root / name)
        if rows is not None:
            write_run(Path(key), rows, done)
        nodes[key] = Node(kind, key, [], deps, done_marker=Path(key) / "DONE")
        return key

    for seed in seeds:
        loss = [{"step": s, "loss": 3.0 / s + seed} for s in (1, 2, 3)]
        base = node("base", f"base-s{seed}", [], loss)
        backbone = node("base", f"base-m{seed}", [], loss)  # the discriminator's backbone: no part of the policy
        sft = node("sft", f"sft{seed}", [base], loss)
        warmup = node("disc_warmup", f"warmup{seed}", [sft, backbone],
                      [{"step": 1, "bt_loss": 0.7, "accuracy_perception": 0.5, "reward_gap_perception": 0.0}])
        align = node("align", f"align{seed}", [sft, warmup],
                     [{"step": s, "caption_bullets_w1": 1.0 / s, "reasoning_steps_w1": 0.5 / s} for s in (1, 2)])
        policy = [{"step": 1, "entropy": 0.9, "clipfrac": 0.1, "ppo_kl": 0.0}]
        rl_sft = node("rlvr", f"rlvr-sft{seed}", [sft], policy)
        rl_prism = node("rlvr", f"rlvr-prism{seed}", [align], policy, done=seed == 0)  # seed 1 still running
        for pipeline, rl, last in (("sft", "none", sft), ("sft", "grpo", rl_sft), ("sft+prism", "grpo", rl_prism)):
            labels = {"size": "s", "pipeline": pipeline, "rl": rl, "seed": seed}
            evaluation = node("eval", f"eval-{pipeline}-{rl}-{seed}", [last], None)
            cells.append(Cell(labels, f"{last}/model", evaluation))
    return Plan(None, "test", nodes, cells)


def test_stage_runs_follow_each_cells_chain_and_label_a_shared_run_by_what_its_cells_share(tmp_path):
    runs = stage_runs(chain_plan(tmp_path, seeds=(0, 1)))
    assert runs["base"] == {"s": [tmp_path / "base-s0", tmp_path / "base-s1"]}  # not the backbone of size m
    assert runs["sft"] == {"s": [tmp_path / "sft0", tmp_path / "sft1"]}  # shared by all three cells of a seed
    assert runs["disc_warmup"] == {"s · sft+prism · grpo": [tmp_path / "warmup0", tmp_path / "warmup1"]}
    assert runs["rlvr"] == {"s · sft · grpo": [tmp_path / "rlvr-sft0", tmp_path / "rlvr-sft1"],
                            "s · sft+prism · grpo": [tmp_path / "rlvr-prism0"]}  # an unfinished run is left out


def test_training_figures_writes_one_png_and_pdf_per_family_that_was_logged(tmp_path):
    out = tmp_path / "figures"
    paths = training_figures(chain_plan(tmp_path / "runs", seeds=(0,)), out)
    written = {p.name for p in paths}
    # alignment_policy, disc_accuracy: no align run logged entropy, clipfrac, KL or discriminator accuracy
    assert written == {f"{name}.{ext}" for name in ("lm_loss", "disc_warmup", "alignment_w1", "rl_policy")
                       for ext in ("png", "pdf")}
    assert {p.name for p in out.iterdir()} == written
    assert (out / "lm_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {family.name for family in FAMILIES} >= {"alignment_policy", "disc_accuracy"}



def test_runs_serving_different_cells_with_the_same_shared_labels_get_separate_lines(tmp_path):
    nodes, cells = {}, []
    for run, settings in (("rlvr-x", ("a", "b")), ("rlvr-y", ("c", "d"))):
        key = str(write_run(tmp_path / run, [{"step": 1, "entropy": 1.0}]))
        nodes[key] = Node("rlvr", key, [], [], done_marker=Path(key) / "DONE")
        for setting, group in zip(settings, ("g1", "g2"), strict=True):
            evaluation = f"eval-{setting}"
            nodes[evaluation] = Node("eval", evaluation, [], [key])
            cells.append(Cell({"size": "s", "setting": setting, "group": group, "seed": 0}, key, evaluation))
    runs = stage_runs(Plan(None, "test", nodes, cells))
    assert runs == {"rlvr": {"s": [tmp_path / "rlvr-x"], "s (rlvr-y)": [tmp_path / "rlvr-y"]}}
