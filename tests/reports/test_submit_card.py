"""The model card of a `prism submit` bundle: prism.model_card's builder, the checkpoint's own lineage (from the card
its stage wrote) and the recorded evaluations as model-index."""

import pandas as pd
from huggingface_hub import ModelCard

from prism.model_card import Lineage, build_model_card, write_model_card
from reports.submit import submission_bundle


def test_the_bundle_card_carries_the_checkpoints_lineage_and_its_evaluations(tmp_path):
    from evaluation.runner import checkpoint_digests

    checkpoint = tmp_path / "stages" / "sft-1" / "model"
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.json").write_text("{}")
    write_model_card(checkpoint, build_model_card("sft-1", Lineage(
        base_model="Qwen/Qwen3-VL-4B-Instruct", license="apache-2.0", datasets=("prism-vlm/gemini_distill",),
        history=("**sft** from `Qwen/Qwen3-VL-4B-Instruct`",))))
    digest, _ = checkpoint_digests(checkpoint)
    evals = tmp_path / "evals"
    entry = evals / digest / "prism_embedded-k1"
    entry.mkdir(parents=True)
    (entry / "DONE").write_text("")
    pd.DataFrame([
        {"benchmark": "embedded", "task": "prism_embedded", "metric": "accuracy", "value": 0.45},
        {"benchmark": "embedded", "task": "prism_embedded_chart", "metric": "accuracy", "value": 0.5},
        {"benchmark": "embedded", "task": "prism_embedded_chart", "metric": "format_valid_rate", "value": 0.9},
        {"benchmark": "mmmu_val", "task": "prism_mmmu_val", "metric": "accuracy", "value": 0.41234},
        {"benchmark": "mmmu_pro", "task": "prism_mmmu_pro", "metric": "accuracy", "value": 0.25},
    ]).to_csv(entry / "rows.csv", index=False)

    bundle = submission_bundle(checkpoint, out_root=tmp_path / "submissions", eval_root=evals)
    card = ModelCard.load(bundle / "README.md")
    data = card.data
    assert (data.base_model, data.license, data.datasets) == ("Qwen/Qwen3-VL-4B-Instruct", "apache-2.0",
                                                              ["prism-vlm/gemini_distill"])
    assert (data.library_name, data.pipeline_tag, data.model_name) == ("transformers", "image-text-to-text", bundle.name)
    found = {r.dataset_name: (r.dataset_type, r.dataset_config, r.dataset_split, r.metric_type, r.metric_value)
             for r in data.eval_results}
    assert found == {
        "prism_embedded": ("prism_embedded", None, None, "accuracy", 45.0),  # the world's files have no Hub id
        "prism_embedded_chart": ("prism_embedded_chart", None, None, "accuracy", 50.0),
        "prism_mmmu_val": ("lmms-lab-encoder/MMMU", None, "validation", "accuracy", 41.23),  # as its task YAML loads it
        "prism_mmmu_pro": ("MMMU/MMMU_Pro", None, "test", "accuracy", 25.0),  # a group: the dataset its tasks share
    }
    assert "- **sft** from `Qwen/Qwen3-VL-4B-Instruct`" in card.text  # the training history comes along
