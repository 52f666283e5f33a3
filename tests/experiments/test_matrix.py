"""The experiment matrix: cells expand into a DAG of content-addressed stages that cells share, a changed field
reruns exactly its dependants, finished stages are cached, and the SLURM plan writes scripts without submitting."""

import dataclasses
import re
from pathlib import Path

import pytest

from experiments import matrix as mx
from experiments.matrix import build_plan, describe_plan, load_matrix, slurm_scripts
from prism.config import ConfigError


def _kinds(plan):
    counts = {}
    for node in plan.nodes.values():
        counts[node.kind] = counts.get(node.kind, 0) + 1
    return counts


def test_table1_cells_share_their_common_stages():
    plan = build_plan(load_matrix("table1"), "embedded")
    assert len(plan.cells) == 2 * (1 + 2 * 4)  # per size: instruct row + 2 pipelines x 4 RL settings
    # per size: 1 base, 1 SFT (shared by both pipelines), 1 warm-up, 1 alignment (shared by 4 PRISM cells),
    # 6 RL runs; one world; one evaluation per cell
    assert _kinds(plan) == {"world": 1, "base": 2, "sft": 2, "disc_warmup": 2, "align": 2, "rlvr": 12, "eval": 18}
    keys = list(plan.nodes)
    for node in plan.nodes.values():  # insertion order is a topological order
        assert all(keys.index(dep) < keys.index(node.key) for dep in node.deps)
    s_cells = {(c.labels["pipeline"], c.labels["rl"]): c for c in plan.cells if c.labels["size"] == "s"}
    sft_key = s_cells[("sft", "none")].checkpoint.removesuffix("/model")
    prism_grpo = plan.nodes[s_cells[("sft+prism", "grpo")].checkpoint.removesuffix("/model")]
    align = plan.nodes[prism_grpo.cfg.model.path.removesuffix("/model")]
    assert align.kind == "align" and align.cfg.model.path == f"{sft_key}/model"
    warmup = plan.nodes[align.cfg.discriminator.path.removesuffix("/model")]
    # the embedded discriminator upcycles the S base model (the base stage of size s, same seed)
    assert warmup.cfg.model.path == plan.nodes[sft_key].cfg.model.path and warmup.cfg.policy.path == f"{sft_key}/model"
    assert prism_grpo.cfg.algorithm == "grpo" and prism_grpo.cfg.data_files[0].endswith("/rl.parquet")


@pytest.mark.parametrize(("table_preset", "probe_preset", "sft_steps"),
                         [("embedded-short", "validation", 700), ("embedded", "validation-default", 1600)])
def test_the_size_axis_probe_trains_table1s_base_and_sft_on_another_world(table_preset, probe_preset, sft_steps):
    """experiments/configs/size_axis.yaml chooses table1's base and SFT schedules on a validation world: each of its
    presets must train what its table1 preset trains (every base and SFT setting but the paths), on a world that
    differs from the table's in its seed alone."""
    table = build_plan(load_matrix("table1"), table_preset)
    probe = build_plan(load_matrix("experiments/configs/size_axis.yaml"), probe_preset)

    def stages(plan, kind):  # preset -> the resolved config, less what names the world, the folders and the matrix
        out = {}
        for node in (n for n in plan.nodes.values() if n.kind == kind):
            cfg = dataclasses.asdict(node.cfg)
            for field in ("output_dir", "data_files", "tracking_group"):
                cfg.pop(field)
            cfg["model"].pop("path"), cfg["model"].pop("processor_path")
            out[node.preset] = cfg
        return out

    for kind, steps in (("base", 1200), ("sft", sft_steps)):
        assert stages(table, kind) == stages(probe, kind), kind
        assert ({n.preset for n in table.nodes.values() if n.kind == kind and n.run_alone}
                == {n.preset for n in probe.nodes.values() if n.kind == kind and n.run_alone}), kind  # same threads
        assert {n.cfg.max_steps for n in probe.nodes.values() if n.kind == kind} == {steps}, kind
    (table_world,), (probe_world,) = ([n.cfg for n in plan.nodes.values() if n.kind == "world"]
                                      for plan in (table, probe))
    assert probe_world.seed != table_world.seed
    assert dataclasses.replace(probe_world, seed=table_world.seed) == table_world


