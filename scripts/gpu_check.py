"""The GPU path end to end, in a few minutes: run it on any CUDA machine (`bash scripts/gpu_check.sh`).

1. Every algorithm trains a few steps on a tiny generated Omniglot (written
   by this script: random strokes, enough classes for every algorithm's
   defaults) with
   `device=cuda` and the defaults a GPU picks (algo.vectorize=auto -> vmap,
   device.amp=auto -> bf16 where the GPU has it, channels-last on), resumes,
   and `metalearn eval` scores it; MAML, MAML++ and ProtoNet also with
   model.bn=inductive (running statistics on the device).
2. On the GPU in float64, the vmap strategy's meta-gradients (MAML second and
   first order, ANIL, Meta-SGD) and predictions equal the loop strategy's.
3. MAML 5-way 1-shot, meta-batch 32: tasks/s of both strategies and both
   orders with the runner's defaults (`python scripts/bench.py step`).

Prints one line per check and `gpu_check: N passed, M failed`; exits non-zero
on a failure. `--device cpu` runs the same checks on the CPU (a dry run).
"""

import argparse
import contextlib
import io
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import fields
from pathlib import Path

import torch
from benchmarks.common import BENCH, random_images
from omegaconf import OmegaConf
from PIL import Image

from metalearn.algorithms.maml import MAML
from metalearn.cli import main as metalearn
from metalearn.config.compose import compose
from metalearn.config.settings import component_class
from metalearn.data import EpisodeSampler
from metalearn.device import cpu_isa, cpu_model, resolve_fast_paths
from metalearn.models import Conv4

REPO = Path(__file__).resolve().parent.parent
# Characters per part of the tiny Omniglot, 4 rotations each: 60 training classes, as ProtoNet's
# default 60-way episodes need; 8 for validation and 8 for test.
TINY_CHARACTERS = {"train": 15, "val": 2, "test": 2}
DRAWINGS = 20  # per character, as in Omniglot


def write_tiny_omniglot(folder: Path) -> list:
    """A tiny Omniglot in the layout of the real archives, extracted (omniglot-py/images_background/<Alphabet>/
    characterNN/*.png; test characters in images_evaluation), and its split lists; the data.* overrides."""
    root, split = folder / "root", folder / "split"
    generator = torch.Generator().manual_seed(0)
    classes = {}
    for number, part in enumerate((p for p, count in TINY_CHARACTERS.items() for _ in range(count)), start=1):
        archive = "images_evaluation" if part == "test" else "images_background"
        character = f"{part.title()}/character{number:02d}"
        (root / "omniglot-py" / archive / character).mkdir(parents=True)
        strokes = torch.rand(28, 28, generator=generator) < 0.2  # the character; each drawing flips a few pixels
        for drawing in range(1, DRAWINGS + 1):
            ink = strokes ^ (torch.rand(28, 28, generator=generator) < 0.05)
            png = root / "omniglot-py" / archive / character / f"{number:04d}_{drawing:02d}.png"
            Image.fromarray((~ink).to(torch.uint8).mul(255).numpy()).convert("1").save(png)
        classes.setdefault(part, []).extend(f"{character}/rot{degrees:03d}" for degrees in (0, 90, 180, 270))
    split.mkdir(parents=True)
    for part, names in classes.items():
        (split / f"{part}.txt").write_text("\n".join(names) + "\n")
    return [f"data.root={root}", f"data.split={split}", f"data.cache_dir={folder / 'cache'}"]


def algorithms() -> list:
    """Every YAML of conf/algo; those that learn from a teacher run after finetune, whose run they use."""
    names = sorted(p.stem for p in (REPO / "conf" / "algo").glob("*.yaml"))
    return sorted(names, key=needs_teacher)


def settings_of(algo: str) -> set:
    """The names of the algorithm's algo.* settings."""
    return {f.name for f in fields(component_class(compose([f"algo={algo}"]).algo, "algo").Settings)}


def needs_teacher(algo: str) -> bool:
    return "teacher" in settings_of(algo)


