"""`metalearn train` speed per algorithm, against the machine's plain convolution throughput.

Each row is a real `metalearn train` process (the algorithm's YAML, the
runner's defaults: device.amp=auto, device.allocator=auto) on the real
Omniglot, stopped by train.max_minutes after about --seconds of steps. A
hook of this benchmark (`StepWindow`, added with `+hooks.bench=...`) measures
the steps after the warm-up (the first --warmup steps): tasks/s (images/s for
the classifiers' batches), the process's user and system CPU time over those
steps and its peak resident memory while they ran. The ResNet-12 rows (ProtoNet,
finetune, MAML) train on generated 84x84 RGB images in the `data=folder`
format (100 classes of 20, split 64/16/20), with smaller batches where the
YAML's would take minutes per step on a CPU; their overrides are printed.

The achieved GFLOP/s is the FLOP count of one training task (torch.utils.flop_counter
on a meta-batch of one, in this process) times the tasks/s; "of plain" compares
it with this machine's plain training throughput of the same network in the
same precision (forward + backward of one 80-image batch, all cores). "sys %"
is the share of the CPU time spent in the kernel (page faults of freed and
re-mapped buffers, thread wake-ups); "CPU use" is the CPU time over the
wall time and the threads.

    python scripts/bench.py train                                   # every row (about 15 minutes on 2 cores)
    python scripts/bench.py train --algos protonet maml --seconds 20
    python scripts/bench.py train --overrides device.allocator=system   # glibc's own behaviour
    python scripts/bench.py train --code ../before                  # the same rows from another checkout, first
"""

import argparse
import json
import os
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from metalearn.algorithms import build_algorithm
from metalearn.allocator import configure as configure_allocator
from metalearn.config.compose import compose
from metalearn.data import build_dataset
from metalearn.hooks import Hook
from metalearn.train import training_sampler

from .common import (
    IMAGE_SHAPE,
    add_data_root,
    cpu_header,
    machine_fields,
    metalearn_command,
    peak_memory_mib,
    plain_training_gflops,
    reset_peak_memory,
    write_json,
)

SCRIPTS = Path(__file__).resolve().parents[1]  # on the child's PYTHONPATH, for StepWindow
ALGO_YAMLS = sorted(p.stem for p in (SCRIPTS.parent / "conf" / "algo").glob("*.yaml"))
# finetune first: distill's teacher is its run
ALGOS = sorted(ALGO_YAMLS, key=lambda name: name != "finetune")
FOLDER_SHAPE = (3, 84, 84)
# ResNet-12 on 84x84 RGB: the YAML's settings but for batches sized to seconds per step on 2 cores.
RESNET12_ROWS = {
    "protonet": ["task.train.ways=20"],
    "finetune": ["algo.batch_size=64"],
    "maml": ["train.meta_batch_size=2"],
}


class StepWindow(Hook):
    """Measures the steps after the first `skip`: items, step seconds, CPU times and peak memory; written as
    JSON to `path` at the run's last step (before its validation)."""

    def __init__(self, path: str, skip: int = 2):
        self.path, self.skip = Path(path), skip
        self.begin = None

    def start(self, context):
        self.amp = bool(context.algo.fast_paths.amp)
        self.unit = context.algo.throughput_unit  # tasks, or images for a classifier's batches

    def after_step(self, state, result, items, seconds):
        if state.step == self.skip:
            reset_peak_memory()
            self.begin = (time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF))
            self.items, self.seconds, self.steps = 0, 0.0, 0
        elif self.begin is not None:
            self.items += items
            self.seconds += seconds
            self.steps += 1
        if (state.final or state.step == state.steps) and self.begin is not None and self.steps:
            wall, usage = time.perf_counter() - self.begin[0], resource.getrusage(resource.RUSAGE_SELF)
            window = {
                "steps": self.steps,
                "items": self.items,
                "step_seconds": self.seconds,
                "wall": wall,
                "user": usage.ru_utime - self.begin[1].ru_utime,
                "sys": usage.ru_stime - self.begin[1].ru_stime,
                "peak_mib": peak_memory_mib(),
                "amp": self.amp,
                "unit": self.unit,
                "threads": torch.get_num_threads(),
            }
            self.path.write_text(json.dumps(window))


