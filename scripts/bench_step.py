"""Meta-iterations per second of metalearn's MAML step, per strategy and order.

Times `algo.meta_train_step` (the code path the runner uses) on task batches
drawn beforehand from the real Omniglot training classes (random images when
--data-root has no Omniglot), and prints one row per setting: the median over
the timed iterations after warm-up, and the process's peak resident memory so
far (rows run in order, so a row's peak includes the rows before it).

    python scripts/bench_step.py                 # 5-way 1-shot, meta-batch 32
    python scripts/bench_step.py --iters 3 --meta-batch 8 --strategies loop
"""

import argparse
import resource
import statistics
import time

from pathlib import Path

import torch
from omegaconf import OmegaConf

from metalearn.algorithms.batching import cpu_workers
from metalearn.algorithms.maml import MAML
from metalearn.config import DeviceConfig
from metalearn.data import ClassSplit, EpisodeSampler, load_split
from metalearn.models import Conv4


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def task_split(data_root: str) -> ClassSplit:
    if (Path(data_root) / "omniglot-py").is_dir():
        cfg = OmegaConf.create({"name": "omniglot", "root": data_root, "split": "vinyals", "cache_dir": None,
                                "download": False})
        return load_split(cfg, "train")
    generator = torch.Generator().manual_seed(0)
    return ClassSplit(torch.randint(0, 256, (100 * 20, 1, 28, 28), generator=generator, dtype=torch.uint8),
                      torch.arange(100).repeat_interleave(20), "random images")


def bench(split: ClassSplit, strategy: str, first_order: bool, args) -> dict:
    torch.manual_seed(0)
    sampler = EpisodeSampler(split, args.ways, args.shots, args.queries, "cpu", seed=0)
    defaults = DeviceConfig()  # the runner's: channels-last, fp32
    model = Conv4(args.ways, amp=defaults.amp, channels_last=defaults.channels_last)
    algo = MAML(model, inner_lr=0.4, inner_steps=args.inner_steps, inner_steps_eval=1, outer_lr=1e-3,
                first_order=first_order, vectorize=(strategy == "vmap"), workers=cpu_workers(torch.device("cpu")))
    batches = [sampler.sample(args.meta_batch) for _ in range(args.warmup + args.iters)]
    times = []
    for i, batch in enumerate(batches):
        tick = time.perf_counter()
        algo.meta_train_step(batch)
        if i >= args.warmup:
            times.append(time.perf_counter() - tick)
    median = statistics.median(times)
    return {"strategy": strategy, "order": "first" if first_order else "second",
            "it_per_s": 1 / median, "tasks_per_s": args.meta_batch / median}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--inner-steps", type=int, default=1)
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--strategies", nargs="+", default=["loop", "vmap"], choices=["loop", "vmap"])
    args = parser.parse_args()
    split = task_split(args.data_root)
    print(f"tasks from {split.name}")
    print(f"MAML conv4 {args.ways}-way {args.shots}-shot {args.queries} queries, {args.inner_steps} inner step(s), "
          f"meta-batch {args.meta_batch}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'strategy':<8} {'order':<7} {'meta-it/s':>9} {'tasks/s':>8} {'peak RSS MiB':>13}")
    for strategy in args.strategies:
        for first_order in (False, True):
            row = bench(split, strategy, first_order, args)
            print(f"{row['strategy']:<8} {row['order']:<7} {row['it_per_s']:>9.3f} {row['tasks_per_s']:>8.2f} "
                  f"{peak_rss_mib():>13.0f}", flush=True)


if __name__ == "__main__":
    main()
