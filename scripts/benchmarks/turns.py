"""Every implementation of one setting timed in one process, taking turns (the compare and memory subcommands).

Implementations take turns, one iteration each, so that a slow spell of the machine hits them alike; a
figure is the median over the timed iterations after one warm-up. A group runs in a fresh process
(`bench.py <subcommand> --group <row as JSON>`), so that its peak memory is its own.
"""

import argparse
import gc
import json
import statistics
import time

import torch

from metalearn.algorithms import build_algorithm
from metalearn.config.compose import compose
from metalearn.data import EpisodeSampler

from .common import (
    IMAGE_SHAPE,
    last_json,
    peak_memory_mib,
    reset_peak_memory,
    resident_memory_mib,
    run_child,
    task_split,
)
from .learn2learn_examples import Learn2LearnMAML, Learn2LearnProtoNet, learn2learn_tasks

# name: (bf16 autocast, channels-last), i.e. device.amp and device.channels_last
IMPLS = {"metalearn": (False, True), "metalearn-bf16": (True, True), "metalearn-nchw": (False, False)}
CHECKPOINTED = "metalearn-checkpoint"  # "metalearn" with algo.checkpoint_inner=true


def runner_config(row: dict, impl: str):
    """The runner's config for one setting and implementation: its defaults, as `metalearn train` composes them."""
    amp, channels_last = IMPLS.get("metalearn" if impl == CHECKPOINTED else impl, (False, False))
    overrides = [
        f"algo={row['algo']}",
        f"task.ways={row['ways']}",
        f"task.shots={row['shots']}",
        f"task.queries={row['queries']}",
        "algo.vectorize=loop",
        f"device.amp={str(amp).lower()}",
        f"device.channels_last={str(channels_last).lower()}",
    ]
    if row["algo"] == "maml":
        overrides += [
            f"algo.inner_lr={row['inner_lr']}",
            f"algo.inner_steps={row['inner_steps']}",
            f"algo.first_order={str(row['order'] == 'first').lower()}",
        ]
    if impl == CHECKPOINTED:
        overrides.append("algo.checkpoint_inner=true")
    return compose(overrides)


def build(impl: str, row: dict, dtype=torch.float32):
    """learn2learn's loop, or the runner's algorithm built as `metalearn train` builds it (seed-0 weights)."""
    if impl == "learn2learn":
        if row["algo"] == "protonet":
            return Learn2LearnProtoNet()
        return Learn2LearnMAML(row["ways"], row["inner_lr"], row["inner_steps"], row["order"] == "first", dtype)
    torch.manual_seed(0)
    return build_algorithm(runner_config(row, impl), torch.device("cpu"), 0, IMAGE_SHAPE, dtype)


def sampler(row: dict, seed: int = 0) -> EpisodeSampler:
    return EpisodeSampler(task_split(row["data_root"]), row["ways"], row["shots"], row["queries"], "cpu", seed=seed)


def iteration(impl: str, algo, row: dict):
    """One whole meta-training iteration: draw the meta-batch the library's own way, then step."""
    if impl != "learn2learn":
        own = sampler(row, seed=1)
        return lambda: algo.meta_train_step(own.sample(row["meta_batch"]))
    draw = learn2learn_tasks(row)
    return lambda: algo.train_on(draw() for _ in range(row["meta_batch"]))


def run_group(row: dict) -> list:
    """Time every implementation of one setting and figure, taking turns (called in a fresh process)."""
    torch.manual_seed(0)
    impls = row["impls"]
    algos = {impl: build(impl, row) for impl in impls}
    if row["figure"] == "step":
        work = sampler(row).sample(row["meta_batch"] * (row["iters"] + 1))
        batches = [
            type(work)(*(t[i * row["meta_batch"] : (i + 1) * row["meta_batch"]] for t in work))
            for i in range(row["iters"] + 1)
        ]
        steps = {impl: iter(batches) for impl in impls}
        runs = {impl: (lambda a=algos[impl], s=steps[impl]: a.meta_train_step(next(s))) for impl in impls}
    else:
        runs = {impl: iteration(impl, algos[impl], row) for impl in impls}
    times = {impl: [] for impl in impls}
    peaks = {impl: 0.0 for impl in impls}
    gc.collect()
    baseline = resident_memory_mib()  # models and tasks built, before the first step
    timed = row["iters"]
    for i in range(row["iters"] + 1):
        if i > timed:
            break
        for impl in impls:
            reset_peak_memory()
            tick = time.perf_counter()
            runs[impl]()
            elapsed = time.perf_counter() - tick
            peaks[impl] = max(peaks[impl], peak_memory_mib())
            if i > 0:
                times[impl].append(elapsed)
            elif elapsed > row.get("slow_s", float("inf")):
                timed = 1  # memory: a slow row's peak is in its warm-up already; one timed iteration
    rows = []
    for impl in impls:
        median = statistics.median(times[impl])
        rows.append(
            {
                "algo": row["algo"],
                "setting": row["setting"],
                "queries": row["queries"],
                "inner_steps": row["inner_steps"],
                "order": row["order"],
                "meta_batch": row["meta_batch"],
                "figure": row["figure"],
                "impl": impl,
                "it_per_s": 1 / median,
                "tasks_per_s": row["meta_batch"] / median,
                "peak_mem_mib": peaks[impl],
                "baseline_mem_mib": baseline,
                "iterations": len(times[impl]),
            }
        )
    return rows


def add_group_option(parser) -> None:
    """The hidden option by which a child process gets its group."""
    parser.add_argument("--group", help=argparse.SUPPRESS)


def print_group(spec: str) -> None:
    """The child's side of group_in_child: time the group, print its rows as JSON."""
    print(json.dumps(run_group(json.loads(spec))))


def group_in_child(subcommand: str, row: dict) -> list:
    """run_group(row) in a fresh process started as `bench.py <subcommand> --group <row>`."""
    done = run_child(subcommand, "--group", json.dumps(row))
    if done.returncode != 0:
        raise SystemExit(f"{row['algo']} {row['setting']} {row['figure']} {row['impls']} failed:\n{done.stderr}")
    return last_json(done.stdout)
