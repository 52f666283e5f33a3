"""Experiment matrices: a YAML of cells -> a DAG of content-addressed stages -> plan, run (local or SLURM).

A matrix file (experiments/configs/table1.yaml, ablations.yaml) names its cells and, per preset (`embedded`,
`full`, `smoke`), where each stage's config comes from. Each cell is a chain of stages,

    [world] -> base (embedded) | instruct path (full) -> sft -> [disc_warmup -> align] -> rlvr(algorithm) -> eval

and every stage's directory is `outputs/stages/<stage>-<config hash>`, where the hash covers the resolved config,
whose model and data paths name the upstream directories. So cells share every stage they have in common, a
finished stage (DONE) is never recomputed, and a changed field reruns exactly the stages downstream of it.
Evaluations are cached by checkpoint hash (evaluation.runner); the matrix records each one in
outputs/matrix/evals/<key>.json for the reports.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Collection, Container, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from filelock import FileLock

from prism.config import (
    ConfigError,
    YamlMapping,
    check,
    check_range,
    check_types,
    config_hash,
    config_to_dict,
    load_config,
    read_yaml,
    write_config_yaml,
)
from prism.forkserver import ForkedProcess, ForkServer, die_with_parent, forkable
from prism.hub import cache_status, hub_cache_dir, parse_hub_ref
from prism.stages import STAGES
from prism.workers import available_cores, worker_env

CONFIG_DIR = Path(__file__).parent / "configs"
REPO_ROOT = Path(__file__).resolve().parent.parent  # stage YAMLs in matrix files are relative to it
STAGE_ROOT = Path("outputs/stages")
WORLD_ROOT = Path("outputs/worlds")
MATRIX_ROOT = Path("outputs/matrix")
RL_ALGORITHMS = ("grpo", "dapo", "gspo")

# Seconds per optimizer step on this 2-core CPU when no finished run says better (plan estimates only): the
# embedded table1 preset's stages at one thread beside another node, as `--jobs 2` runs them.
# Measured: the medians of the default table's run at 99d7800 (Intel Xeon with AMX, a fresh clone, idle).
FALLBACK_SECONDS_PER_STEP = {
    ("base", "embedded-s"): 0.16, ("sft", "embedded-s"): 0.27, ("disc_warmup", "embedded-s"): 0.8,
    ("align", "embedded-s"): 1.0, ("rlvr", "embedded-s"): 1.0,
    ("base", "embedded-m"): 0.32, ("sft", "embedded-m"): 0.53, ("disc_warmup", "embedded-m"): 0.8,
    ("align", "embedded-m"): 1.6, ("rlvr", "embedded-m"): 2.2,
    # embedded-l's base and SFT: the medians of the size-axis probe that chose it (two nodes at one thread each, the
    # Xeon host); alignment and RL: the one-seed default at c48aff3, node seconds over steps (27 s / 12, the median
    # RL node 70.5 s / 24)
    ("base", "embedded-l"): 0.35, ("sft", "embedded-l"): 0.56, ("disc_warmup", "embedded-l"): 0.8,
    ("align", "embedded-l"): 2.25, ("rlvr", "embedded-l"): 2.9,
}
# The same at two threads, alone (a node its size runs alone, `SizeSpec.run_alone`, or any at --jobs 1): embedded-l's
# float32 base 0.259 s a step against 0.396 at one thread (30 steps of the table's base config, each alone, the Xeon
# host). Where this has no entry, the one-thread figure stands.
FALLBACK_TWO_THREADS_SECONDS_PER_STEP = {("base", "embedded-l"): 0.26}


# ----------------------------------------------------------------------------------------------------
# The matrix file
# ----------------------------------------------------------------------------------------------------


@dataclass
class StageSpec:
    """Where one stage's config comes from: a stage YAML and dotted overrides laid on it."""

    config: str | None = field(default=None, metadata={"help": "Stage YAML (relative to the repo root); null = defaults."})
    overrides: list[str] = field(default_factory=list, metadata={"help": "Dotted key=value overrides."})

    def __post_init__(self) -> None:
        check_types(self)


@dataclass
class SizeSpec:
    """One model size: its instruct checkpoint (full world) and per-stage overrides."""

    instruct: str | None = field(
        default=None,
        metadata={"help": "Full world: the instruct checkpoint (the base row and SFT's start), a local folder or a "
                          "Hub model id (org/name[@revision], prism.hub), resolved when a stage starts; embedded: "
                          "null, the base stage builds it."},
    )
    overrides: dict[str, list[str]] = field(
        default_factory=dict, metadata={"help": "Stage name -> dotted overrides for this size."},
    )
    run_alone: list[str] = field(
        default_factory=list,
        metadata={"help": "Stages of this size that run by themselves on every core under `--jobs` > 1 (each "
                          "seed's), rather than at cores // jobs threads beside another node: for a node at the head "
                          "of the longest chain whose step scales with threads. Its thread count is part of how it "
                          "computes (float sums), so it is the plan's, never the timing's."},
    )

    def __post_init__(self) -> None:
        check_types(self)
        for stage in self.overrides:
            check(stage in STAGES, f"overrides.{stage}", f"one of {', '.join(STAGES)}", stage)
        for index, stage in enumerate(self.run_alone):
            check(stage in STAGES, f"run_alone[{index}]", f"one of {', '.join(STAGES)}", stage)


@dataclass
class SlurmSpec:
    """How `--launcher slurm` asks for resources (submitit's slurm_* parameters)."""

    partition: str | None = field(default=None, metadata={"help": "SLURM partition; null = the cluster default."})
    gpus_per_node: int = field(default=8, metadata={"help": "GPUs per stage job (count)."})
    cpus_per_task: int = field(default=64, metadata={"help": "CPU cores per stage job (count)."})
    timeout_min: int = field(default=2880, metadata={"help": "Wall-clock limit per stage job (minutes)."})
    signal_delay_s: int = field(
        default=300,
        metadata={"help": "Seconds before the time limit SLURM signals a job (submitit's slurm_signal_delay_s): the "
                          "stage saves a checkpoint at the end of its current optimizer step and the job requeues "
                          "itself; leave room for one step and one checkpoint (minimum 60)."},
    )
    accelerate_config: str | None = field(
        default=None, metadata={"help": "accelerate config file for multi-GPU stages (e.g. the FSDP presets)."},
    )

    def __post_init__(self) -> None:
        check_types(self)
        check_range(self, "signal_delay_s", low=60)


