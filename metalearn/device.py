"""Turn the device config into a torch.device and the fast paths that hardware runs natively."""

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from metalearn.config.settings import SWITCHES
from metalearn.errors import MetalearnError

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MetalearnError(f"device.name={name} is not a device; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MetalearnError(
                f"device={name} asks for a CUDA GPU, but torch sees none (torch.cuda.is_available() is False). "
                f"Use device=cpu, or device=auto to take a GPU only when there is one."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MetalearnError(
                f"device.name={name}: there are only {torch.cuda.device_count()} CUDA devices (cuda:0..)."
            )
    elif device.type != "cpu":
        raise MetalearnError(f"device.name={name} is not supported; use auto, cpu, cuda or cuda:N.")
    return device


def switch(value, key: str) -> str:
    """'auto', 'true' or 'false' from a YAML/CLI value (true/false arrive as booleans or strings)."""
    text = str(value).strip().lower()
    if text not in SWITCHES:
        raise MetalearnError(f"{key} must be auto, true or false (got {value!r}).")
    return text


@functools.cache
def cpu_model() -> str:
    """The processor's marketing name, e.g. 'Intel(R) Xeon(R) Processor' or 'AMD EPYC 7B13'."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"


def _cpu_flag(name: str) -> bool:
    check = getattr(torch.cpu, f"_is_{name}_supported", None)
    return bool(check()) if check is not None else False


def _onednn_limit() -> str:
    """ONEDNN_MAX_CPU_ISA, which caps the instructions oneDNN's convolutions use ('' when unset)."""
    return os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()


def cpu_isa() -> str:
    """The vector extensions torch runs on this CPU, e.g. 'AVX512 avx512_bf16 amx' or 'AVX2'.

    The first word is torch's kernel level (ATEN_CPU_CAPABILITY lowers it);
    bf16 and AMX are listed when the processor has them natively; a cap on
    oneDNN's instructions (ONEDNN_MAX_CPU_ISA) is named last.
    """
    parts = [torch.backends.cpu.get_cpu_capability()]
    parts += [name for name, flag in (("avx512_bf16", "avx512_bf16"), ("amx", "amx_tile")) if _cpu_flag(flag)]
    if _onednn_limit():
        parts.append(f"oneDNN<={_onednn_limit()}")
    return " ".join(parts)


def native_bf16(device: torch.device):
    """(True/False, why) whether the device computes bf16 in hardware rather than emulating it."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"{name} computes bf16 natively"
        return False, f"{name} has no native bf16"
    capability = torch.backends.cpu.get_cpu_capability()
    native = [what for what, flag in (("AVX512-BF16", "avx512_bf16"), ("AMX", "amx_tile")) if _cpu_flag(flag)]
    limit = _onednn_limit()
    if native and limit and limit != "ALL" and not any(word in limit for word in ("BF16", "AMX")):
        return False, f"ONEDNN_MAX_CPU_ISA={limit} keeps the convolutions off the bf16 instructions"
    if native and capability.startswith("AVX512"):
        return True, f"{cpu_model()} has {' and '.join(native)}"
    if native:
        return False, f"torch runs {capability} kernels here (ATEN_CPU_CAPABILITY), which emulate bf16"
    return False, f"{cpu_model()} has neither AVX512-BF16 nor AMX, so bf16 would be emulated (several times slower)"


@dataclass(frozen=True)
class FastPaths:
    """What device.amp and device.channels_last resolve to on one device, and why."""

    amp: bool
    channels_last: bool
    why: str
    dtype: str = "float32"  # device.dtype: the weights' and images' type when not under autocast

    def describe(self, layout: str = "") -> str:
        """e.g. 'bf16 autocast, channels-last layout (why)'; `layout` names the model's own (models.LAYOUTS)."""
        layout = layout or ("channels_last" if self.channels_last else "nchw")
        names = {"channels_last": "channels-last", "nchw": "NCHW"}
        return f"{'bf16 autocast' if self.amp else self.dtype}, {names.get(layout, layout)} layout ({self.why})"


PLAIN = FastPaths(amp=False, channels_last=False, why="float32 in NCHW")

_warned = set()


def resolve_fast_paths(device_cfg, device: torch.device, bf16_caveat: str | None = None) -> FastPaths:
    """device.amp: auto takes bf16 only where the hardware runs it natively and the algorithm has no
    `bf16_caveat` (why bf16 would change its numbers); true warns (once) where bf16 is not native."""
    amp = switch(device_cfg.amp, "device.amp")
    native, reason = native_bf16(device)
    if amp == "true" and not native:
        key = (str(device), reason)
        if key not in _warned:
            _warned.add(key)
            log.warning(
                "device.amp=true on hardware without native bf16 (%s): expect it to be slower than "
                "float32; device.amp=auto picks float32 here",
                reason,
            )
    use_amp = amp == "true" or (amp == "auto" and native)
    why = f"device.amp={amp}: {reason}"
    if amp == "auto" and native and bf16_caveat:
        use_amp, why = False, f"device.amp=auto: {bf16_caveat}; device.amp=true takes bf16 anyway"
    dtype = "float64" if "float64" in str(device_cfg.get("dtype", "float32")) else "float32"
    if dtype == "float64":
        use_amp, why = False, "device.dtype=float64: no bf16 autocast"
    return FastPaths(amp=use_amp, channels_last=bool(device_cfg.channels_last), why=why, dtype=dtype)


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def share_cores(jobs: int) -> int:
    """Threads for one of `jobs` runs side by side (a parallel launcher): the cores split between them."""
    threads = max(1, cores() // max(1, jobs))
    torch.set_num_threads(threads)
    return threads