def test_both_embedded_presets_give_both_sizes_one_schedule_on_the_embedded_world_and_items():
    """M above S must come from the model, not from more steps: each embedded preset trains S and M for the same
    base and SFT steps; the default's SFT is longer than embedded-short's, the RL schedule the same; both use the
    same held-out items and S base (the worlds differ in their SFT split alone: the default's repeats presence), so
    the two presets' S cells pair item for item. The default's M is embedded-l, embedded-short's embedded-m."""
    short, long = (build_plan(load_matrix("table1"), preset) for preset in ("embedded-short", "embedded"))

    def steps(plan, kind):
        return {node.preset: node.cfg.max_steps for node in plan.nodes.values() if node.kind == kind}

    assert set(steps(long, "sft")) == {"embedded-s", "embedded-l"}
    assert set(steps(short, "sft")) == {"embedded-s", "embedded-m"}
    for kind in ("base", "sft"):
        assert len(set(steps(long, kind).values())) == 1 and len(set(steps(short, kind).values())) == 1, kind
        assert min(steps(long, kind).values()) >= max(steps(short, kind).values()), kind
    assert steps(long, "sft")["embedded-s"] > steps(short, "sft")["embedded-s"]
    rl = [{(node.cfg.steps, node.cfg.optim.lr) for node in plan.nodes.values() if node.kind == "rlvr"}
          for plan in (short, long)]
    assert rl[0] == rl[1] == {(24, 5e-5)}
    (even,), (repeated,) = ([node.cfg for node in plan.nodes.values() if node.kind == "world"]
                            for plan in (short, long))
    assert repeated.sft_family_repeats == {"presence": 4} and repeated.sft_size > even.sft_size
    # what the other splits, the held-out items and the tokenizer are made from (tests/data: test_world, test_formats)
    assert dataclasses.replace(repeated, sft_size=even.sft_size, sft_family_repeats={}) == even
    assert short.matrix.presets["embedded-short"].eval == long.matrix.presets["embedded"].eval


def test_embedded_short_is_the_default_with_its_sft_steps_and_an_inherited_mistake_names_the_defaults_line(tmp_path):
    """embedded-short merges the default (`<<: *embedded`, S's overrides `<<: *embedded_s`): everything but the SFT
    overrides, the SFT mix and M (embedded-m, the default's embedded-l) is the default's, and a mistake in an
    inherited override stops its plan at the line of the default's that holds it."""
    matrix = load_matrix("table1")
    short, default = matrix.presets["embedded-short"], matrix.presets["embedded"]
    for field in (f.name for f in dataclasses.fields(short) if f.name not in ("sizes", "world")):
        assert getattr(short, field) == getattr(default, field), field
    assert set(short.world) ^ set(default.world) == {"sft_size=10000", "sft_size=15000",
                                                     "sft_family_repeats={presence: 4}"}
    for size, preset in (("s", "embedded-s"), ("m", "embedded-m")):
        mine, theirs = short.sizes[size].overrides, default.sizes[size].overrides
        assert all(f"model.preset={preset}" in mine[kind] for kind in ("base", "sft", "align", "rlvr"))
        assert mine["sft"] != theirs["sft"] and "max_steps=700" in mine["sft"]
    s_mine, s_theirs = short.sizes["s"].overrides, default.sizes["s"].overrides
    assert {k: v for k, v in s_mine.items() if k != "sft"} == {k: v for k, v in s_theirs.items() if k != "sft"}

    text = (mx.CONFIG_DIR / "table1.yaml").read_text()
    path = tmp_path / "table1.yaml"
    path.write_text(text.replace("align: [model.preset=embedded-s]", "align: [model.preset=embedded-q]", 1))
    line = next(number for number, row in enumerate(path.read_text().splitlines(), 1) if "embedded-q" in row)
    assert line < next(number for number, row in enumerate(text.splitlines(), 1) if row.startswith("  embedded-short:"))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:{line}: matrix table1, preset embedded-short, "
                                          r"size s, stage align: unknown model preset 'embedded-q'"):
        build_plan(load_matrix(path), "embedded-short")


