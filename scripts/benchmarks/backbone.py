"""Speed and memory of a backbone: a ProtoNet step and a first- and second-order MAML step on RGB images.

Each row runs in its own process (so its peak memory is its own) on random
3 x size x size images (miniImageNet's shape at the default 84), with the
runner's defaults for the device (device.amp=auto, channels-last). Prints
seconds per step (median after a warm-up step), tasks per second and the
process's peak resident memory (peak allocated GPU memory on CUDA) and, on a
CPU, the resident memory before the first step (torch, the model, the
images), with the processor named.

    python scripts/bench.py backbone                          # conv4 and resnet12, 84x84
    python scripts/bench.py backbone --models resnet12 --iters 3
    python scripts/bench.py backbone --device cuda
"""

import argparse
import json
import statistics

import torch

from metalearn.algorithms import build_algorithm
from metalearn.config.compose import compose
from metalearn.data import EpisodeSampler
from metalearn.device import resolve_fast_paths

from .common import device_name, last_json, peak_device_memory_mib, peak_rss_mib, random_images, run_child, timed_call

# (algorithm, shots, meta-batch): ProtoNet 5-way 5-shot one episode per step; (FO)MAML 5-way 1-shot, 4 tasks.
ROWS = [("protonet", 5, 1), ("fomaml", 1, 4), ("maml", 1, 4)]
WAYS, QUERIES = 5, 15


def measure(model: str, algo: str, shots: int, meta_batch: int, args) -> dict:
    device = torch.device(args.device)
    cfg = compose(
        [f"algo={algo}", f"model={model}", f"task.ways={WAYS}", f"task.shots={shots}", f"task.queries={QUERIES}"]
        + (["task.train.ways=5", "task.train.queries=15"] if algo == "protonet" else [])
    )
    split = random_images(20, 30, (3, args.size, args.size))
    torch.manual_seed(0)
    algo_ = build_algorithm(cfg, device, 0, split.image_shape)
    sampler = EpisodeSampler(split, WAYS, shots, QUERIES, device, seed=0)
    before = peak_rss_mib()  # torch, the model and the images
    times = []
    for i in range(1 + args.iters):
        batch = sampler.sample(meta_batch)
        seconds = timed_call(lambda batch=batch: algo_.meta_train_step(batch), device)
        if i:
            times.append(seconds)
    seconds = statistics.median(times)
    weights = sum(p.numel() for p in algo_.model.parameters())
    return {
        "s_per_step": seconds,
        "tasks_per_s": meta_batch / seconds,
        "peak_mib": peak_device_memory_mib(device),
        "before_mib": before if device.type == "cpu" else 0.0,
        "weights": weights,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=["conv4", "resnet12"])
    parser.add_argument("--size", type=int, default=84)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # a child process: one measurement, as JSON


def run(args) -> None:
    if args.row:
        model, algo, shots, meta_batch = json.loads(args.row)
        print(json.dumps(measure(model, algo, shots, meta_batch, args)))
        return
    device = torch.device(args.device)
    fast = resolve_fast_paths(compose([]).device, device)
    print(
        f"{args.size}x{args.size} RGB, {WAYS}-way, {QUERIES} queries; {device_name(device)}; {fast.describe()}; "
        f"torch {torch.__version__}"
    )
    memory = "peak GPU MiB" if device.type == "cuda" else "peak RSS MiB"
    print(f"{'model':<9} {'step':<20} {'weights':>11} {'s/step':>7} {'tasks/s':>8} {memory:>13} {'before MiB':>10}")
    for model in args.models:
        for algo, shots, meta_batch in ROWS:
            row = json.dumps([model, algo, shots, meta_batch])
            done = run_child(
                "backbone", "--row", row, "--size", str(args.size), "--iters", str(args.iters), "--device", args.device
            )
            if done.returncode:
                print(f"{model:<9} {algo}: failed: {done.stderr.strip().splitlines()[-1]}", flush=True)
                continue
            r = last_json(done.stdout)
            step = f"{algo} {WAYS}w{shots}s x{meta_batch}"
            print(
                f"{model:<9} {step:<20} {r['weights']:>11,} {r['s_per_step']:>7.2f} {r['tasks_per_s']:>8.2f} "
                f"{r['peak_mib']:>13.0f} {r['before_mib']:>10.0f}",
                flush=True,
            )
