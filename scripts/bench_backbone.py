"""Speed and memory of a backbone: a ProtoNet step and a first- and second-order MAML step on RGB images.

Each row runs in its own process (so its peak memory is its own) on random
3 x size x size images (miniImageNet's shape at the default 84), with the
runner's defaults for the device (device.amp=auto, channels-last). Prints
seconds per step (median after a warm-up step), tasks per second and the
process's peak resident memory (peak allocated GPU memory on CUDA) and, on a
CPU, the resident memory before the first step (torch, the model, the
images), with the processor named.

    python scripts/bench_backbone.py                          # conv4 and resnet12, 84x84
    python scripts/bench_backbone.py --models resnet12 --iters 3
    python scripts/bench_backbone.py --device cuda
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from metalearn.algorithms import build_algorithm
from metalearn.config.compose import compose
from metalearn.data import ClassSplit, EpisodeSampler
from metalearn.device import cpu_isa, cpu_model, resolve_fast_paths

# (algorithm, shots, meta-batch): ProtoNet 5-way 5-shot one episode per step; (FO)MAML 5-way 1-shot, 4 tasks.
ROWS = [("protonet", 5, 1), ("fomaml", 1, 4), ("maml", 1, 4)]
WAYS, QUERIES = 5, 15


def measure(model: str, algo: str, shots: int, meta_batch: int, args) -> dict:
    device = torch.device(args.device)
    cfg = compose(
        [f"algo={algo}", f"model={model}", f"task.ways={WAYS}", f"task.shots={shots}", f"task.queries={QUERIES}"]
        + (["task.train.ways=5", "task.train.queries=15"] if algo == "protonet" else [])
    )
    generator = torch.Generator().manual_seed(0)
    split = ClassSplit(
        torch.randint(0, 256, (20 * 30, 3, args.size, args.size), generator=generator, dtype=torch.uint8),
        torch.arange(20).repeat_interleave(30),
        "random images",
    )
    torch.manual_seed(0)
    algo_ = build_algorithm(cfg, device, 0, split.image_shape)
    sampler = EpisodeSampler(split, WAYS, shots, QUERIES, device, seed=0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # torch, the model and the images
    times = []
    for i in range(1 + args.iters):
        batch = sampler.sample(meta_batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tick = time.perf_counter()
        algo_.meta_train_step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - tick)
    seconds = statistics.median(times)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    weights = sum(p.numel() for p in algo_.model.parameters())
    return {
        "s_per_step": seconds,
        "tasks_per_s": meta_batch / seconds,
        "peak_mib": peak,
        "before_mib": before if device.type == "cpu" else 0.0,
        "weights": weights,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["conv4", "resnet12"])
    parser.add_argument("--size", type=int, default=84)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # a child process: one measurement, as JSON
    args = parser.parse_args()
    if args.row:
        model, algo, shots, meta_batch = json.loads(args.row)
        print(json.dumps(measure(model, algo, shots, meta_batch, args)))
        return
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_model()} ({cpu_isa()})"
    fast = resolve_fast_paths(compose([]).device, device)
    print(
        f"{args.size}x{args.size} RGB, {WAYS}-way, {QUERIES} queries; {where}; {fast.describe()}; "
        f"torch {torch.__version__}"
    )
    memory = "peak GPU MiB" if device.type == "cuda" else "peak RSS MiB"
    print(f"{'model':<9} {'step':<20} {'weights':>11} {'s/step':>7} {'tasks/s':>8} {memory:>13} {'before MiB':>10}")
    for model in args.models:
        for algo, shots, meta_batch in ROWS:
            row = json.dumps([model, algo, shots, meta_batch])
            command = [sys.executable, __file__, "--row", row, "--size", str(args.size), "--iters", str(args.iters)]
            done = subprocess.run([*command, "--device", args.device], capture_output=True, text=True)
            if done.returncode:
                print(f"{model:<9} {algo}: failed: {done.stderr.strip().splitlines()[-1]}", flush=True)
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            step = f"{algo} {WAYS}w{shots}s x{meta_batch}"
            print(
                f"{model:<9} {step:<20} {r['weights']:>11,} {r['s_per_step']:>7.2f} {r['tasks_per_s']:>8.2f} "
                f"{r['peak_mib']:>13.0f} {r['before_mib']:>10.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