def test_the_embedded_ablations_full_row_is_table1s_s_sft_prism_grpo_cell():
    """Ablation deltas are read against `full`: on the embedded preset it is the very run behind table1's S SFT ->
    PRISM -> GRPO cell (the same stage directories), so the two reports agree where they overlap."""
    table = build_plan(load_matrix("table1"), "embedded")
    ablations = build_plan(load_matrix("ablations"), "embedded")
    full = next(cell for cell in ablations.cells if cell.labels["setting"] == "full")
    cell = next(cell for cell in table.cells if cell.labels == {"size": "s", "pipeline": "sft+prism", "rl": "grpo",
                                                                "seed": 0})
    assert (full.checkpoint, full.eval_key) == (cell.checkpoint, cell.eval_key)
    assert ablations.nodes[full.checkpoint.removesuffix("/model")].kind == "rlvr"


def test_a_changed_field_reruns_exactly_its_dependants(tmp_path):
    text = (mx.CONFIG_DIR / "table1.yaml").read_text()
    changed = tmp_path / "table1.yaml"
    changed.write_text(text.replace("align: {config: experiments/configs/embedded/align.yaml, overrides: [steps=12,",
                                    "align: {config: experiments/configs/embedded/align.yaml, overrides: [steps=13,"))
    before, after = build_plan(load_matrix("table1"), "embedded"), build_plan(load_matrix(changed), "embedded")
    gone = {before.nodes[k].kind for k in set(before.nodes) - set(after.nodes)}
    assert gone == {"align", "rlvr", "eval"}  # the alignment, the RL runs after it and their evaluations
    moved = [before.nodes[k] for k in set(before.nodes) - set(after.nodes)]
    assert sum(n.kind == "rlvr" for n in moved) == 6 and sum(n.kind == "eval" for n in moved) == 8
    assert all("align-" in n.cfg.model.path for n in moved if n.kind == "rlvr")


