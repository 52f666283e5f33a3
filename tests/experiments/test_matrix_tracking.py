"""A matrix groups its stages' tracker runs by the matrix run: cells share stages, so no single cell names them."""

from experiments.matrix import build_plan, load_matrix
from prism.config import config_hash
from prism.stages import STAGES


def test_every_stage_of_a_matrix_carries_its_tracking_group():
    plan = build_plan(load_matrix("table1"), "embedded")
    stages = [node for node in plan.nodes.values() if node.kind in STAGES]
    assert len(stages) == 20 and {node.cfg.tracking_group for node in stages} == {"table1-embedded"}
    # bookkeeping, as output_dir: the group leaves the config hash, hence the stage directory, unchanged
    assert all(node.key.endswith(f"{node.kind}-{config_hash(node.cfg)}") for node in stages)