@dataclass
class EvalSpec:
    """How every cell's final checkpoint is evaluated."""

    suite: Literal["embedded", "paper"] = field(default="embedded", metadata={"help": "Benchmark suite."})
    limit: int | None = field(default=None, metadata={"help": "Samples per task; null = all."})
    overrides: list[str] = field(default_factory=list, metadata={"help": "Dotted EvalConfig overrides."})

    def __post_init__(self) -> None:
        check_types(self)


@dataclass
class PresetSpec:
    """One way to run the matrix: the world, sizes, seeds, stage configs, evaluation and launcher settings."""

    world: list[str] | None = field(
        default=None,
        metadata={"help": "Embedded world: WorldConfig overrides (its export is the first stage); null = the full "
                          "world, whose data paths are in the stage overrides."},
    )
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "Seeds; each seed runs every stage."})
    sizes: dict[str, SizeSpec] = field(default_factory=dict, metadata={"help": "Size name -> its settings."})
    discriminator_backbone: str = field(
        default="",
        metadata={"help": "Embedded: the size whose base model is upcycled into the discriminator. Full: the dense "
                          "backbone checkpoint, a folder or a Hub model id (published: Qwen/Qwen3-VL-2B-Instruct)."},
    )
    discriminator: str | None = field(
        default=None,
        metadata={"help": "A warmed-up discriminator that every alignment starts from, a folder or a Hub model id "
                          "(the released prism-vlm/Qwen3-VL-2B-4X-Moe-warmup-120k): no disc_warmup stage runs. "
                          "null = each cell warms its own up from discriminator_backbone."},
    )
    stages: dict[str, StageSpec] = field(default_factory=dict, metadata={"help": "Stage name -> config source."})
    eval: EvalSpec = field(default_factory=EvalSpec, metadata={"help": "Evaluation of every cell."})
    slurm: SlurmSpec = field(default_factory=SlurmSpec, metadata={"help": "Resources for --launcher slurm."})

    def __post_init__(self) -> None:
        check_types(self)
        check(bool(self.seeds), "seeds", "at least one seed", self.seeds)
        check(bool(self.sizes), "sizes", "at least one size", self.sizes)
        for stage in self.stages:
            check(stage in STAGES, f"stages.{stage}", f"one of {', '.join(STAGES)}", stage)


@dataclass
class SettingSpec:
    """One named cell of an ablation matrix: which stages it runs and what it changes."""

    name: str = field(default="", metadata={"help": "Row name (matches reference/paper_ablations.csv `setting`)."})
    group: str = field(default="", metadata={"help": "Row group in the table."})
    pipeline: Literal["sft", "sft+prism", "prism", "none"] = field(
        default="sft+prism", metadata={"help": "Stages before RL: sft, sft+prism, prism (no SFT) or none."},
    )
    overrides: dict[str, list[str]] = field(default_factory=dict, metadata={"help": "Stage name -> overrides."})

    def __post_init__(self) -> None:
        check_types(self)
        for stage in self.overrides:
            check(stage in STAGES, f"overrides.{stage}", f"one of {', '.join(STAGES)}", stage)


@dataclass
class MatrixConfig:
    """A matrix: table1 (sizes x pipelines x RL algorithms, plus the instruct row) or a list of settings."""

    name: str = field(default="", metadata={"help": "Matrix name (outputs/matrix/<name>-<preset>)."})
    kind: Literal["table1", "ablations"] = field(default="table1", metadata={"help": "How cells are laid out."})
    pipelines: list[Literal["sft", "sft+prism"]] = field(
        default_factory=lambda: ["sft", "sft+prism"], metadata={"help": "table1: pipelines before RL."},
    )
    rl: list[Literal["none", "grpo", "dapo", "gspo"]] = field(
        default_factory=lambda: ["none", "grpo", "dapo", "gspo"], metadata={"help": "table1: RL stages (none = no RL)."},
    )
    instruct_row: bool = field(default=True, metadata={"help": "table1: evaluate the instruct (base) model too."})
    size: str = field(default="", metadata={"help": "ablations: the one size they run at; empty = each preset's first."})
    rl_algorithm: Literal["grpo", "dapo", "gspo"] = field(default="grpo", metadata={"help": "ablations: the RL stage."})
    settings: list[SettingSpec] = field(default_factory=list, metadata={"help": "ablations: the rows."})
    presets: dict[str, PresetSpec] = field(default_factory=dict, metadata={"help": "Preset name -> settings."})
    # The file it was read from, with the line of every key: plan-time errors point into it.
    source: YamlMapping | None = field(default=None, init=False, repr=False, compare=False, metadata={"hash": False})

    def __post_init__(self) -> None:
        check_types(self)
        check(bool(self.name), "name", "a non-empty string", self.name)
        check(bool(self.presets), "presets", "at least one preset", self.presets)
        if self.kind == "ablations":
            check(bool(self.settings), "settings", "at least one setting for kind ablations", self.settings)
            for preset_name, preset in self.presets.items():
                check(not self.size or self.size in preset.sizes, "size",
                      f"a size of preset {preset_name} ({', '.join(preset.sizes)})", self.size)


def load_named(config_class: type, name_or_path: str | Path, folder: Path, what: str) -> Any:
    """A bare name reads <folder>/<name>.yaml; a path is read as is. A missing file lists the known names."""
    path = Path(name_or_path)
    if not path.suffix:
        path = folder / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.yaml"))
        raise ConfigError(f"no {what} {name_or_path!r}: {path} does not exist (known: {', '.join(known)})")
    source = read_yaml(path)
    config = load_config(config_class, data=source)
    if any(f.name == "source" and not f.init for f in fields(config_class)):
        config.source = source
    return config


def preset_spec(matrix: MatrixConfig, preset: str | None) -> PresetSpec:
    if preset not in matrix.presets:
        raise ConfigError(f"matrix {matrix.name} has no preset {preset!r} (presets: {', '.join(matrix.presets)})")
    return matrix.presets[preset]


def load_matrix(name_or_path: str | Path, preset: str | None = None, seeds: int | None = None) -> MatrixConfig:
    """`table1` -> experiments/configs/table1.yaml; a path is read as is. `seeds` (with `preset`): run that preset
    with seeds 0..seeds-1 instead of its own; the matrix is then named `<name>-<seeds>seeds` (its report and
    timing record), while every node keeps its content address, so seed 0 is shared with a one-seed run."""
    matrix = load_named(MatrixConfig, name_or_path, CONFIG_DIR, "matrix")
    if seeds is None:
        return matrix
    if not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"--seeds: expected a positive number of seeds, got {seeds!r}")
    presets = {**matrix.presets, preset: replace(preset_spec(matrix, preset), seeds=list(range(seeds)))}
    renamed = replace(matrix, name=f"{matrix.name}-{seeds}seeds", presets=presets)
    renamed.source = matrix.source
    return renamed