def test_finished_stages_are_cached_and_estimates_add_up(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = build_plan(load_matrix(mx.CONFIG_DIR / "table1.yaml"), "smoke")
    world = next(n for n in plan.nodes.values() if n.kind == "world")
    base = next(n for n in plan.nodes.values() if n.kind == "base")
    Path(world.key).mkdir(parents=True)
    (Path(world.key) / "world.json").write_text("{}")
    (Path(base.key) / "checkpoints").mkdir(parents=True)
    text = describe_plan(plan)
    assert f"cached world       {Path(world.key).name}" in text
    assert f"resume base        {Path(base.key).name}" in text
    assert f"{len(plan.nodes) - 1} of {len(plan.nodes)} nodes to run" in text
    # at --jobs 2 the wall time is run_parallel's schedule replayed: at least the node time spread over two and the
    # longest chain, at most the node time
    found = re.search(r"estimated ([\d.]+) min of node time on this machine, about ([\d.]+) min of wall time "
                      r"at --jobs 2 \(longest chain ([\d.]+) min\)", describe_plan(plan, jobs=2))
    node_time, wall, chain = map(float, found.groups())
    assert max(node_time / 2, chain) - 0.11 <= wall <= node_time + 0.11 and chain < node_time


def test_the_defaults_m_base_runs_alone_on_every_core_and_its_estimate_says_so(tmp_path, monkeypatch):
    """Of the default's nodes only M's base (every seed's) is named to run alone; embedded-short keeps all its
    nodes at one thread beside another. An alone node's estimate is its step at the cores' thread count: from a
    finished run at that count, else the fallback measured alone."""
    monkeypatch.chdir(tmp_path)  # no finished runs: the fallback tables
    plan = build_plan(load_matrix("table1", "embedded", seeds=2), "embedded")
    alone = [n for n in plan.nodes.values() if n.run_alone]
    assert [(n.kind, n.preset, n.cfg.seed) for n in alone] == [("base", "embedded-l", 0), ("base", "embedded-l", 1)]
    assert not any(n.run_alone for n in build_plan(load_matrix("table1"), "embedded-short").nodes.values())
    base = alone[0]
    assert mx.estimate_seconds(base, {}, threads=2) == pytest.approx(0.26 * 1200)  # measured at two threads, alone
    assert mx.estimate_seconds(base, {}, threads=1) == pytest.approx(0.35 * 1200)
    work = mx._work("base", mx.config_to_dict(base.cfg))
    measured = {(*work, 2): 0.2, (*work, None): 0.5}
    assert mx.estimate_seconds(base, measured, threads=2) == pytest.approx(0.2 * 1200)
    assert mx.estimate_seconds(base, measured, threads=1) == pytest.approx(0.5 * 1200)  # a run that did not say


def test_a_stage_named_to_run_alone_must_be_a_stage(tmp_path):
    text = (mx.CONFIG_DIR / "table1.yaml").read_text()
    path = tmp_path / "table1.yaml"
    path.write_text(text.replace("run_alone: [base]", "run_alone: [bass]", 1))
    line = next(number for number, row in enumerate(path.read_text().splitlines(), 1) if "[bass]" in row)
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}:{line}.*run_alone\[0\].*one of base, sft.*'bass'"):
        load_matrix(path)


def test_unknown_matrix_key_names_the_file_and_field(tmp_path):
    bad = tmp_path / "m.yaml"
    bad.write_text("name: x\nkind: table1\npipelnes: [sft]\npresets: {}\n")
    with pytest.raises(ConfigError, match=r"m.yaml:3.*pipelnes.*pipelines"):
        load_matrix(bad)
    with pytest.raises(ConfigError, match="no matrix 'table9'"):
        load_matrix("table9")
    with pytest.raises(ConfigError, match="no preset 'huge'"):
        build_plan(load_matrix("table1"), "huge")


def test_ablations_are_single_settings_at_one_size():
    plan = build_plan(load_matrix("ablations"), "embedded")
    by_name = {c.labels["setting"]: c for c in plan.cells}
    assert set(by_name) == {"full", "dense_discriminator", "text_only_discriminator", "hard_routed_experts",
                            "no_sft", "no_alignment", "sft_small"}
    variants = {n.cfg.variant for n in plan.nodes.values() if n.kind == "disc_warmup"}
    assert variants == {"moe", "dense", "text_only", "hard_routed"}
    no_sft = plan.nodes[by_name["no_sft"].checkpoint.removesuffix("/model")]
    align = plan.nodes[no_sft.cfg.model.path.removesuffix("/model")]
    assert "base-" in align.cfg.model.path  # alignment starts from the base model
    assert any(n.kind == "sft" and n.cfg.max_records == 2000 for n in plan.nodes.values())
    # a base policy writes no format, so no-SFT's warm-up reads the world's fixed pairs; the others roll out
    from reports.tables import warmup_pairs

    pairs = {name: warmup_pairs(plan, cell) for name, cell in by_name.items()}
    assert pairs["no_sft"] == "fixed: warmup_pairs.jsonl" and pairs["no_alignment"] == "-"
    assert pairs["full"] == pairs["dense_discriminator"] == "policy rollouts"


