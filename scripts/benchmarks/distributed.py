"""Tasks per second of one training run on 1 process and on K processes (torchrun), side by side.

Runs `metalearn train` as a user would, once per process count, on the real
Omniglot (--data-root), and reads the throughput the run itself logged
(metrics.jsonl's tasks_per_s, the windows after the first, which holds the
warm-up). On a CPU the one process uses every core (its task threads); each of
K ranks gets cores / K. Prints one row per process count and the ratio to one
process, with the processor named.

    python scripts/bench.py distributed                       # MAML 5w1s, meta-batch 32, 1 vs 2 processes
    python scripts/bench.py distributed --algo fomaml --steps 40 --nproc 1 2
    python scripts/bench.py distributed --device cuda --nproc 1 2 4   # one GPU per process
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from metalearn.device import cores

from .common import add_data_root, cpu_name


def train_on(nproc: int, args, folder: Path) -> dict:
    """`metalearn train` on `nproc` processes; the median of its logged training throughput."""
    overrides = [
        f"algo={args.algo}",
        f"data.root={args.data_root}",
        f"device={args.device}",
        f"train.steps={args.steps}",
        f"train.meta_batch_size={args.meta_batch}",
        f"train.log_every={args.log_every}",
        f"train.val_every={args.steps + 1}",  # no validation: training throughput alone
        f"train.ckpt_every={args.steps}",
        f"hydra.run.dir={folder}",
        *args.overrides,
    ]
    launcher = [sys.executable, "-m", "metalearn"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        launcher += ["-m", "metalearn"]
    started = time.perf_counter()
    done = subprocess.run([*launcher, "train", *overrides], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{nproc} process(es) failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tasks_per_s"] for r in records if r["split"] == "train"][1:]
    return {"nproc": nproc, "tasks_per_s": statistics.median(rates), "wall_s": wall}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--algo", default="maml")
    add_data_root(parser)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("overrides", nargs="*", help="more overrides for every run, e.g. task.shots=5")


def run(args) -> None:
    if args.device.startswith("cuda"):
        where = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    else:
        where = f"{cpu_name()}, {cores()} cores"
    print(f"{args.algo}, meta-batch {args.meta_batch}, {args.steps} steps on {where}, torch {torch.__version__}")
    print(f"{'processes':>9}  {'tasks/s':>8}  {'vs ' + str(args.nproc[0]):>5}  {'wall s':>7}")
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for nproc in args.nproc:
            row = train_on(nproc, args, Path(tmp) / f"n{nproc}")
            base = base or row["tasks_per_s"]
            print(f"{nproc:>9}  {row['tasks_per_s']:>8.1f}  {row['tasks_per_s'] / base:>5.2f}  {row['wall_s']:>7.1f}")