def matrix_line(matrix: MatrixConfig, *paths: str) -> str:
    """`file:line ` of the first key path the matrix file has (e.g. `presets.embedded.stages.sft`), else ''."""
    if matrix.source is None:
        return ""
    where = next((matrix.source.location(path) for path in paths if matrix.source.location(path)), None)
    return f"{where}: " if where else ""


def override_paths(matrix: MatrixConfig, error: str, lists: list[str]) -> list[str]:
    """The key paths (`...overrides[2]`) of the override items among `lists` an error message is about: the
    item it quotes (`override 'optim.lr=-1'`), else the items whose value it quotes (`'embedded-xs'`)."""
    items = [(f"{path}[{index}]", text) for path in lists
             for index, text in enumerate(_lookup(matrix.source, path) or []) if isinstance(text, str)]
    quoted = [path for path, text in items if f"override {text!r}" in error]
    if quoted or "override '" in error:  # an override not from the matrix file (a sweep's, the plan's wiring): none
        return quoted
    return [path for path, text in items if "=" in text and repr(text.split("=", 1)[1].strip()) in error]


def _lookup(tree: Any, path: str) -> Any:
    """The value at a key path of the loader's form (`settings[1].overrides.rlvr`), None where there is none."""
    for part in path.split("."):
        key, *indexes = part.replace("]", "").split("[")
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
        for index in map(int, indexes):
            if not isinstance(tree, list) or index >= len(tree):
                return None
            tree = tree[index]
    return tree


# ----------------------------------------------------------------------------------------------------
# Cells and the stage DAG
# ----------------------------------------------------------------------------------------------------


@dataclass
class Node:
    """One unit of work: a stage run, the world export, or an evaluation. `key` is its directory or record."""

    kind: str  # world | base | sft | disc_warmup | align | rlvr | eval
    key: str
    command: list[str]
    deps: list[str]
    cfg: Any = None  # the resolved stage config (stage nodes)
    steps: int = 0
    preset: str = ""  # model preset (for estimates)
    done_marker: Path | None = None
    run_alone: bool = False  # by itself on every core under --jobs > 1 (SizeSpec.run_alone)

    @property
    def done(self) -> bool:
        return self.done_marker is not None and self.done_marker.is_file()

    @property
    def started(self) -> bool:
        return self.kind in STAGES and (Path(self.key) / "checkpoints").is_dir()


@dataclass
class Cell:
    """One row of a table: its labels and the node whose checkpoint it evaluates."""

    labels: dict[str, Any]
    checkpoint: str  # model folder evaluated
    eval_key: str  # the eval node


@dataclass
class Plan:
    matrix: MatrixConfig
    preset_name: str
    nodes: dict[str, Node]  # insertion order is a topological order
    cells: list[Cell]

    @property
    def root(self) -> Path:
        return MATRIX_ROOT / f"{self.matrix.name}-{self.preset_name}"


def _stage_config(stage: str, spec: StageSpec | None, *override_lists: list[str]) -> Any:
    config_class, _ = STAGES[stage]
    path = REPO_ROOT / spec.config if spec and spec.config else None
    overrides = [*(spec.overrides if spec else []), *(o for group in override_lists for o in group)]
    return load_config(config_class, path, overrides)


def _steps(stage: str, cfg: Any) -> int:
    if stage in ("align", "rlvr"):
        return cfg.steps
    return cfg.max_steps or 0


class PlanBuilder:
    """Adds nodes once (content-addressed keys) in dependency order."""

    def __init__(self, matrix: MatrixConfig, preset_name: str):
        self.matrix, self.preset_name, self.preset = matrix, preset_name, preset_spec(matrix, preset_name)
        self.nodes: dict[str, Node] = {}
        self.world = self._world()

    def _add(self, node: Node) -> str:
        self.nodes.setdefault(node.key, node)
        return node.key

    def _world(self) -> str | None:
        if self.preset.world is None:
            return None
        from prism.data.world import WorldConfig

        cfg = load_config(WorldConfig, None, self.preset.world)
        out = WORLD_ROOT / f"world-{config_hash(cfg)}"
        command = [sys.executable, "-m", "prism.cli", "world", "export", "--out", str(out), *self.preset.world]
        return self._add(Node("world", str(out), command, [], cfg=cfg, done_marker=out / "world.json"))

    def stage(self, stage: str, size: str, seed: int, wiring: list[str], deps: list[str],
              extra: dict[str, list[str]] | None = None, extra_origin: str | None = None) -> str:
        size_spec = self.preset.sizes[size]
        spec = self.preset.stages.get(stage)
        if spec is not None and self.world is not None:  # `{world}` in an override names the world export
            spec = replace(spec, overrides=[o.replace("{world}", self.world) for o in spec.overrides])
        from prism.models import ModelError, get_preset

        where = f"matrix {self.matrix.name}, preset {self.preset_name}, size {size}, stage {stage}"
        try:
            cfg = _stage_config(stage, spec, size_spec.overrides.get(stage, []), (extra or {}).get(stage, []), wiring,
                                [f"seed={seed}"])
            for role in ("model", "policy"):  # an unknown model preset is a plan-time error, not a run-time one
                section = getattr(cfg, role, None)
                if section is not None:
                    get_preset(section.preset)
        except (ConfigError, ModelError) as error:
            raise ConfigError(f"{self.line_of(stage, size, extra_origin, str(error))}{where}: {error}") from None
        out = STAGE_ROOT / f"{stage}-{config_hash(cfg)}"
        # Cells share stages, so a stage's tracker run is grouped by the matrix run rather than by one cell.
        cfg = replace(cfg, output_dir=str(out), tracking_group=f"{self.matrix.name}-{self.preset_name}")
        config_file = MATRIX_ROOT / "configs" / f"{out.name}.yaml"
        command = [sys.executable, "-m", "prism.cli", "train", stage, "--config", str(config_file)]
        node = Node(stage, str(out), command, deps, cfg=cfg, steps=_steps(stage, cfg),
                    preset=getattr(getattr(cfg, "model", None), "preset", ""), done_marker=out / "DONE",
                    run_alone=stage in size_spec.run_alone)
        return self._add(node)

    def line_of(self, stage: str, size: str, extra_origin: str | None, error: str) -> str:
        """Where in the matrix file a stage's config error comes from: the override of the file it names, else the
        stage's config path it names; '' when it comes from elsewhere (a sweep's override, the stage YAML's own
        file:line, the plan's wiring), which the message names itself."""
        preset = f"presets.{self.preset_name}"
        lists = [f"{preset}.stages.{stage}.overrides", f"{preset}.sizes.{size}.overrides.{stage}",
                 *([f"{extra_origin}.{stage}"] if extra_origin else [])]
        spec = self.preset.stages.get(stage)
        config = [f"{preset}.stages.{stage}.config"] if spec and spec.config and spec.config in error else []
        return matrix_line(self.matrix, *override_paths(self.matrix, error, lists), *config)

    def eval(self, checkpoint: str, deps: list[str]) -> str:
        spec = self.preset.eval
        world = ["--world", self.world] if self.world and spec.suite == "embedded" else []
        limit = ["--limit", str(spec.limit)] if spec.limit else []
        identity = json.dumps([checkpoint, spec.suite, spec.limit, spec.overrides, self.world], sort_keys=True)
        key = str(MATRIX_ROOT / "evals" / f"{hashlib.sha256(identity.encode()).hexdigest()[:16]}.json")
        command = [sys.executable, "-m", "experiments.matrix", "eval-node", "--record", key, "--checkpoint", checkpoint,
                   "--suite", spec.suite, *limit, *world, *spec.overrides]
        node = Node("eval", key, command, deps + ([self.world] if self.world else []), done_marker=Path(key))
        node.cfg = {"checkpoint": checkpoint, "suite": spec.suite, "limit": spec.limit,
                    "world": self.world if spec.suite == "embedded" else None, "overrides": spec.overrides}
        return self._add(node)