def test_slurm_plan_writes_scripts_and_submits_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = build_plan(load_matrix(mx.CONFIG_DIR / "table1.yaml"), "full")
    assert "world" not in _kinds(plan) and "base" not in _kinds(plan)  # the full world starts from instruct paths
    scripts = slurm_scripts(plan, tmp_path / "slurm")
    assert len(scripts) == len(plan.nodes)
    align = next(p for p in scripts if "-align-" in p.name).read_text()
    assert "#SBATCH --gpus-per-node=8" in align
    assert "accelerate launch --config_file experiments/accelerate/fsdp-qwen3-vl-4b.yaml" in align  # sharded too
    rlvr = next(p for p in scripts if "-rlvr-" in p.name).read_text()
    assert "accelerate launch --config_file experiments/accelerate/fsdp-qwen3-vl-4b.yaml" in rlvr
    assert "# depends on (afterok): sft-" in align and "disc_warmup-" in align
    instruct_eval = next(p for p in scripts if p.name.startswith("000-")).read_text()
    assert "eval-node" in instruct_eval and "--checkpoint Qwen/Qwen3-VL-4B-Instruct" in instruct_eval


FULL_HUB_IDS = {
    ("model", "Qwen/Qwen3-VL-4B-Instruct"), ("model", "Qwen/Qwen3-VL-8B-Instruct"),
    ("model", "Qwen/Qwen3-VL-2B-Instruct"), ("dataset", "prism-vlm/gemini_public_mmr1"),
    ("dataset", "prism-vlm/gemini_distill"), ("dataset", "prism-vlm/qwen3_vl_moe_warmup_pairwise_120k"),
    ("dataset", "prism-vlm/rl_dataset:rl_training_data_5.9k.parquet"),
    ("dataset", "prism-vlm/rl_dataset:rl_training_data_filtered_2k.parquet"),
}


def test_the_full_preset_names_hub_ids_and_plans_offline(tmp_path, monkeypatch):
    """Planning touches no network: the plan names each Hub id and says whether the cache holds it."""
    monkeypatch.chdir(tmp_path)
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    plan = build_plan(load_matrix("table1"), "full")
    assert set(mx.hub_sources(plan)) == FULL_HUB_IDS
    sft = next(n for n in plan.nodes.values() if n.kind == "sft" and n.cfg.model.preset == "qwen3-vl-8b")
    assert sft.cfg.model.path == "Qwen/Qwen3-VL-8B-Instruct"
    assert sft.cfg.data_files == ["prism-vlm/gemini_public_mmr1", "prism-vlm/gemini_distill"]
    warmup = next(n for n in plan.nodes.values() if n.kind == "disc_warmup")
    assert warmup.cfg.model.path == "Qwen/Qwen3-VL-2B-Instruct"
    text = describe_plan(plan)
    assert f"Hub ids (8), resolved when their stage starts (cache {tmp_path / 'hf_home' / 'hub'}" in text
    for kind, spec in FULL_HUB_IDS:
        assert any(line.split()[:3] == [kind, spec, "not"] for line in text.splitlines()), spec
    ablations = build_plan(load_matrix("ablations"), "full")
    assert set(mx.hub_sources(ablations)) == FULL_HUB_IDS - {("model", "Qwen/Qwen3-VL-8B-Instruct")}
    assert "Hub ids" not in describe_plan(build_plan(load_matrix("table1"), "smoke"))


def test_a_released_checkpoint_starts_a_cell_as_its_instruct_model(tmp_path):
    """pipeline none (RL only) from the released SFT+PRISM checkpoint; prism (no SFT) from the released SFT one."""
    path = tmp_path / "released.yaml"
    path.write_text("""
name: released
kind: ablations
rl_algorithm: grpo
settings:
  - {name: released_prism_grpo, group: released, pipeline: none}
presets:
  full:
    discriminator_backbone: Qwen/Qwen3-VL-2B-Instruct
    sizes:
      4b:
        instruct: prism-vlm/Qwen3-VL-4B-Instruct-SFT-PRISM
        overrides: {rlvr: [model.preset=qwen3-vl-4b]}
    stages:
      rlvr: {overrides: ["data_files=[prism-vlm/rl_dataset:rl_training_data_filtered_2k.parquet]"]}
    eval: {suite: paper}
""")
    plan = build_plan(load_matrix(path), "full")
    assert [n.kind for n in plan.nodes.values()] == ["rlvr", "eval"]
    rlvr = next(iter(plan.nodes.values()))
    assert rlvr.cfg.model.path == "prism-vlm/Qwen3-VL-4B-Instruct-SFT-PRISM" and rlvr.deps == []


