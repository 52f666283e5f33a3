"""lmms-eval model manifests for the `lmms_eval.models` entry-point group (kept import-light: lmms-eval loads
every entry point whenever `lmms_eval.models` is imported).

    [project.entry-points."lmms_eval.models"]
    prism_hf = "evaluation.plugin:hf_manifest"
    prism_vllm = "evaluation.plugin:vllm_manifest"
"""

from __future__ import annotations


def hf_manifest():
    """`--model prism_hf --model_args pretrained=DIR,seed=0,batch_size=64`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="prism_hf", chat_class_path="evaluation.model.PrismHF")


def vllm_manifest():
    """`--model prism_vllm --model_args pretrained=DIR,tensor_parallel_size=1`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="prism_vllm", chat_class_path="evaluation.vllm_model.PrismVLLM")