FILES = {"base": "base.json", "sft": "sft.json", "teacher": "teacher.parquet", "rl": "rl.parquet",
         "warmup": "warmup_pairs.jsonl"}


def _world_files(builder: PlanBuilder, *names: str) -> list[str]:
    return [] if builder.world is None else [f"{builder.world}/{FILES[n]}" for n in names]


def _list(values: list[str]) -> str:
    return "[" + ",".join(values) + "]"


def add_chain(builder: PlanBuilder, size: str, seed: int, pipeline: str, rl: str,
           extra: dict[str, list[str]] | None = None, extra_origin: str | None = None) -> tuple[str, list[str]]:
    """Add the stages of one cell; returns (model folder to evaluate, its node keys). `extra` are the cell's own
    stage overrides, read from key path `extra_origin` of the matrix file (`settings[2].overrides`)."""
    preset = builder.preset
    world = [builder.world] if builder.world else []

    def start(size_name: str) -> tuple[str, list[str]]:  # the instruct model of a size
        instruct = preset.sizes[size_name].instruct
        if instruct is not None:
            return instruct, []
        if builder.world is None:
            where = matrix_line(builder.matrix, f"presets.{builder.preset_name}.sizes.{size_name}")
            raise ConfigError(f"{where}preset {builder.preset_name}: size {size_name} has no instruct path and no "
                              "world to build a base model from")
        key = builder.stage("base", size_name, seed, [
            f"model.processor_path={builder.world}/tokenizer", f"data_files={_list(_world_files(builder, 'base'))}"],
            world, extra, extra_origin)
        return f"{key}/model", [key]

    model, deps = start(size)
    if pipeline in ("sft", "sft+prism"):
        data = _world_files(builder, "sft")
        key = builder.stage("sft", size, seed, [f"model.path={model}", *([f"data_files={_list(data)}"] if data else [])],
                            deps + world, extra, extra_origin)
        model, deps = f"{key}/model", [key]
    if pipeline in ("sft+prism", "prism"):
        teacher = _world_files(builder, "teacher")
        if preset.discriminator:  # one warmed-up discriminator (the released one) starts every alignment
            if extra and "disc_warmup" in extra:
                where = matrix_line(builder.matrix, *([f"{extra_origin}.disc_warmup"] if extra_origin else []))
                raise ConfigError(f"{where}preset {builder.preset_name} starts alignment from discriminator "
                                  f"{preset.discriminator}, so no disc_warmup runs to take these overrides: drop "
                                  "them, or the preset's discriminator")
            disc, disc_deps = preset.discriminator, []
        else:
            backbone = preset.discriminator_backbone
            if builder.world is not None:  # embedded: upcycle that size's base model (same seed)
                if backbone not in preset.sizes:
                    where = matrix_line(builder.matrix, f"presets.{builder.preset_name}.discriminator_backbone",
                                        f"presets.{builder.preset_name}")
                    raise ConfigError(f"{where}preset {builder.preset_name}: discriminator_backbone must name a size "
                                      f"({', '.join(preset.sizes)}), got {backbone!r}")
                backbone, backbone_deps = start(backbone)
            else:
                backbone_deps = []
            # Without SFT the policy never writes the format, so its rollouts make no pair: the warm-up reads the
            # world's fixed teacher-vs-public pairs instead, as the published no-SFT ablation did.
            fixed = _world_files(builder, "warmup") if pipeline == "prism" else []
            key = builder.stage("disc_warmup", size, seed, [
                f"model.path={backbone}", f"policy.path={model}",
                *([f"teacher_files={_list(teacher)}"] if teacher else []),
                *([f"data_files={_list(fixed)}"] if fixed else [])], deps + backbone_deps + world, extra, extra_origin)
            disc, disc_deps = f"{key}/model", [key]
        key = builder.stage("align", size, seed, [
            f"model.path={model}", f"discriminator.path={disc}",
            *([f"data_files={_list(teacher)}"] if teacher else [])], deps + disc_deps + world, extra, extra_origin)
        model, deps = f"{key}/model", [key]
    if rl != "none":
        data = _world_files(builder, "rl")
        key = builder.stage("rlvr", size, seed, [
            f"algorithm={rl}", f"model.path={model}", *([f"data_files={_list(data)}"] if data else [])],
            deps + world, extra, extra_origin)
        model, deps = f"{key}/model", [key]
    return model, deps


