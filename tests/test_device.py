"""device.amp=auto takes bf16 only where the hardware computes it natively, and says why."""

import logging

import pytest
import torch
from omegaconf import OmegaConf

from metalearn import device as dev
from metalearn.algorithms import build_algorithm
from metalearn.config.compose import compose
from metalearn.device import cpu_isa, native_bf16, resolve_fast_paths


def device_cfg(amp, channels_last=True):
    return OmegaConf.create({"name": "cpu", "amp": amp, "channels_last": channels_last})


@pytest.fixture
def avx2_only(monkeypatch):
    """A CPU like an AMD EPYC Zen 3: AVX2 kernels, no AVX512-BF16, no AMX."""
    monkeypatch.setattr(dev, "_cpu_flag", lambda name: False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")


@pytest.fixture
def amx(monkeypatch):
    """A CPU like a recent Intel Xeon: AVX-512 kernels with native bf16 and AMX."""
    monkeypatch.setattr(dev, "_cpu_flag", lambda name: name in ("avx512_bf16", "amx_tile"))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")


def test_auto_is_float32_without_native_bf16(avx2_only):
    fast = resolve_fast_paths(device_cfg("auto"), torch.device("cpu"))
    assert not fast.amp and "neither AVX512-BF16 nor AMX" in fast.why
    assert fast.describe().startswith("float32, channels-last")


def test_auto_is_bf16_with_native_bf16(amx):
    fast = resolve_fast_paths(device_cfg("auto"), torch.device("cpu"))
    assert fast.amp and "AMX" in fast.why and fast.describe().startswith("bf16 autocast")


def test_lowered_kernel_level_counts_as_emulated(monkeypatch):
    """ATEN_CPU_CAPABILITY=avx2 on an AMX machine: torch's AVX2 kernels emulate bf16."""
    monkeypatch.setattr(dev, "_cpu_flag", lambda name: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert native_bf16(torch.device("cpu"))[0] is False


@pytest.mark.parametrize("value", [False, "false", "False"])
def test_false_is_float32_everywhere(amx, value):
    assert not resolve_fast_paths(device_cfg(value), torch.device("cpu")).amp


def test_true_without_native_bf16_warns_once(avx2_only, caplog, monkeypatch):
    monkeypatch.setattr(dev, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="metalearn.device"):
        for _ in range(3):
            assert resolve_fast_paths(device_cfg(True), torch.device("cpu")).amp
    warnings = [r for r in caplog.records if "without native bf16" in r.getMessage()]
    assert len(warnings) == 1


def test_isa_names_the_kernel_level_and_extensions(amx):
    assert cpu_isa() == "AVX512 avx512_bf16 amx"


def test_capped_onednn_counts_as_emulated(amx, monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert native_bf16(torch.device("cpu"))[0] is False and "oneDNN<=AVX2" in cpu_isa()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert native_bf16(torch.device("cpu"))[0] is True


def built_paths(*overrides):
    cfg = compose([*overrides, "model.hidden=4"])
    return build_algorithm(cfg, torch.device("cpu"), 12, (1, 28, 28)).fast_paths


@pytest.mark.parametrize(
    "overrides, amp, named",
    [
        (["algo=maml", "algo.inner_steps=5"], True, None),  # at the floor: bf16 (docs/performance.md)
        (["algo=anil"], True, None),  # one inner step: at the floor
        (["algo=anil", "algo.inner_steps=5"], False, "ANIL's meta-gradient over 5 inner steps"),
        (["algo=metasgd"], False, "Meta-SGD"),
        (["algo=mamlpp"], False, "MAML++"),
        (["algo=mamlpp", "algo.learn_inner_lr=false"], True, None),
        (["algo=reptile"], True, None),
        (["algo=anil", "algo.inner_steps=5", "device.amp=true"], True, None),  # asked for: taken
    ],
)
def test_auto_keeps_float32_where_bf16_moves_the_update_beyond_weight_rounding(amx, overrides, amp, named):
    """auto follows `bench.py fidelity`: on native bf16 hardware, float32 for the settings whose bf16
    update is further from float64's than rounding the weights; the run log's reason names them."""
    fast = built_paths(*overrides)
    assert fast.amp is amp
    if named:
        assert named in fast.why and "device.amp=true takes bf16 anyway" in fast.why
        assert fast.describe().startswith("float32")


def test_a_caveat_changes_nothing_where_bf16_is_not_native(avx2_only):
    fast = built_paths("algo=anil", "algo.inner_steps=5")
    assert not fast.amp and "neither AVX512-BF16 nor AMX" in fast.why