class Checks:
    def __init__(self):
        self.passed, self.failed = 0, 0

    def run(self, name: str, check) -> None:
        tick = time.perf_counter()
        try:
            detail = check()
        except BaseException as err:  # a failed check must not stop the others
            self.failed += 1
            print(f"FAIL {name}: {type(err).__name__}: {str(err).strip()[:2000]}", flush=True)
            traceback.print_exc(limit=3)
            return
        self.passed += 1
        print(f"ok   {name} ({time.perf_counter() - tick:.1f} s){': ' + detail if detail else ''}", flush=True)


def cli(*args) -> str:
    """`metalearn <args>` in this process; its stdout, or an error with its output."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            metalearn([str(a) for a in args])
        except SystemExit as stop:
            if stop.code:
                raise RuntimeError(
                    f"metalearn {' '.join(map(str, args))} exited {stop.code}:\n{err.getvalue()[-3000:]}"
                ) from None
    return out.getvalue()


def train_and_eval(algo: str, base: Path, data: list, device: str, *extra: str) -> str:
    """A 2-step run of the algorithm with its defaults (a small model and meta-batch), resumed, then scored."""
    common = [
        *data,
        "task.queries=3",
        "model.hidden=16",
        "train.meta_batch_size=4",
        "train.val_every=2",
        "train.val_episodes=8",
        "train.ckpt_every=2",
        "eval.episodes=40",
        f"device={device}",
    ]
    common += list(extra)
    run = base / "runs" / "-".join([algo, *extra]).replace("=", "-")  # an override's value holds no '='
    teacher = [f"algo.teacher={base / 'runs' / 'finetune'}"] if needs_teacher(algo) else []
    # a schedule fixed when the run starts (MAML++'s cosine, Reptile's step size) spans the resumed run
    schedule = ["algo.anneal_steps=3"] if "anneal_steps" in settings_of(algo) else []
    cli("train", f"algo={algo}", *common, *teacher, *schedule, "train.steps=2", f"hydra.run.dir={run}")
    cli("train", f"resume={run}", "train.steps=3")
    line = cli("eval", f"run={run}").strip().splitlines()[-1]
    log = (run / "train.log").read_text()
    on = next((entry.split(" - ", 1)[1] for entry in log.splitlines() if " on cuda" in entry or " on cpu" in entry), "")
    return f"{on}; {line}"


def float64_tasks(device: torch.device):
    split = random_images(12, 20, (1, 28, 28), part="train")
    return EpisodeSampler(split, 5, 1, 3, device, seed=0, dtype=torch.float64).sample(6)


def vmap_equals_loop(device: torch.device, **maml) -> str:
    """Meta-gradients and predictions of the two strategies on the same float64 tasks, on the device."""
    batch = float64_tasks(device)
    results = []
    for vectorize in (False, True):
        torch.manual_seed(0)
        model = Conv4(5, hidden=16, channels_last=True).double().to(device)
        algo = MAML(model, inner_lr=0.3, inner_steps=2, inner_steps_eval=3, outer_lr=1e-3, vectorize=vectorize, **maml)
        results.append((algo.meta_gradients(batch), algo.predict(batch)))
    (loop_grads, loop_logits), (vmap_grads, vmap_logits) = results
    scale = max(g.abs().max() for g in loop_grads.values())
    worst = max(((vmap_grads[n] - loop_grads[n]).abs().max() / scale).item() for n in loop_grads)
    logits = (vmap_logits - loop_logits).abs().max().item()
    if worst > 1e-9 or logits > 1e-9:
        raise AssertionError(f"vmap differs from the loop: gradients {worst:.1e}, logits {logits:.1e}")
    return f"largest difference {worst:.1e} of the largest gradient entry, logits {logits:.1e}"


def throughput(device: str) -> str:
    """`bench.py step`'s table: both strategies, both orders, the runner's defaults on the device."""
    out = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "step",
            "--device",
            device,
            "--iters",
            "5",
            "--warmup",
            "2",
            "--data-root",
            "/nonexistent",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return "\n" + out.stdout.rstrip()


def ranks_equal_one(base: Path, data: list, device: str, nproc: int) -> str:
    """One fomaml run on `nproc` processes (torchrun, a GPU each) = the same run on one, in float64."""
    common = [*data, "algo=fomaml", "task.queries=3", "model.hidden=16", "train.meta_batch_size=4"]
    common += ["train.steps=3", "train.val_every=3", "device.dtype=float64", f"device={device}"]
    one, many = base / "ranks" / "one", base / "ranks" / "many"
    cli("train", *common, f"hydra.run.dir={one}")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    done = subprocess.run(
        [*torchrun, "-m", "metalearn", "train", *common, f"hydra.run.dir={many}"], capture_output=True, text=True
    )
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    a, b = (torch.load(r / "checkpoints" / "last.pt", weights_only=True)["algo"]["model"] for r in (one, many))
    # conv biases a BatchNorm follows have rounding-noise gradients (tests/test_distributed.py): left out
    gap = max((a[k] - b[k]).abs().max().item() for k in a if not k.endswith(".0.bias"))
    if gap > 1e-9:
        raise RuntimeError(f"{nproc} processes differ from 1 by {gap:.2e}")
    return f"largest weight difference {gap:.1e}"


def ranks_throughput(data: list, device: str, nproc: int) -> str:
    """`bench.py distributed`: MAML 5-way 1-shot meta-batch 32 tasks/s on 1 and `nproc` processes."""
    counts = ["1"] + ([str(nproc)] if nproc > 1 else [])
    root, *others = data  # data.root=<root>, then the other data.* overrides
    out = subprocess.run(
        [sys.executable, str(BENCH), "distributed", *others, "--device", device]
        + ["--steps", "20", "--data-root", root.split("=", 1)[1], "--nproc", *counts],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return "\n" + out.stdout.rstrip()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for a dry run")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: torch sees no CUDA GPU here; run it on a GPU machine (or --device cpu).")
    import metalearn as package

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_model()} ({cpu_isa()})"
    fast = resolve_fast_paths(OmegaConf.create({"amp": "auto", "channels_last": True}), device)
    print(
        f"gpu_check on {name}; torch {torch.__version__}, CUDA {torch.version.cuda}; metalearn "
        f"{package.__version__}; defaults here: {fast.describe()}",
        flush=True,
    )
    checks = Checks()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        data = write_tiny_omniglot(base / "data")
        for algo in algorithms():
            checks.run(
                f"{algo}: train, resume, eval with device={args.device}",
                lambda algo=algo: train_and_eval(algo, base, data, args.device),
            )
        for algo in ("maml", "mamlpp", "protonet"):  # running statistics on the device (MAML: loop strategy)
            checks.run(
                f"{algo} with model.bn=inductive: train, resume, eval with device={args.device}",
                lambda algo=algo: train_and_eval(algo, base, data, args.device, "model.bn=inductive"),
            )
        gpus = torch.cuda.device_count() if device.type == "cuda" else 2  # a dry run: 2 CPU processes
        if gpus > 1:
            checks.run(
                f"{gpus} processes (torchrun) = 1 process", lambda: ranks_equal_one(base, data, args.device, gpus)
            )
        checks.run(
            f"MAML tasks/s on 1{f' and {gpus}' if gpus > 1 else ''} process(es)",
            lambda: ranks_throughput(data, args.device, gpus),
        )
    for label, maml in [
        ("MAML second order", {"first_order": False}),
        ("MAML first order", {"first_order": True}),
        ("ANIL", {"first_order": False, "adapt": "head"}),
        ("Meta-SGD", {"first_order": False, "learn_inner_lr": True}),
    ]:
        checks.run(
            f"{label}: vmap = loop on {args.device} (float64)", lambda maml=maml: vmap_equals_loop(device, **maml)
        )
    checks.run("MAML 5-way 1-shot meta-batch 32 throughput", lambda: throughput(args.device))
    print(f"gpu_check: {checks.passed} passed, {checks.failed} failed")
    raise SystemExit(1 if checks.failed else 0)


if __name__ == "__main__":
    main()