def build_plan(matrix: MatrixConfig, preset_name: str) -> Plan:
    builder = PlanBuilder(matrix, preset_name)
    preset = builder.preset
    cells: list[Cell] = []

    def add_cell(labels: dict[str, Any], pipeline: str, rl: str, size: str, seed: int,
                 extra: dict[str, list[str]] | None = None, extra_origin: str | None = None) -> None:
        model, deps = add_chain(builder, size, seed, pipeline, rl, extra, extra_origin)
        cells.append(Cell(labels, model, builder.eval(model, deps)))

    for seed in preset.seeds:
        if matrix.kind == "table1":
            for size in preset.sizes:
                if matrix.instruct_row:
                    add_cell({"size": size, "pipeline": "instruct", "rl": "none", "seed": seed}, "none", "none", size, seed)
                for pipeline, rl in itertools.product(matrix.pipelines, matrix.rl):
                    add_cell({"size": size, "pipeline": pipeline, "rl": rl, "seed": seed}, pipeline, rl, size, seed)
        else:
            size = matrix.size or next(iter(preset.sizes))
            for index, setting in enumerate(matrix.settings):
                add_cell({"size": size, "setting": setting.name, "group": setting.group, "seed": seed},
                         setting.pipeline, matrix.rl_algorithm, size, seed, setting.overrides, f"settings[{index}].overrides")
    return Plan(matrix, preset_name, builder.nodes, cells)


# ----------------------------------------------------------------------------------------------------
# Plan: what is cached, what will run, how long it should take
# ----------------------------------------------------------------------------------------------------


def _work(stage: str, config: dict) -> tuple:
    """What one step's cost depends on besides the model: (stage, model preset, batch shape)."""
    shape = {"base": ("per_device_batch_size",), "sft": ("per_device_batch_size",),
             "disc_warmup": ("effective_batch_size",),
             "align": ("rollout.prompts_per_step", "rollout.rollouts_per_prompt", "rollout.max_new_tokens"),
             "rlvr": ("rollout.prompts_per_step", "rollout.rollouts_per_prompt", "rollout.max_new_tokens")}[stage]

    def value(path: str):
        node = config
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    return (stage, config.get("model", {}).get("preset", ""), *(value(k) for k in shape))


def measured_seconds_per_step() -> dict[tuple, float]:
    """Median seconds per step of finished stage runs under outputs/stages, by the work a step does and the threads
    it ran on (None for a manifest that does not say)."""
    found: dict[tuple, list[float]] = {}
    for manifest in STAGE_ROOT.glob("*/manifest.json"):
        run_dir = manifest.parent
        stage = run_dir.name.rsplit("-", 1)[0]
        metrics = run_dir / "metrics.jsonl"
        if stage not in STAGES or not metrics.is_file():
            continue
        recorded = json.loads(manifest.read_text(encoding="utf-8"))
        config, threads = recorded["config"], recorded.get("host", {}).get("threads")
        rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
        values = [r.get("seconds_step", r.get("seconds")) for r in rows[1:]]
        values = [v for v in values if isinstance(v, (int, float))]
        if values:
            found.setdefault((*_work(stage, config), threads), []).append(statistics.median(values))
    return {key: statistics.median(values) for key, values in found.items()}


def estimate_seconds(node: Node, measured: dict[tuple, float], threads: int = 1) -> float | None:
    """A node's seconds at `threads` threads: its finished runs' median step at that count (else at an unrecorded
    count) times its steps, else the fallback tables'."""
    if node.kind == "world":
        return 20.0  # the default world: 14-16 s
    if node.kind == "eval":  # model load + generation, measured on the embedded suite (S and M); none for paper
        if node.cfg is None or node.cfg["suite"] != "embedded":
            return None
        # the default table's 26 evaluations of 1,200 items at one thread each (99d7800): 7-24 s, 11.8 s on average
        return 2.0 + 0.0125 * 6 * (node.cfg["limit"] or 200)
    work = _work(node.kind, config_to_dict(node.cfg))
    per_step = measured.get((*work, threads), measured.get((*work, None)))
    if per_step is None and threads > 1:
        per_step = FALLBACK_TWO_THREADS_SECONDS_PER_STEP.get((node.kind, node.preset))
    if per_step is None:
        per_step = FALLBACK_SECONDS_PER_STEP.get((node.kind, node.preset))
    if per_step is None or not node.steps:
        return None
    return per_step * node.steps


def _short(key: str) -> str:
    return Path(key).name


def describe_plan(plan: Plan, jobs: int = 1) -> str:
    """One line per node (cached, resume or run, with its estimate), then the estimate of the whole run: the node
    time, and with `jobs` > 1 the wall time `run_parallel` starts from (its schedule replayed on the estimates,
    `seconds_left`) and the longest chain of nodes."""
    measured = measured_seconds_per_step()
    alone = alone_nodes(plan.nodes, jobs)
    threads = node_threads(plan.nodes, alone, jobs, available_cores())
    lines = [f"matrix {plan.matrix.name}, preset {plan.preset_name}: {len(plan.cells)} cells, {len(plan.nodes)} nodes"]
    estimates: dict[str, float | None] = {}  # per node still to run
    for index, node in enumerate(plan.nodes.values(), start=1):
        status = "cached" if node.done else ("resume" if node.started else "run")
        if not node.done:
            estimates[node.key] = estimate_seconds(node, measured, threads[node.key])
        seconds = estimates.get(node.key)
        deps = ", ".join(_short(d) for d in node.deps) or "-"
        estimate = "" if node.done else (f"~{seconds / 60:.1f} min" if seconds is not None else "~? min")
        lines.append(f"  [{index:2d}] {status:6s} {node.kind:11s} {_short(node.key):28s} {estimate:>10s}  <- {deps}")
    to_run, total = len(estimates), sum(seconds or 0.0 for seconds in estimates.values())
    unknown = sum(seconds is None for seconds in estimates.values())
    if unknown and not total:
        estimate = "no estimate (no run of these stages was measured on this machine)"
    else:
        estimate = f"estimated {total / 60:.1f} min{' of node time' if jobs > 1 else ''} on this machine" + (
            f" (+ {unknown} without an estimate)" if unknown else "")
        if jobs > 1:
            chain = critical_path_seconds({key: plan.nodes[key] for key in estimates}, measured, threads)
            wall = seconds_left({key: seconds or 0.0 for key, seconds in estimates.items()}, chain, {}, jobs,
                                {key: plan.nodes[key].deps for key in estimates}, alone)
            estimate += (f", about {wall / 60:.1f} min of wall time at --jobs {jobs} "
                         f"(longest chain {max(chain.values(), default=0.0) / 60:.1f} min)")
    lines.append(f"{to_run} of {len(plan.nodes)} nodes to run, {estimate}")
    sources = hub_sources(plan)
    if sources:  # looked up in the cache only: planning never touches the network
        lines.append(f"Hub ids ({len(sources)}), resolved when their stage starts (cache {hub_cache_dir()}; "
                     "offline, each needs a cached or local copy):")
        width = max(len(spec) for _, spec in sources)
        lines += [f"  {kind:8s} {spec:{width}s}  {cache_status(spec, kind)}" for kind, spec in sources]
    return "\n".join(lines)


