"""Model adapters: message conversion, seeds, sampling parameters, and the one-line vLLM refusal."""

import importlib.util

import numpy as np
import pytest
from PIL import Image

from evaluation.config import EvalConfig, EvalError
from evaluation.scoring import chat_messages
from prism.response_format import SYSTEM_PROMPT


def image(size=32):
    return Image.fromarray(np.zeros((size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def model_module(lmms_eval):
    from evaluation import model

    return model


def test_messages_for_a_chat_template_and_for_openai(model_module):
    messages = chat_messages([image(), image()], "How many?")
    rendered, images = model_module.split_messages(messages)
    assert rendered == [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "How many?"}]},
    ]
    assert len(images) == 2
    openai = model_module.openai_messages(messages)
    assert openai[0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert openai[1]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert openai[1]["content"][2] == {"type": "text", "text": "How many?"}


def test_seeds_and_sampling_parameters(model_module):
    assert model_module.derive_seed(0, "t", [1, 2]) == model_module.derive_seed(0, "t", [1, 2])
    assert model_module.derive_seed(0, "t", [1, 2]) != model_module.derive_seed(1, "t", [1, 2])
    params = model_module.vllm_sampling({"temperature": 1.0, "top_p": 0.7, "max_new_tokens": 99, "until": []}, seed=5)
    assert params == {"temperature": 1.0, "top_p": 0.7, "top_k": -1, "max_tokens": 99, "seed": 5, "stop": None}
    assert model_module.vllm_sampling({"temperature": 1.0, "do_sample": False}, seed=5)["temperature"] == 0.0


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_backend_without_vllm_is_one_line(model_module, checkpoint, world, tmp_path):
    from evaluation.runner import run_eval

    with pytest.raises(EvalError) as info:
        run_eval(checkpoint, "embedded", world=world, out_root=tmp_path, config=EvalConfig(backend="vllm"))
    message = str(info.value)
    assert message == model_module.VLLM_MISSING and "\n" not in message
    from evaluation.vllm_model import PrismVLLM

    with pytest.raises(EvalError):
        PrismVLLM(str(checkpoint))
    assert not (tmp_path / "results.csv").exists()


def test_cli_entry_prints_one_line_for_user_mistakes(tmp_path, capsys):
    from evaluation.command import main

    assert main(["--checkpoint", str(tmp_path / "none"), "--suite", "embedded", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prism eval: error: checkpoint") and err.count("\n") == 1
    assert main(["--checkpoint", str(tmp_path), "--suite", "embedded", "embedded.top_p=2"]) == 2
    assert "field 'embedded.top_p'" in capsys.readouterr().err


def test_entry_point_manifests_resolve_to_chat_models(lmms_eval):
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    from evaluation.plugin import hf_manifest, vllm_manifest

    registry = ModelRegistryV2()
    registry.register_manifest(hf_manifest())
    registry.register_manifest(vllm_manifest())
    for name, cls_name in (("prism_hf", "PrismHF"), ("prism_vllm", "PrismVLLM")):
        cls = registry.get_model_class(name)  # imports it and checks it is an lmms chat model
        assert cls.__name__ == cls_name and cls.is_simple is False
