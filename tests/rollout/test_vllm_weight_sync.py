"""vLLM weight sync (prism.rollout.vllm) against a fake engine with the API surface of vLLM 0.32 (tests/rollout/
fake_vllm.py; vLLM is not installed here): full tensors in the compute dtype, each checkpoint name once, one
module at a time, gathered lazily; under FSDP2 on two processes, full tensors equal to one process's update."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import prism.rollout.vllm as vllm_module
from prism.models import PRESETS, build_model, build_processor, build_tokenizer, save_model
from prism.rollout import HFRolloutBackend, RolloutError, RolloutPrompt, SamplingParams, sequence_log_probs
from prism.rollout.backends import make_backend
from tests.models.fixtures import checkpoint_layout
from tests.torchrun import torchrun

from .fake_vllm import fake_vllm


@pytest.fixture
def vllm(monkeypatch):
    """The fake `vllm` module, and no torch.distributed environment variables set for the engine."""
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm())
    monkeypatch.setattr(vllm_module, "_launcher_environment", lambda: None)


@pytest.fixture(scope="module")
def processor():
    corpus = [f"There are {i % 5 + 1} red circles." for i in range(200)]
    return build_processor(build_tokenizer(corpus), image_size=PRESETS["embedded-s"].image_size)


def one_update(model, processor):
    """One AdamW step on the log-likelihood of a few sampled rollouts (every tensor of the tiny policy moves)."""
    size = PRESETS["embedded-s"].image_size
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (size, size, 3), dtype=np.uint8))
    processor.tokenizer.padding_side = "left"
    batch = HFRolloutBackend(model, processor, behaviour_log_probs=False).generate(
        [RolloutPrompt(question="How many circles?", images=[image])], n=2,
        sampling=SamplingParams(max_new_tokens=4, seed=0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    (-sequence_log_probs(model, batch).sum()).backward()
    optimizer.step()


def test_weight_sync_pushes_each_full_tensor_once_in_compute_dtype_one_module_at_a_time(vllm, processor, tmp_path,
                                                                                         monkeypatch):
    from safetensors.torch import load_file

    model = build_model("embedded-s", processor.tokenizer, seed=0)
    checkpoint = save_model(model, processor, tmp_path / "model")  # what the engine is built from
    before = load_file(str(checkpoint / "model.safetensors"))
    one_update(model, processor)
    backend = make_backend("vllm", model, processor, model_path=str(checkpoint), compute_dtype="bfloat16")
    llm = backend.llm
    assert llm.kwargs["distributed_executor_backend"] == "external_launcher"  # in-process: apply_model works
    assert llm.kwargs["dtype"] == "bfloat16" and llm.kwargs["model"] == str(checkpoint)

    gather = vllm_module.full_tensor
    monkeypatch.setattr(vllm_module, "full_tensor", lambda t: (llm.log.append(("gather",)), gather(t))[1])
    backend.update_weights(model)

    engine = llm.model
    names = [name for name, _ in engine.received]
    assert len(names) == len(set(names))  # each name once
    assert set(names) == set(before)  # the checkpoint's names, which vLLM's Qwen3-VL loader maps itself
    params = checkpoint_layout(dict(model.named_parameters()))  # the fused patch embedding goes out as its Conv3d
    for name, tensor in engine.received:
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, params[name].detach().to(torch.bfloat16))
    assert sum(not torch.equal(t, before[n].to(torch.bfloat16)) for n, t in engine.received) >= len(names) - 1
    # one module per load: its names share a module key, and every module comes once
    keys = [{vllm_module.module_key(name) for name in chunk} for chunk in engine.chunks]
    assert all(len(k) == 1 for k in keys) and len({k.pop() for k in keys}) == len(engine.chunks)
    assert any("layers.0." in n for n in engine.chunks[-3]) and max(map(len, engine.chunks)) <= 12
    # one at a time: nothing of the previous module survives, and each module is gathered just before its load
    assert engine.previous_alive == [0] * len(engine.chunks)
    events = [e[0] for e in llm.log]
    loads = [i for i, e in enumerate(events) if e == "load_weights"]
    starts = [0] + [i + 1 for i in loads[:-1]]
    assert [events[s:i].count("gather") for s, i in zip(starts, loads)] == [len(c) for c in engine.chunks]
    assert events[loads[-1] + 1:] == ["reset_prefix_cache", "reset_encoder_cache"]


def test_weight_chunks_of_a_wrapped_model_carry_the_checkpoint_names_and_shapes(processor, tmp_path):
    from safetensors.torch import load_file

    model = build_model("embedded-s", processor.tokenizer, seed=0)
    saved = load_file(str(save_model(model, processor, tmp_path / "model") / "model.safetensors"))

    class Compiled(torch.nn.Module):  # what torch.compile's wrapper is to the names: `_orig_mod.` before each
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    for wrapped in (model, Compiled(model)):
        pushed = {name: tensor for chunk in vllm_module.weight_chunks(wrapped, torch.float32) for name, tensor in chunk}
        assert pushed.keys() == saved.keys()
        assert all(torch.equal(pushed[name], saved[name]) for name in saved)


def test_weight_sync_wakes_the_weights_alone_and_generation_the_kv_cache(vllm, processor):
    backend = make_backend("vllm", None, processor, model_path="ckpt", compute_dtype="float32")
    backend.sleep()
    backend.update_weights(torch.nn.Linear(2, 2))
    backend.wake_up()  # what generate does first
    backend.update_weights(torch.nn.Linear(2, 2))  # awake: nothing to wake
    calls = [e for e in backend.llm.log if e[0] in ("sleep", "wake_up")]
    assert calls == [("sleep", 1), ("wake_up", ["weights"]), ("wake_up", ["kv_cache"])]
    assert backend.llm.model.chunks == [["weight", "bias"]] * 2


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "1.0.0", "unknown"])
def test_weight_sync_refuses_a_vllm_of_another_series(processor, monkeypatch, version):
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm(version))
    with pytest.raises(RolloutError) as info:
        make_backend("vllm", None, processor, model_path="ckpt", compute_dtype="bfloat16")
    assert "\n" not in str(info.value) and f"vLLM {version} is installed" in str(info.value)
    assert "vllm==0.32.*" in str(info.value)
    vllm_module.check_vllm_version("0.32.4.dev3+gabc")  # patch releases of the series pass


def test_weight_sync_gives_a_single_process_engine_a_world_of_one(monkeypatch):
    monkeypatch.setattr(vllm_module.os, "environ", {"MASTER_PORT": "1234"})
    vllm_module._launcher_environment()
    assert vllm_module.os.environ == {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                                      "MASTER_PORT": "1234"}


@pytest.mark.skipif(sys.platform != "linux", reason="gloo on Linux")
def test_weight_sync_under_fsdp2_on_two_processes_pushes_full_tensors_of_the_update(tmp_path):
    """torchrun, 2 CPU processes (gloo), the policy sharded with FSDP2 as accelerate's plugin shards it
    (fsdp_weight_sync_worker.py says why accelerate itself is not used): after one update, each process's engine
    receives the full tensors, bit for bit those of the same update in one process, cast to bfloat16."""
    result = torchrun([str(Path(__file__).with_name("fsdp_weight_sync_worker.py")), str(tmp_path / "out")])
    assert result.returncode == 0, result.stderr[-2000:]
    outs = [json.loads((tmp_path / f"out.rank{rank}.json").read_text()) for rank in (0, 1)]
    assert outs[0]["names"] == outs[1]["names"]  # a collective: both processes push the same tensors in one order
    for out in outs:
        assert all(out["sharded"].values())  # every parameter was a DTensor shard smaller than the tensor
        assert len(set(out["names"])) == len(out["names"])  # each once, in the checkpoint's names
        assert sorted(out["names"]) == sorted(out["reference_names"])
        assert out["dtypes"] == ["torch.bfloat16"] and out["full_shapes"]
        assert all(out["equal"].values()) and out["worst"] == 0.0
        assert out["moved"] == len(out["names"])  # the tensors after the update, not before
        assert out["previous_alive"] == [0] * len(out["chunks"]) and len(out["chunks"]) == 11
        assert out["log"][-2:] == ["reset_prefix_cache", "reset_encoder_cache"]