RELEASED_DISCRIMINATOR = """
name: released_disc
kind: ablations
rl_algorithm: grpo
settings:
  - {name: full, group: reference, pipeline: sft+prism}
  - {name: no_sft, group: stages, pipeline: prism}
presets:
  full:
    discriminator_backbone: Qwen/Qwen3-VL-2B-Instruct
    discriminator: prism-vlm/Qwen3-VL-2B-4X-Moe-warmup-120k
    sizes:
      4b: {instruct: Qwen/Qwen3-VL-4B-Instruct}
    stages:
      sft: {overrides: ["data_files=[prism-vlm/gemini_distill]"]}
      align: {overrides: ["data_files=[prism-vlm/rl_dataset:rl_training_data_5.9k.parquet]"]}
      rlvr: {overrides: ["data_files=[prism-vlm/rl_dataset:rl_training_data_filtered_2k.parquet]"]}
    eval: {suite: paper}
"""


def test_a_released_discriminator_starts_every_alignment_and_no_warmup_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    path = tmp_path / "released.yaml"
    path.write_text(RELEASED_DISCRIMINATOR)
    plan = build_plan(load_matrix(path), "full")
    assert _kinds(plan) == {"sft": 1, "align": 2, "rlvr": 2, "eval": 2}
    aligns = [node for node in plan.nodes.values() if node.kind == "align"]
    assert {node.cfg.discriminator.path for node in aligns} == {"prism-vlm/Qwen3-VL-2B-4X-Moe-warmup-120k"}
    assert sorted(len(node.deps) for node in aligns) == [0, 1]  # after its SFT, or straight from the instruct model
    assert re.search(r"model +prism-vlm/Qwen3-VL-2B-4X-Moe-warmup-120k +not cached", describe_plan(plan))
    # a setting's disc_warmup overrides would have nothing to change: refused at the line that holds them
    path.write_text(RELEASED_DISCRIMINATOR.replace(
        "pipeline: prism}", "pipeline: prism, overrides: {disc_warmup: [discriminator.variant=dense]}}"))
    with pytest.raises(ConfigError, match=r"released\.yaml:7: .*no disc_warmup runs to take these overrides"):
        build_plan(load_matrix(path), "full")


def test_seeds_run_every_stage_per_seed_after_one_shared_world_and_keep_seed_zero():
    one = build_plan(load_matrix("table1"), "embedded")
    three = build_plan(load_matrix("table1", "embedded", 3), "embedded")
    assert three.matrix.name == "table1-3seeds" and len(three.cells) == 3 * len(one.cells)
    assert _kinds(three) == {kind: 1 if kind == "world" else 3 * n for kind, n in _kinds(one).items()}
    assert set(one.nodes) < set(three.nodes)  # seed 0 is the one-seed run: nothing of it is recomputed
    assert sorted({c.labels["seed"] for c in three.cells}) == [0, 1, 2]
    with pytest.raises(ConfigError, match="--seeds"):
        load_matrix("table1", "embedded", 0)
    with pytest.raises(ConfigError, match="no preset"):
        load_matrix("table1", "huge", 2)


