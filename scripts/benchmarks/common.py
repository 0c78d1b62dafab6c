"""What several benchmarks share: the machine's name, task tensors, timing, memory readings, child processes.

This module imports no other benchmark module: every subcommand module may import it.
"""

import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from metalearn.config.compose import compose
from metalearn.data import ClassSplit, load_split
from metalearn.device import cpu_isa, cpu_model
from metalearn.models import CHANNELS_LAST, build_model

BENCH = Path(__file__).resolve().parents[1] / "bench.py"  # the one command; child processes start it too
DATA_ROOT = str(Path(__file__).resolve().parents[3] / "shared" / "data")
IMAGE_SHAPE = (1, 28, 28)  # Omniglot's


# --- the machine ----------------------------------------------------------------


def cpu_name() -> str:
    """The CPU and its vector extensions, so that figures from different machines are never compared by mistake."""
    return f"{cpu_model()} ({cpu_isa()})"


def machine_fields() -> dict:
    """What every JSON row carries about the machine."""
    return {"cpu": cpu_model(), "isa": cpu_isa()}


def cpu_header() -> str:
    return f"CPU: {cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def learn2learn_available() -> bool:
    try:
        import learn2learn  # noqa: F401
    except ImportError:
        return False
    return True


# --- options and results ----------------------------------------------------------


def add_data_root(parser) -> None:
    parser.add_argument("--data-root", default=DATA_ROOT, help="the folder holding omniglot-py/")


def write_json(path: str, payload) -> None:
    Path(path).write_text(json.dumps(payload, indent=1))
    print(f"rows written to {path}")


# --- task tensors -------------------------------------------------------------------


def random_images(classes: int, per_class: int, shape: tuple, **split) -> ClassSplit:
    """`classes` x `per_class` random uint8 images of `shape` (seed 0): tasks where no dataset is at hand."""
    generator = torch.Generator().manual_seed(0)
    return ClassSplit(
        torch.randint(0, 256, (classes * per_class, *shape), generator=generator, dtype=torch.uint8),
        torch.arange(classes).repeat_interleave(per_class),
        "random images",
        **split,
    )


def task_split(data_root: str, part: str = "train") -> ClassSplit:
    """The real Omniglot's classes of `part` (train, val, test), or random images of its shape when data_root
    has no Omniglot (the training ones unnamed, so that their episodes stay those measured before)."""
    if (Path(data_root) / "omniglot-py").is_dir():
        return load_split(compose([f"data.root={data_root}"]).data, part)
    return random_images(100, 20, IMAGE_SHAPE, **({} if part == "train" else {"part": part}))


# --- timing -------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(call, device: torch.device) -> float:
    """Seconds of `call()`, the device's queued work included."""
    synchronize(device)
    tick = time.perf_counter()
    call()
    synchronize(device)
    return time.perf_counter() - tick


# --- memory -------------------------------------------------------------------------


def reset_peak_memory() -> None:
    """Start the peak resident-memory count afresh (Linux)."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def resident_memory_mib() -> float:
    """The process's resident memory now (Linux; 0 elsewhere)."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) / 1024
    except (OSError, StopIteration):
        return 0.0


def peak_memory_mib() -> float:
    """The process's peak resident memory since reset_peak_memory (Linux; elsewhere since it started)."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 1024
    except (OSError, StopIteration):
        return peak_rss_mib()


def peak_rss_mib() -> float:
    """The process's peak resident memory since it started."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_device_memory_mib(device: torch.device) -> float:
    """The GPU's peak allocated memory since the last reset, or the process's peak resident memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mib()


# --- the machine's plain training throughput ------------------------------------------

PLAIN_BATCH = 80  # images per plain training pass: one 5-way episode with 1 shot and 15 queries


def plain_training_gflops(
    model: str, image_shape: tuple, amp: bool, batch: int = PLAIN_BATCH, seconds: float = 5.0, warmup: int = 3
) -> float:
    """The network's plain training throughput here: forward + backward of one `batch`-image batch
    (channels-last; bf16 autocast with `amp`), median pass after `warmup` passes."""
    torch.manual_seed(0)
    net = build_model(compose([f"model={model}"]).model, 5, image_shape, amp=amp, layout=CHANNELS_LAST).train()
    images, labels = torch.randn(batch, *image_shape), torch.randint(0, 5, (batch,))

    def step():
        F.cross_entropy(net(images), labels).backward()

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    for _ in range(warmup):
        step()
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 3:
        tick = time.perf_counter()
        step()
        times.append(time.perf_counter() - tick)
    return flops / statistics.median(times) / 1e9


# --- child processes --------------------------------------------------------------


def metalearn_command(code: Path = None):
    """How to start `metalearn` from the given checkout (None: the installed one): command, environment and
    working folder (`python -m` looks in the working folder first: a repository's own source folder, whose
    conf/ is not where an installed package has it, must not shadow the installed one)."""
    env = dict(os.environ)
    if code is None:
        return [sys.executable, "-m", "metalearn"], env, tempfile.gettempdir()
    code = code.resolve()
    conf = code / "metalearn" / "conf"
    if not conf.exists():  # installed, conf/ ships as metalearn.conf: the same from a plain checkout
        conf.symlink_to(Path("..") / "conf", target_is_directory=True)
    env["PYTHONPATH"] = os.pathsep.join([str(code), env.get("PYTHONPATH", "")])
    return [sys.executable, "-m", "metalearn"], env, code


def run_child(subcommand: str, *args: str) -> subprocess.CompletedProcess:
    """`python scripts/bench.py <subcommand> <args>` in a fresh process (so that its peak memory is its own)."""
    return subprocess.run([sys.executable, str(BENCH), subcommand, *args], capture_output=True, text=True)


def last_json(stdout: str):
    """The JSON a child printed last."""
    return json.loads(stdout.strip().splitlines()[-1])
