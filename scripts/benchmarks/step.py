"""Meta-iterations per second of metalearn's MAML step, per strategy and order.

Times `algo.meta_train_step` (the code path the runner uses) on task batches
drawn beforehand from the real Omniglot training classes (random images when
--data-root has no Omniglot), and prints one row per setting: the median over
the timed iterations after warm-up, and the process's peak resident memory so
far (rows run in order, so a row's peak includes the rows before it).

    python scripts/bench.py step                 # 5-way 1-shot, meta-batch 32
    python scripts/bench.py step --iters 3 --meta-batch 8 --strategies loop
    python scripts/bench.py step --device cuda   # on a GPU, with the runner's defaults there

The model computes on the fast paths the runner's defaults pick on that
device (device.amp=auto, channels-last); --amp and --channels-last override.
"""

import argparse
import statistics

import torch

from metalearn.algorithms import build_algorithm
from metalearn.config.compose import compose
from metalearn.data import ClassSplit, EpisodeSampler
from metalearn.device import resolve_fast_paths

from .common import add_data_root, cpu_name, peak_device_memory_mib, task_split, timed_call


def runner_config(args, strategy: str, first_order: bool):
    """The runner's MAML config (`metalearn train algo=maml ...`) for this measurement."""
    return compose(
        [
            "algo=maml",
            f"task.ways={args.ways}",
            f"task.shots={args.shots}",
            f"task.queries={args.queries}",
            f"algo.inner_steps={args.inner_steps}",
            f"algo.first_order={str(first_order).lower()}",
            f"algo.vectorize={strategy}",
            f"device.amp={args.amp}",
            f"device.channels_last={args.channels_last}",
        ]
    )


def fast_paths(args):
    """What the runner picks on args.device, with --amp / --channels-last as device.amp / device.channels_last."""
    device = torch.device(args.device)
    return device, resolve_fast_paths(runner_config(args, "loop", False).device, device)


def measure(split: ClassSplit, strategy: str, first_order: bool, args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    sampler = EpisodeSampler(split, args.ways, args.shots, args.queries, device, seed=0)
    algo = build_algorithm(runner_config(args, strategy, first_order), device, 0, split.image_shape)
    batches = [sampler.sample(args.meta_batch) for _ in range(args.warmup + args.iters)]
    times = [timed_call(lambda batch=batch: algo.meta_train_step(batch), device) for batch in batches]
    median = statistics.median(times[args.warmup :])
    return {
        "strategy": strategy,
        "order": "first" if first_order else "second",
        "it_per_s": 1 / median,
        "tasks_per_s": args.meta_batch / median,
    }


def processor(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_root(parser)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--inner-steps", type=int, default=1)
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--strategies", nargs="+", default=["loop", "vmap"], choices=["loop", "vmap"])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--amp", default="auto", choices=["auto", "true", "false"], help="as device.amp")
    parser.add_argument("--channels-last", default="true", choices=["true", "false"], help="as device.channels_last")


def run(args) -> None:
    split = task_split(args.data_root)
    device, fast = fast_paths(args)
    print(f"tasks from {split.name}; {processor(device)}; {fast.describe()}")
    print(
        f"MAML conv4 {args.ways}-way {args.shots}-shot {args.queries} queries, {args.inner_steps} inner step(s), "
        f"meta-batch {args.meta_batch}, torch {torch.__version__}"
    )
    memory = "peak GPU MiB" if device.type == "cuda" else "peak RSS MiB"
    print(f"{'strategy':<8} {'order':<7} {'meta-it/s':>9} {'tasks/s':>8} {memory:>13}")
    for strategy in args.strategies:
        for first_order in (False, True):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            row = measure(split, strategy, first_order, args)
            print(
                f"{row['strategy']:<8} {row['order']:<7} {row['it_per_s']:>9.3f} {row['tasks_per_s']:>8.2f} "
                f"{peak_device_memory_mib(device):>13.0f}",
                flush=True,
            )
