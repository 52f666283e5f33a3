"""Whether the machine computes bf16 natively, and `mixed_precision: auto` resolved by it."""

import pytest
import torch

import prism.hardware as hardware
from prism.config import ModelConfig
from prism.runtime import RuntimeConfigError
from prism.stages.common import check_launch_precision


def test_cpu_flags_reads_the_flags_line(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx512f amx_bf16 amx_tile\n\n"
                       "processor\t: 1\nflags\t\t: fpu\n")
    assert hardware.cpu_flags(cpuinfo) == {"fpu", "avx512f", "amx_bf16", "amx_tile"}
    assert hardware.cpu_flags(tmp_path / "missing") == frozenset()


@pytest.mark.parametrize(("flags", "native"), [({"amx_bf16"}, True), ({"avx512_bf16", "avx512f"}, True),
                                               ({"avx512f", "avx2"}, False), (set(), False)])
def test_native_bf16_on_cpu_follows_the_flags(monkeypatch, flags, native):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    hardware.native_bf16.cache_clear()
    try:
        assert hardware.native_bf16() is native
    finally:
        hardware.native_bf16.cache_clear()


@pytest.mark.parametrize("native", [True, False])
def test_auto_resolves_on_this_machine_and_the_launch_must_agree(monkeypatch, native):
    monkeypatch.setattr(hardware, "native_bf16", lambda: native)
    model = ModelConfig(mixed_precision="auto")
    assert model.precision == ("bf16" if native else "no")
    assert model.autocast_dtype == ("bfloat16" if native else None)
    assert model.compute_dtype == ("bfloat16" if native else "float32")
    check_launch_precision("no", model)
    if native:
        check_launch_precision("bf16", model)
    else:
        with pytest.raises(RuntimeConfigError, match=r"model.mixed_precision is 'auto' \(no here\)"):
            check_launch_precision("bf16", model)
    assert ModelConfig(mixed_precision="bf16").precision == "bf16"  # the explicit settings stay as they are
    assert ModelConfig(mixed_precision="no").precision == "no"