def hub_sources(plan: Plan) -> list[tuple[str, str]]:
    """(repo type, Hub id) of every Hub id the plan's stages and evaluations name, in plan order."""
    found: dict[tuple[str, str], None] = {}
    for node in plan.nodes.values():
        if node.kind == "eval":
            specs = [("model", node.cfg["checkpoint"])]
        elif node.kind in STAGES:
            specs = [("model", getattr(getattr(node.cfg, role, None), key, None))
                     for role in ("model", "policy", "discriminator") for key in ("path", "processor_path")]
            specs += [("dataset", spec) for name in ("data_files", "teacher_files")
                      for spec in getattr(node.cfg, name, None) or []]
        else:
            continue
        for kind, spec in specs:
            if parse_hub_ref(spec) is not None:
                found.setdefault((kind, spec))
    return list(found)


# ----------------------------------------------------------------------------------------------------
# Run: local (one node after another) or SLURM (submitit, dependencies as job dependencies)
# ----------------------------------------------------------------------------------------------------

# What every node process would import for itself (~4.5 s of CPU each); the fork server imports it once.
NODE_PRELOAD = ("torch", "transformers", "prism.data.export", "prism.stages.sft", "prism.stages.disc_warmup",
                "prism.stages.align", "prism.stages.rlvr", "evaluation.runner", "lmms_eval.evaluator")


def write_stage_configs(plan: Plan) -> None:
    for node in plan.nodes.values():
        if node.cfg is not None and node.kind in STAGES:
            path = Path(node.command[-1])
            path.parent.mkdir(parents=True, exist_ok=True)
            write_config_yaml(node.cfg, path)


def _format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"


def run_inline(node: Node) -> None:
    """Run one node in this process (what its command would do)."""
    if node.kind == "world":
        from prism.data.export import export_world
        from prism.runtime import split_progress

        export_world(node.cfg, Path(node.key), progress=split_progress())
    elif node.kind == "eval":
        eval_node(Path(node.key), **node.cfg)
    else:
        STAGES[node.kind][1](node.cfg)


def run_local(plan: Plan, log=print, isolate: bool = False, jobs: int = 1) -> dict[str, float]:
    """Run every unfinished node; returns seconds per node run. `jobs` > 1 runs independent ready nodes at once,
    each in its own process (`run_parallel`); otherwise one after another, in this process or, with `isolate`,
    each in its own."""
    write_stage_configs(plan)
    if jobs > 1:
        return run_parallel(plan, jobs, log)
    measured = measured_seconds_per_step()
    pending = [n for n in plan.nodes.values() if not n.done]
    cores = available_cores()
    remaining = sum(estimate_seconds(n, measured, cores) or 0.0 for n in pending)
    timings: dict[str, float] = {}
    started_all = time.perf_counter()
    env = worker_env(cores, shares_cores=False)  # one node at a time: each has the cores to itself
    for index, node in enumerate(pending, start=1):
        estimate = estimate_seconds(node, measured, cores) or 0.0
        log(f"[{index}/{len(pending)}] {node.kind} {_short(node.key)}: "
            f"{'resuming' if node.started else 'running'} (elapsed {_format_duration(time.perf_counter() - started_all)}, "
            f"~{_format_duration(remaining)} left)")
        started = time.perf_counter()
        with node_lock(node.key):
            if isolate:
                result = subprocess.run(node.command, env=env, check=False)
                if result.returncode != 0:
                    raise MatrixError(f"{node.kind} {node.key} failed (exit {result.returncode}); command: "
                                      f"{shlex.join(node.command)}. Fix it and run again: finished nodes are kept")
            elif not node.done:  # another launcher may have finished it while we waited for the lock
                run_inline(node)
        if not node.done:
            raise MatrixError(f"{node.kind} {node.key} exited 0 but left no {node.done_marker}")
        timings[node.key] = time.perf_counter() - started
        remaining = max(0.0, remaining - estimate)
    return timings