@pytest.mark.parametrize("matrix", ["table1", "ablations"])
def test_embedded_presets_compute_in_float32_but_m_sft_and_the_full_preset_in_bf16_over_float32_weights(matrix):
    """Every model keeps float32 master weights. The embedded and smoke presets compute in float32 but for M's SFT,
    `auto`: bf16 on cores that compute it natively (its step 1.29x there), float32 elsewhere, where bf16 matmuls
    are slow; the full preset keeps the default bf16 autocast."""
    for preset in ("embedded", "smoke", "full"):
        plan = build_plan(load_matrix(matrix), preset)
        models = [(node.kind, getattr(node.cfg, role)) for node in plan.nodes.values() if node.kind in mx.STAGES
                  for role in ("model", "policy", "discriminator") if hasattr(node.cfg, role)]
        assert models and {m.dtype for _, m in models} == {"float32"}, preset
        for kind, model in models:
            m_sft = kind == "sft" and model.preset in ("embedded-m", "embedded-l")
            expected = "bf16" if preset == "full" else "auto" if m_sft else "no"
            assert model.mixed_precision == expected, (preset, kind, model.preset)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [("base: [model.preset=embedded-s]", "base: [model.preset=embedded-xs]", "unknown model preset 'embedded-xs'"),
     ("base: [model.preset=embedded-s]", "base: [model.presett=embedded-s]", "field 'model.presett'")],
)
def test_plan_time_errors_name_the_matrix_line_preset_size_and_stage(tmp_path, old, new, expected):
    text = (Path(__file__).resolve().parents[2] / "experiments/configs/table1.yaml").read_text()
    assert old in text
    path = tmp_path / "bad.yaml"
    path.write_text(text.replace(old, new, 1))
    line = next(number for number, row in enumerate(path.read_text().splitlines(), 1) if new in row)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:{line}: matrix table1, preset smoke, size s, "
                                          rf"stage base: .*{re.escape(expected)}"):
        build_plan(load_matrix(path), "smoke")


MATRIX_WITH_MISTAKES = """\
name: bad
kind: ablations
settings:
  - name: plain
    pipeline: sft+prism
  - name: changed
    pipeline: sft
    overrides:
      rlvr: [steps=2, {rlvr_item}]
presets:
  embedded:
    world: []
    discriminator_backbone: {backbone}
    sizes:
      s:
        overrides:
          sft: [{sft_item}]
    stages:
      rlvr:
        config: {rlvr_config}
        overrides:
          - steps=3
          - {stage_item}
"""
GOOD = {"rlvr_item": "steps=2", "backbone": "s", "sft_item": "max_steps=2", "rlvr_config": "null",
        "stage_item": "steps=3"}


@pytest.mark.parametrize(
    ("mistake", "line", "expected"),
    [({"rlvr_item": "bogus_key=3"}, 9, "stage rlvr: override 'bogus_key=3': field 'bogus_key'"),
     ({"sft_item": "optim.lr=-1"}, 17, "stage sft: override 'optim.lr=-1': field 'optim.lr'"),
     ({"stage_item": "model.preset=embedded-xs"}, 23, "stage rlvr: unknown model preset 'embedded-xs'"),
     ({"rlvr_config": "experiments/configs/nope.yaml"}, 20, "nope.yaml: no such config file"),
     ({"backbone": "q"}, 13, "discriminator_backbone must name a size (s), got 'q'")],
)
def test_every_plan_time_error_points_at_its_line_of_the_matrix_file(tmp_path, mistake, line, expected):
    """An ablation setting's override, a size's override, a preset stage's override, its config path and the
    discriminator backbone: each error starts with the matrix file and the line the mistake is on."""
    good = tmp_path / "good.yaml"
    good.write_text(MATRIX_WITH_MISTAKES.format(**GOOD))
    assert build_plan(load_matrix(good), "embedded").cells  # without the mistake the file plans
    path = tmp_path / "bad.yaml"
    path.write_text(MATRIX_WITH_MISTAKES.format(**{**GOOD, **mistake}))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:{line}: .*{re.escape(expected)}"):
        build_plan(load_matrix(path), "embedded")