def make_folder_dataset(root: Path, classes: int = 100, per_class: int = 20) -> Path:
    """Random RGB images in the `data=folder` format: <root>/<class>/<n>.png (made once)."""
    from PIL import Image

    done = root / ".complete"
    if done.is_file():
        return root
    generator = torch.Generator().manual_seed(0)
    channels, height, width = FOLDER_SHAPE
    for c in range(classes):
        folder = root / f"class{c:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        images = torch.randint(0, 256, (per_class, height, width, channels), generator=generator, dtype=torch.uint8)
        for i, image in enumerate(images):
            Image.fromarray(image.numpy()).save(folder / f"{i:02d}.png")
    done.touch()
    return root


def row_overrides(algo: str, model: str, args, work: Path) -> list:
    """The row's config: the algorithm's YAML on Omniglot (conv4) or the generated folder (ResNet-12)."""
    overrides = [f"algo={algo}", f"model={model}"]
    if model == "conv4":
        overrides.append(f"data.root={Path(args.data_root).resolve()}")
    else:
        folder = make_folder_dataset(work / "folder-84")
        overrides += [
            "data=folder",
            f"data.root={folder}",
            f"data.image_size={FOLDER_SHAPE[1]}",
            f"data.channels={FOLDER_SHAPE[0]}",
            f"data.cache_dir={work / 'cache'}",
            *RESNET12_ROWS[algo],
        ]
    if algo == "distill":
        overrides.append(f"algo.teacher={work / 'runs' / f'finetune-{model}'}")
    return overrides + list(args.overrides)