@contextlib.contextmanager
def node_lock(key: str):
    """An exclusive lock per node (`<key>.lock`): two launchers (matrix runs, sweep workers) never run one node at
    once; the second waits, then finds it done."""
    path = Path(f"{key}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path):
        yield


def node_log(node: Node) -> Path:
    """Where a node's output goes when it runs in its own process: its stage directory, or beside its record."""
    return Path(node.key) / "log.txt" if node.kind in STAGES else Path(f"{node.key}.log")


def critical_path_seconds(pending: dict[str, Node], measured: dict[tuple, float],
                          threads: Mapping[str, int] | None = None) -> dict[str, float]:
    """Per pending node: its estimate (at its `threads`, default 1) plus the longest estimated chain of pending
    nodes that waits on it. Ready nodes start longest-chain first, so the critical path never waits behind short
    side work."""
    children: dict[str, list[str]] = {key: [] for key in pending}
    for key, node in pending.items():
        for dep in node.deps:
            if dep in children:
                children[dep].append(key)
    chain: dict[str, float] = {}
    for key in reversed(list(pending)):  # plan order is topological: children are done first
        own = estimate_seconds(pending[key], measured, (threads or {}).get(key, 1)) or 1.0
        chain[key] = own + max((chain[child] for child in children[key]), default=0.0)
    return chain


def nodes_to_start(waiting: Sequence[str], deps: Mapping[str, Sequence[str]], done: set[str],
                   unfinished: Container[str], chain: Mapping[str, float], running: Collection[str], jobs: int,
                   alone: Container[str] = ()) -> list[str]:
    """`run_parallel`'s rule, which `seconds_left` replays: of the `waiting` nodes, those whose `deps` among the
    `unfinished` nodes are all `done`, longest chain first, while fewer than `jobs` run. A node in `alone` runs by
    itself: it starts only when nothing runs, nothing starts beside it, and no node behind it in the order
    overtakes it while it waits for the running ones to end."""
    if any(key in alone for key in running):
        return []
    ready = [key for key in waiting if all(dep in done or dep not in unfinished for dep in deps.get(key, ()))]
    chosen: list[str] = []
    for key in sorted(ready, key=lambda k: -chain[k]):
        if len(running) + len(chosen) >= jobs:
            break
        if key in alone:
            return chosen if running or chosen else [key]
        chosen.append(key)
    return chosen


def seconds_left(estimates: dict[str, float], chain: dict[str, float], ran: dict[str, float], jobs: int,
                 deps: Mapping[str, Sequence[str]] | None = None, alone: Container[str] = ()) -> float:
    """What is left of a run: `run_parallel`'s schedule replayed on the estimates. Ready nodes start by its rule
    (`nodes_to_start`: longest chain first, `jobs` at a time, once their `deps` among the unfinished nodes are
    done, the `alone` ones by themselves); a running node (in `ran`) keeps its slot for its estimate less the
    seconds it has run (not below 0), so the estimate falls while it runs. A replay, not the larger of the work
    over the jobs and the longest chain: after one long node, the side work that waited on it queues for the slots
    (the default table's RL runs and evaluations after M's SFT)."""
    deps = deps or {}
    remaining = {key: max(0.0, seconds - ran.get(key, 0.0)) for key, seconds in estimates.items()}
    ends = {key: remaining[key] for key in ran if key in remaining}  # running: when each ends
    waiting, done, now = [key for key in estimates if key not in ends], set(), 0.0
    while waiting or ends:
        for key in nodes_to_start(waiting, deps, done, estimates, chain, list(ends), jobs, alone):
            ends[key] = now + remaining[key]
            waiting.remove(key)
        if not ends:  # cannot happen: a plan is acyclic, so some waiting node is ready once the running ones end
            raise MatrixError("no node can start: a dependency is missing from the plan")
        key = min(ends, key=ends.__getitem__)
        now = ends.pop(key)
        done.add(key)
    return now


def exclusive_nodes(nodes: dict[str, Node]) -> set[str]:
    """The nodes that never run beside another: every other node of the plan is upstream or downstream of them
    (the world export; an ablation matrix's one base model). A property of the whole plan, finished nodes
    included, so a resumed run gives a node the threads the first run gave it."""
    upstream: dict[str, set[str]] = {}
    for key, node in nodes.items():  # insertion order is topological
        upstream[key] = set()
        for dep in node.deps:
            if dep in nodes:
                upstream[key] |= {dep} | upstream[dep]
    downstream: dict[str, int] = dict.fromkeys(nodes, 0)
    for ancestors in upstream.values():
        for key in ancestors:
            downstream[key] += 1
    return {key for key in nodes if len(upstream[key]) + downstream[key] == len(nodes) - 1}


def alone_nodes(nodes: dict[str, Node], jobs: int) -> set[str]:
    """The nodes that run by themselves on every core under `jobs` > 1: those that never run beside another
    (`exclusive_nodes`) and those their size names (`SizeSpec.run_alone`)."""
    if jobs <= 1:
        return set()
    return exclusive_nodes(nodes) | {key for key, node in nodes.items() if node.run_alone}


def node_threads(nodes: dict[str, Node], alone: Container[str], jobs: int, cores: int) -> dict[str, int]:
    """Each node's thread count, from the plan alone: every core for a node `alone` (`alone_nodes`) or for all at
    `jobs` 1, cores // jobs for the others."""
    return {key: cores if jobs <= 1 or key in alone else max(1, cores // jobs) for key in nodes}


def run_parallel(plan: Plan, jobs: int, log=print, cores: int | None = None,
                 preload: Sequence[str] = NODE_PRELOAD) -> dict[str, float]:
    """Run the unfinished nodes `jobs` at a time, each node in its own process with `cores // jobs` threads
    (`worker_env`: OMP_NUM_THREADS, which torch reads at start, idle OpenMP threads that sleep, and the allocator
    settings), or all the cores, spinning, for a node that never runs beside another (`exclusive_nodes`), and its
    output in `node_log(node)`; a node its size names in `run_alone` also runs by itself on every core
    (`nodes_to_start`). A node's thread count follows from the plan alone, not from timing, so a rerun computes it
    alike. The nodes that share the cores fork from one process that imported `preload` once (`prism.forkserver`,
    started with their environment); a node alone starts afresh. One line per start and finish, with the running
    estimate of what is left. A node that fails stops the run: the others are stopped too (they resume from their
    last checkpoints next time), and MatrixError names the node and its log."""
    cores = cores or available_cores()
    alone = alone_nodes(plan.nodes, jobs)
    threads_of = node_threads(plan.nodes, alone, jobs, cores)
    shared_env = worker_env(max(1, cores // jobs), shares_cores=True)  # the fork server's too: its children inherit it

    def node_env(key: str) -> tuple[dict[str, str], int]:
        if key in alone:
            return worker_env(threads_of[key], shares_cores=False), threads_of[key]
        return shared_env, threads_of[key]

    measured = measured_seconds_per_step()
    pending = {n.key: n for n in plan.nodes.values() if not n.done}
    # started now, so that its imports overlap the first nodes; Linux only (macOS's system libraries are not
    # fork-safe once loaded, which is why Python spawns there)
    forks = ForkServer(shared_env, preload) if sys.platform == "linux" and any(
        key not in alone and forkable(node.command) for key, node in pending.items()) else None
    chain = critical_path_seconds(pending, measured, threads_of)
    deps = {key: node.deps for key, node in pending.items()}
    left = {key: estimate_seconds(node, measured, threads_of[key]) or 0.0 for key, node in pending.items()}
    finished: set[str] = set()
    running: dict[str, tuple[subprocess.Popen | ForkedProcess, float, Any, Any]] = {}
    timings: dict[str, float] = {}
    started_all = time.perf_counter()

    def eta() -> str:
        now = time.perf_counter()
        unfinished = [key for key in pending if key not in finished]
        ran = {key: now - started for key, (_, started, _, _) in running.items()}
        return _format_duration(seconds_left({key: left[key] for key in unfinished},
                                             {key: chain[key] for key in unfinished}, ran, jobs, deps, alone))

    def stop_all() -> None:
        for process, _, _, _ in running.values():
            process.terminate()
        while running:
            process, _, handle, lock = running.popitem()[1]
            process.wait()
            handle.close()
            lock.__exit__(None, None, None)

    try:
        while len(finished) < len(pending):
            waiting = [key for key in pending if key not in finished and key not in running]
            for key in nodes_to_start(waiting, deps, finished, pending, chain, running, jobs, alone):
                node = pending[key]
                lock = node_lock(key)
                lock.__enter__()
                path = node_log(node)
                path.parent.mkdir(parents=True, exist_ok=True)
                handle = open(path, "a")
                env, threads = node_env(key)
                if forks is not None and key not in alone and forkable(node.command) and forks.available():
                    process = forks.start(node.command, path)
                else:
                    process = subprocess.Popen(node.command, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                               preexec_fn=die_with_parent)
                running[key] = (process, time.perf_counter(), handle, lock)
                log(f"[{len(finished) + len(running)}/{len(pending)}] start {node.kind} {_short(key)}"
                    f"{' (resuming)' if node.started else ''}, {threads} threads{' alone' if key in alone else ''}, "
                    f"log {path} (elapsed {_format_duration(time.perf_counter() - started_all)}, ~{eta()} left)")
            if not running:
                raise MatrixError("no node can start: a dependency is missing from the plan")  # cannot happen
            time.sleep(0.2)
            for key in [k for k, (p, _, _, _) in running.items() if p.poll() is not None]:
                process, started, handle, lock = running.pop(key)
                handle.close()
                lock.__exit__(None, None, None)
                node = pending[key]
                if process.returncode != 0 or not node.done:
                    why = f"exit {process.returncode}" if process.returncode else f"no {node.done_marker}"
                    stop_all()
                    raise MatrixError(f"{node.kind} {key} failed ({why}); see {node_log(node)}. Fix it and run "
                                      "again: finished nodes are kept, stopped ones resume")
                finished.add(key)
                timings[key] = time.perf_counter() - started
                log(f"[{len(finished)}/{len(pending)}] done  {node.kind} {_short(key)} in "
                    f"{_format_duration(timings[key])} (elapsed {_format_duration(time.perf_counter() - started_all)}, "
                    f"~{eta()} left)")
    except BaseException:
        stop_all()
        raise
    finally:
        if forks is not None:
            forks.close()
    return timings


class MatrixError(RuntimeError):
    """A node failed or a launcher cannot run (one line)."""


def slurm_scripts(plan: Plan, folder: Path) -> list[Path]:
    """One sbatch script per unfinished node, dependencies as `afterok` on the upstream jobs' ids (filled in by
    `run_slurm`; the scripts written here use the node names). Nothing is submitted."""
    spec = plan.matrix.presets[plan.preset_name].slurm
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for index, node in enumerate(n for n in plan.nodes.values() if not n.done):
        command = _slurm_command(node, spec)
        deps = [d for d in node.deps if not plan.nodes[d].done] if all(d in plan.nodes for d in node.deps) else []
        lines = ["#!/bin/bash", f"#SBATCH --job-name=prism-{_short(node.key)}",
                 f"#SBATCH --output={folder}/%j-{_short(node.key)}.out", "#SBATCH --nodes=1",
                 f"#SBATCH --gpus-per-node={spec.gpus_per_node if node.kind != 'world' else 0}",
                 f"#SBATCH --cpus-per-task={spec.cpus_per_task}", f"#SBATCH --time={spec.timeout_min}"]
        if spec.partition:
            lines.append(f"#SBATCH --partition={spec.partition}")
        if deps:
            lines.append("# depends on (afterok): " + " ".join(_short(d) for d in deps))
        lines += ["set -euo pipefail", f"cd {shlex.quote(str(Path.cwd()))}", shlex.join(command)]
        path = folder / f"{index:03d}-{node.kind}-{_short(node.key)}.sh"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        written.append(path)
    return written


def _slurm_command(node: Node, spec: SlurmSpec) -> list[str]:
    """Multi-GPU stages under accelerate: FSDP through the preset's config file when it names one (every recipe
    shards: the policy by the file's wrap policy, the discriminator as one unit), else data-parallel."""
    if node.kind not in STAGES or spec.gpus_per_node <= 1:
        return node.command
    if not spec.accelerate_config:
        launcher = ["accelerate", "launch", "--multi_gpu"]
    else:
        launcher = ["accelerate", "launch", "--config_file", spec.accelerate_config]
    return [*launcher, "--num_processes", str(spec.gpus_per_node), "-m", *node.command[2:]]


def run_slurm(plan: Plan, log=print) -> dict[str, str]:
    """Submit every unfinished node with submitit, each depending (afterok) on its unfinished upstream jobs.

    Each job is an `experiments.slurm.NodeJob`: signalled `signal_delay_s` before its time limit (or preempted), the
    stage saves a checkpoint at the end of its current optimizer step and the job requeues itself under the same
    job id, so its dependants keep waiting on it; the requeued job resumes the stage from that checkpoint."""
    try:
        import submitit

        from experiments.slurm import NodeJob
    except ImportError:
        raise MatrixError("--launcher slurm needs submitit (pip install 'prism[slurm]')") from None
    write_stage_configs(plan)
    spec = plan.matrix.presets[plan.preset_name].slurm
    folder = plan.root / "slurm"
    job_ids: dict[str, str] = {}
    for node in plan.nodes.values():
        if node.done:
            continue
        executor = submitit.AutoExecutor(folder=str(folder))
        deps = [job_ids[d] for d in node.deps if d in job_ids]
        extra = {"dependency": "afterok:" + ":".join(deps)} if deps else {}
        executor.update_parameters(
            name=f"prism-{node.kind}", timeout_min=spec.timeout_min, nodes=1,
            gpus_per_node=spec.gpus_per_node if node.kind != "world" else 0, cpus_per_task=spec.cpus_per_task,
            slurm_partition=spec.partition, slurm_signal_delay_s=spec.signal_delay_s,
            slurm_additional_parameters=extra)
        job = executor.submit(NodeJob(_slurm_command(node, spec), node.key, grace_s=spec.signal_delay_s - 30))
        job_ids[node.key] = job.job_id
        log(f"submitted {node.kind} {_short(node.key)} as job {job.job_id}" + (f" after {', '.join(deps)}" if deps else ""))
    return job_ids


# ----------------------------------------------------------------------------------------------------
# The eval node (a subprocess of the local launcher)
# ----------------------------------------------------------------------------------------------------


def eval_node(record: Path, checkpoint: str, suite: str, limit: int | None, world: str | None,
              overrides: list[str]) -> None:
    from evaluation.config import EvalConfig
    from evaluation.runner import run_eval
    from prism.atomic_io import atomic_write_text

    config = load_config(EvalConfig, None, overrides)
    report = run_eval(checkpoint, suite=suite, limit=limit, world=world, config=config,
                      log=lambda message: print(message, file=sys.stderr, flush=True))
    record.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(record, json.dumps({"checkpoint": checkpoint, "checkpoint_hash": report.checkpoint_hash,
                                          "suite": suite, "limit": limit, "world": world,
                                          "config": config_to_dict(config), "rows": report.rows},
                                         indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m experiments.matrix")
    commands = parser.add_subparsers(dest="command", required=True)
    node = commands.add_parser("eval-node")
    node.add_argument("--record", type=Path, required=True)
    node.add_argument("--checkpoint", required=True)
    node.add_argument("--suite", required=True)
    node.add_argument("--limit", type=int, default=None)
    node.add_argument("--world", default=None)
    node.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    eval_node(args.record, args.checkpoint, args.suite, args.limit, args.world, args.overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
