"""What the C library's allocator does with the large blocks a training step frees: keep or return them.

glibc serves a block above its mmap threshold (dynamic, at most 32 MiB) with a
fresh mapping, unmaps it when it is freed, and trims the heap's free top. A
step whose activations are that large (ProtoNet's 60-way episodes: about 36 MB
a layer in bf16) then faults every page in again at the next step: on a 2-core
Xeon a third of ProtoNet's CPU time went to the kernel. Kept in the process,
the blocks are reused (`keep`), for a higher peak. Second-order MAML's
checkpointed inner steps want the opposite (`release`): each inner step's freed
activations returned, so the peak stays flat as the inner steps grow
(`scripts/bench.py memory`). The thresholds govern the main heap; a block larger
than 64 MiB that another thread allocates (MAML's task threads on ResNet-12) is
mapped and unmapped whatever they say. Where jemalloc or tcmalloc replaces malloc
(LD_PRELOAD), glibc's settings would not reach it, and nothing is changed.
docs/performance.md has the measurements.

The setting is process-wide: the last run built in a process decides it.
"""

import ctypes
import functools
import os
from enum import Enum

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters
M_MMAP_THRESHOLD = -3
KEPT_BELOW = 1 << 30  # keep: blocks under 1 GiB come from the heap and stay there when freed
NEVER_TRIM = 2**31 - 1  # mallopt takes an int: the largest free heap top it leaves alone
RELEASED_FROM = 1 << 20  # release: blocks of 1 MiB and more are mapped, and unmapped when freed
GLIBC_TRIM = 128 * 1024  # glibc's own trim threshold, which release leaves as it was measured with


class Allocator(Enum):
    auto = "auto"  # release where the algorithm needs a flat peak (algo.checkpoint_inner), else keep; CPU only
    keep = "keep"  # freed blocks stay in the process for the next step: no page faults, a higher peak
    release = "release"  # blocks of 1 MiB and more go back to the system when freed: the lowest peak
    system = "system"  # the C library's own behaviour, untouched


@functools.cache
def _mallopt():
    """glibc's mallopt, or None where the C library is another (macOS, Windows, musl)."""
    try:
        return ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return None


def _address(function) -> int:
    return ctypes.cast(function, ctypes.c_void_p).value


@functools.cache
def _malloc_replaced() -> bool:
    """Whether the process's malloc is not glibc's: jemalloc or tcmalloc put first by LD_PRELOAD, which
    glibc's mallopt does not reach."""
    try:
        return _address(ctypes.CDLL(None).malloc) != _address(ctypes.CDLL("libc.so.6").malloc)
    except (OSError, AttributeError):
        return False


def chosen(setting, device, flat_peak: bool) -> Allocator:
    """What `device.allocator` resolves to for a run on `device` (a torch.device) whose algorithm may need a
    flat peak."""
    mode = Allocator(getattr(setting, "value", setting))
    if mode is not Allocator.auto:
        return mode
    if device.type != "cpu":  # the tensors live in the GPU's own caching allocator
        return Allocator.system
    return Allocator.release if flat_peak else Allocator.keep


def configure(setting, device, flat_peak: bool) -> str:
    """Set the C allocator for this run as `device.allocator` says; returns what the run log says of it."""
    mode = chosen(setting, device, flat_peak)
    why = f"device.allocator={getattr(setting, 'value', setting)}"
    if mode is Allocator.system:
        return f"the C library's allocator as it is ({why})"
    mallopt = _mallopt()
    if mallopt is None:
        return f"the C library's allocator as it is ({why}; it is not glibc)"
    if _malloc_replaced():
        preloaded = os.environ.get("LD_PRELOAD", "another library")
        return f"malloc as {preloaded} provides it ({why}; glibc's settings would not reach it)"
    if mode is Allocator.keep:
        mallopt(M_MMAP_THRESHOLD, KEPT_BELOW)
        mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)
        return f"freed blocks kept for reuse ({why}: no page faults at each step, a higher peak)"
    mallopt(M_MMAP_THRESHOLD, RELEASED_FROM)
    mallopt(M_TRIM_THRESHOLD, GLIBC_TRIM)
    reason = "a flat peak for algo.checkpoint_inner" if flat_peak else "the lowest peak"
    return f"freed blocks of 1 MiB and more returned to the system ({why}: {reason})"
