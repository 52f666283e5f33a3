"""A stand-in for the `vllm` module (not installed here) with the API surface prism.rollout.vllm calls:
`LLM(**kwargs)`, `LLM.apply_model(fn) -> [fn(model)]` (one in-process worker), the engine model's
`load_weights(iterable of (name, tensor)) -> loaded names`, `sleep(level)`, `wake_up(tags)`,
`reset_prefix_cache()` and `llm_engine.reset_encoder_cache()`.

It records every call in `log`, a copy of every (name, tensor) it receives, and, at each load, how many tensors
of the previous load are still alive somewhere (the backend must hold one module's tensors at a time).
Imported by the tests and, as a top-level module, by fsdp_weight_sync_worker.py."""

import types
import weakref


class FakeEngineModel:
    def __init__(self, log: list):
        self.log = log
        self.received: list = []  # (name, copy of the tensor), in arrival order
        self.chunks: list[list[str]] = []  # the names of each load_weights call
        self.previous_alive: list[int] = []  # per load: tensors of the previous load still referenced
        self._previous: list = []

    def load_weights(self, weights):
        weights = list(weights)
        self.previous_alive.append(sum(ref() is not None for ref in self._previous))
        self._previous = [weakref.ref(tensor) for _, tensor in weights]
        names = [name for name, _ in weights]
        self.log.append(("load_weights", names))
        self.chunks.append(names)
        self.received.extend((name, tensor.detach().clone()) for name, tensor in weights)
        return set(names)


class FakeLLM:
    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.log: list = []
        self.model = FakeEngineModel(self.log)
        self.llm_engine = types.SimpleNamespace(reset_encoder_cache=lambda: self.log.append(("reset_encoder_cache",)))

    def apply_model(self, fn):
        return [fn(self.model)]

    def sleep(self, level: int = 1):
        self.log.append(("sleep", level))

    def wake_up(self, tags=None):
        self.log.append(("wake_up", tags))

    def reset_prefix_cache(self):
        self.log.append(("reset_prefix_cache",))
        return True


def fake_vllm(version: str = "0.32.0") -> types.SimpleNamespace:
    return types.SimpleNamespace(__version__=version, LLM=FakeLLM)
