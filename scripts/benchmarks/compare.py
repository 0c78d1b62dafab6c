"""metalearn against learn2learn, side by side on this machine: MAML and ProtoNet training.

Two figures per setting:
- step: the training step alone, on identical ready-made task tensors drawn
  beforehand from the real Omniglot training classes (random images when
  --data-root has no Omniglot). For MAML a float64 check first computes one
  meta-gradient with both libraries and prints their largest difference.
- iteration: the whole meta-training iteration on the real Omniglot, each
  library drawing its own tasks: metalearn's on-device episode sampler,
  learn2learn's Omniglot benchmark tasksets (extracted once into the cache).

metalearn runs the runner's own code (`MAML` / `ProtoNet.meta_train_step`,
`EpisodeSampler.sample`) in float32 with channels-last ("metalearn",
device.amp=false), with bf16 autocast ("metalearn-bf16", device.amp=true) and,
on request (--impls), in NCHW ("metalearn-nchw", device.channels_last=false).
The header says which of float32 and bf16 device.amp=auto picks on this CPU,
and every row names the CPU and its vector extensions (`cpu`, `isa`), so
figures from different machines are never compared by mistake. learn2learn runs its
examples' code: `l2l.algorithms.MAML` with `clone()` / `adapt()` per task,
and the ProtoNet example's loop, on its own conv4 (`ConvBase` with max-pool,
the same network function, holding metalearn's initial weights).

All implementations of a setting live in one process and take turns, one
iteration each, so a slow spell of the machine hits them alike; a figure is
the median over the timed iterations after one warm-up. Peak memory is the
process's peak resident memory during that implementation's iterations (the
baseline of torch, the data and the models included).

    python scripts/bench.py compare --quick              # a short run (about 3 minutes)
    python scripts/bench.py compare --json bench.json    # the full run, rows also as JSON
    python scripts/bench.py compare --quick --impls metalearn metalearn-nchw metalearn-bf16
"""

import argparse
from typing import NamedTuple

import torch

from metalearn.device import native_bf16

from .common import add_data_root, cpu_header, learn2learn_available, machine_fields, write_json
from .learn2learn_examples import Learn2LearnMAML
from .turns import IMPLS, add_group_option, build, group_in_child, print_group, sampler


class Setting(NamedTuple):
    algo: str
    setting: str
    ways: int
    shots: int
    queries: int
    inner_steps: int
    inner_lr: float
    meta_batch: int
    orders: tuple[str, ...]
    quick: bool  # measured by --quick too


SETTINGS = [
    Setting("maml", "5w1s", 5, 1, 15, 1, 0.4, 32, ("second", "first"), True),
    Setting("maml", "5w1s", 5, 1, 15, 1, 0.4, 8, ("second", "first"), False),
    Setting("maml", "20w1s", 20, 1, 5, 5, 0.1, 16, ("second",), False),
    Setting("protonet", "60w1s", 60, 1, 5, 0, 0.0, 1, ("-",), True),
]
DEFAULT_IMPLS = ("metalearn", "metalearn-bf16")
FIGURES = ("step", "iteration")


def gradient_check(row: dict) -> float:
    """Largest difference of one float64 MAML meta-gradient (4 tasks), metalearn vs learn2learn,
    relative to the largest gradient entry (a conv bias before BatchNorm has a zero gradient)."""
    episodes = sampler(row).sample(4)
    episodes = type(episodes)(
        episodes.support.double(), episodes.support_labels, episodes.query.double(), episodes.query_labels
    )
    ours = build("metalearn", row, torch.float64).meta_gradients(episodes)
    theirs = Learn2LearnMAML(
        row["ways"], row["inner_lr"], row["inner_steps"], row["order"] == "first", torch.float64
    ).gradients(episodes)
    scale = max(g.abs().max() for g in theirs.values())
    return max(((ours[n] - theirs[n]).abs().max() / scale).item() for n in theirs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_root(parser)
    parser.add_argument(
        "--quick", action="store_true", help="2 timed iterations; MAML 5-way meta-batch 32 and ProtoNet only"
    )
    parser.add_argument("--iters", type=int, default=None, help="timed iterations per figure (default 10, quick 2)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument(
        "--impls",
        nargs="+",
        choices=list(IMPLS),
        default=list(DEFAULT_IMPLS),
        help="metalearn variants to measure (learn2learn joins when installed)",
    )
    add_group_option(parser)


def run(args) -> None:
    if args.group:
        print_group(args.group)
        return
    iters = args.iters or (2 if args.quick else 10)
    have_l2l = learn2learn_available()
    impls = list(args.impls) + (["learn2learn"] if have_l2l else [])
    machine = machine_fields()
    bf16, why = native_bf16(torch.device("cpu"))
    print(cpu_header())
    print(
        f"metalearn vs learn2learn training; median of {iters} iterations after 1 warm-up, implementations taking turns"
    )
    if not have_l2l:
        print("learn2learn is not installed: measuring metalearn only (bash scripts/install_learn2learn.sh adds it)")
    print(
        "metalearn: float32, channels-last, one task per core; metalearn-bf16: device.amp=true (bf16 autocast); "
        "metalearn-nchw: device.channels_last=false"
    )
    print(f"device.amp=auto (the default) picks {'bf16' if bf16 else 'float32'} here: {why}")
    print(
        f"{'algo':<9} {'setting':<6} {'order':<6} {'batch':>5} {'figure':<9} {'impl':<15} {'meta-it/s':>9} "
        f"{'tasks/s':>8} {'peak MiB':>9} {'vs l2l':>7}"
    )
    rows = []
    for setting in SETTINGS:
        if args.quick and not setting.quick:
            continue
        algo, name, meta_batch = setting.algo, setting.setting, setting.meta_batch
        for order in setting.orders:
            row = {
                **{k: v for k, v in setting._asdict().items() if k not in ("orders", "quick")},
                "order": order,
                "data_root": args.data_root,
                "iters": iters,
                "impls": impls,
            }
            if have_l2l and algo == "maml" and meta_batch == max(s.meta_batch for s in SETTINGS if s.setting == name):
                print(
                    f"{algo:<9} {name:<6} {order:<6} float64 meta-gradient, largest difference to learn2learn: "
                    f"{gradient_check(row):.1e} of the largest entry"
                )
            for figure in FIGURES:
                group = group_in_child("compare", {**row, "figure": figure})
                reference = next((r for r in group if r["impl"] == "learn2learn"), None)
                for r in group:
                    r.update(machine)
                    if reference is not None and r["impl"] != "learn2learn":
                        r["speedup_vs_learn2learn"] = r["tasks_per_s"] / reference["tasks_per_s"]
                    ratio = f"{r['speedup_vs_learn2learn']:.2f}x" if "speedup_vs_learn2learn" in r else ""
                    print(
                        f"{algo:<9} {name:<6} {order:<6} {meta_batch:>5} {figure:<9} {r['impl']:<15} "
                        f"{r['it_per_s']:>9.3f} {r['tasks_per_s']:>8.2f} {r['peak_mem_mib']:>9.0f} {ratio:>7}",
                        flush=True,
                    )
                    rows.append(r)
    if args.json:
        write_json(args.json, rows)