def train_row(overrides: list, folder: Path, args, code: Path = None) -> dict:
    """One `metalearn train` process; the StepWindow's figures."""
    command, env, cwd = metalearn_command(code)
    env["PYTHONPATH"] = os.pathsep.join([str(SCRIPTS), env.get("PYTHONPATH", "")])
    window = folder.with_suffix(".json")
    window.unlink(missing_ok=True)
    if folder.exists():
        subprocess.run(["rm", "-rf", str(folder)], check=True)
    run = [
        "train",
        *overrides,
        "train.steps=1000000",
        f"train.max_minutes={args.seconds / 60:.4f}",
        "train.val_every=1000000",
        "train.val_episodes=2",
        "train.ckpt_every=1000000",
        "+hooks.bench._target_=benchmarks.training.StepWindow",
        f"+hooks.bench.path={window}",
        f"+hooks.bench.skip={args.warmup}",
        f"hydra.run.dir={folder}",
    ]
    done = subprocess.run(command + run, env=env, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"metalearn {' '.join(run)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    if not window.is_file():
        return None  # no step after the warm-up within --seconds
    return json.loads(window.read_text())


def flops_per_item(overrides: list) -> float:
    """FLOPs of one training task (image, for a classifier's batch): a meta-batch of one, counted on one
    thread so that the counter sees every operation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = compose([*overrides, "train.meta_batch_size=1"])
        split = build_dataset(cfg.data).load_split("train")
        device = torch.device("cpu")
        torch.manual_seed(0)
        algo = build_algorithm(cfg, device, split.num_classes, split.image_shape)
        batch = algo.sample(training_sampler(cfg, split, algo, device), 1)
        with FlopCounterMode(display=False) as counter:
            algo.meta_train_step(batch)
        return counter.get_total_flops() / len(batch[0])
    finally:
        torch.set_num_threads(threads)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_root(parser)
    parser.add_argument("--algos", nargs="*", choices=ALGOS, default=ALGOS, help="conv4 rows")
    parser.add_argument(
        "--resnet12", nargs="*", choices=sorted(RESNET12_ROWS), default=sorted(RESNET12_ROWS), help="ResNet-12 rows"
    )
    parser.add_argument("--seconds", type=float, default=40.0, help="train.max_minutes of each run, in seconds")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the figures")
    parser.add_argument("--work-dir", help="where the runs and the generated images go (default: a temp folder)")
    parser.add_argument("--code", help="also run each row from this other checkout of the repository, first")
    parser.add_argument("--overrides", nargs="*", default=[], help="of every run")
    parser.add_argument("--json", help="also write the rows to this file")


def run(args) -> None:
    work = Path(args.work_dir or Path(tempfile.gettempdir()) / "metalearn-bench-train").resolve()
    other = Path(args.code) if args.code else None
    print(cpu_header())
    print(f"each row: `metalearn train` for {args.seconds:.0f} s, the first {args.warmup} steps left out; {work}")
    if args.overrides:
        print(f"every run with: {' '.join(args.overrides)}")
    algos = list(args.algos) + (["finetune"] if "distill" in args.algos and "finetune" not in args.algos else [])
    algos.sort(key=lambda algo: algo != "finetune")  # distill's teacher is the finetune row's run
    rows_wanted = [(algo, "conv4") for algo in algos] + [(algo, "resnet12") for algo in args.resnet12]
    plain = {}
    header = (
        f"{'algo':<9} {'model':<8} {'dtype':<7} {'per s':>8} {'of':<6} {'GFLOP/s':>8} {'of plain':>8} {'user s':>7} "
        f"{'sys s':>6} {'sys %':>6} {'CPU use':>7} {'peak GB':>7}"
    )
    if other:
        header += f" {'before/s':>8} {'sys % b':>7} {'speed-up':>8}"
    printed = False
    rows = []
    for algo, model in rows_wanted:
        overrides = row_overrides(algo, model, args, work)
        before = train_row(overrides, work / "runs" / f"before-{algo}-{model}", args, other) if other else None
        window = train_row(overrides, work / "runs" / f"{algo}-{model}", args)
        if window is None or (other and before is None):
            late = f"no step after the first {args.warmup} within {args.seconds:.0f} s: more --seconds"
            print(f"{algo:<9} {model:<8} {late}")
            continue
        dtype = "bf16" if window["amp"] else "float32"
        image_shape = IMAGE_SHAPE if model == "conv4" else FOLDER_SHAPE
        if (model, dtype) not in plain:
            configure_allocator("keep", torch.device("cpu"), False)  # as the runner's default does for training
            plain[(model, dtype)] = plain_training_gflops(model, image_shape, window["amp"], warmup=1)
        if not printed:
            print(header)
            printed = True
        rate = window["items"] / window["step_seconds"]
        gflops = rate * flops_per_item(overrides) / 1e9
        cpu = window["user"] + window["sys"]
        row = {
            "algo": algo,
            "model": model,
            "dtype": dtype,
            "overrides": overrides,
            "per_s": rate,
            "unit": window["unit"],
            "gflop_per_s": gflops,
            "of_plain": gflops / plain[(model, dtype)],
            "user_s": window["user"],
            "sys_s": window["sys"],
            "sys_share": window["sys"] / max(cpu, 1e-9),
            "cpu_use": cpu / window["wall"] / window["threads"],
            "peak_mib": window["peak_mib"],
            "steps": window["steps"],
            **machine_fields(),
        }
        line = (
            f"{algo:<9} {model:<8} {dtype:<7} {rate:>8.4g} {window['unit']:<6} {gflops:>8.1f} "
            f"{100 * row['of_plain']:>7.0f}% "
            f"{row['user_s']:>7.1f} {row['sys_s']:>6.1f} {100 * row['sys_share']:>5.1f}% "
            f"{100 * row['cpu_use']:>6.0f}% {row['peak_mib'] / 1024:>7.2f}"
        )
        if before:
            old_rate = before["items"] / before["step_seconds"]
            old_sys = before["sys"] / max(before["user"] + before["sys"], 1e-9)
            row.update({"before_per_s": old_rate, "before_sys_share": old_sys})
            line += f" {old_rate:>8.4g} {100 * old_sys:>6.1f}% {rate / old_rate:>7.2f}x"
        print(line, flush=True)
        rows.append(row)
    print(
        "plain training throughput (forward + backward, batch of 80): "
        + ", ".join(f"{model} {dtype} {rate:.1f} GFLOP/s" for (model, dtype), rate in plain.items())
    )
    if args.json:
        write_json(args.json, {"plain_gflop_per_s": {f"{m}-{d}": r for (m, d), r in plain.items()}, "rows": rows})
