"""Second-order MAML's peak memory and tasks/s as the inner steps grow.

conv4, Omniglot 28x28, meta-batch 4; 20-way 5-shot with 5 queries and 5-way 1-shot
with 15 queries per class, inner_lr 0.1 and 0.4, as the compare subcommand's settings;
its "step" figure's ready-made task tensors. Three implementations: "metalearn"
(the CPU default, algo.vectorize=loop, which runs one task per core at once),
"metalearn-checkpoint" (algo.checkpoint_inner=true: each inner step's
activations recomputed in the backward pass) and "learn2learn"
(l2l.algorithms.MAML, clone() / adapt(), first_order=False, a task at a
time). Every (setting, inner steps, implementation) runs in its own fresh
process; "base" is its resident memory once the model and tasks are built,
before the first step, "peak" its peak resident memory over the warm-up and
timed iterations, "growth" their difference; "tasks/s" the median over 3
timed iterations (--quick: 2), or over 1 where the warm-up took over 20 s.

    python scripts/bench.py memory                  # inner steps 1 5 10 20 (about 12 minutes on 2 cores)
    python scripts/bench.py memory --quick --steps 1 5 --settings 5w1s
"""

import argparse

from .common import add_data_root, cpu_header, learn2learn_available, machine_fields, write_json
from .turns import CHECKPOINTED, add_group_option, group_in_child, print_group

# name -> (ways, shots, queries, inner_lr): the queries and inner rates of compare's 5-way and 20-way rows
MEMORY_SETTINGS = {"20w5s": (20, 5, 5, 0.1), "5w1s": (5, 1, 15, 0.4)}
MEMORY_IMPLS = ("metalearn", CHECKPOINTED, "learn2learn")
SLOW_S = 20.0  # a row whose warm-up iteration takes longer is timed over one iteration


def memory_rows(settings, steps, meta_batch: int, iters: int, data_root: str, impls) -> list:
    """Second-order MAML, one fresh process per (setting, inner steps, implementation); prints a line each."""
    print(
        f"{'setting':<7} {'queries':>7} {'steps':>5} {'impl':<21} {'base MiB':>8} {'peak MiB':>8} "
        f"{'growth MiB':>10} {'tasks/s':>8} {'timed':>5}"
    )
    rows = []
    for name in settings:
        ways, shots, queries, inner_lr = MEMORY_SETTINGS[name]
        for inner_steps in steps:
            for impl in impls:
                row = {
                    "algo": "maml",
                    "setting": name,
                    "ways": ways,
                    "shots": shots,
                    "queries": queries,
                    "inner_steps": inner_steps,
                    "inner_lr": inner_lr,
                    "meta_batch": meta_batch,
                    "order": "second",
                    "data_root": data_root,
                    "iters": iters,
                    "impls": [impl],
                    "figure": "step",
                    "slow_s": SLOW_S,
                }
                (r,) = group_in_child("memory", row)
                r["figure"] = "memory"
                r["growth_mem_mib"] = r["peak_mem_mib"] - r["baseline_mem_mib"]
                print(
                    f"{name:<7} {queries:>7} {inner_steps:>5} {impl:<21} {r['baseline_mem_mib']:>8.0f} "
                    f"{r['peak_mem_mib']:>8.0f} {r['growth_mem_mib']:>10.0f} {r['tasks_per_s']:>8.3f} "
                    f"{r['iterations']:>5}",
                    flush=True,
                )
                rows.append(r)
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_root(parser)
    parser.add_argument("--quick", action="store_true", help="2 timed iterations")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations per row (default 3, quick 2)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5, 10, 20], help="inner steps")
    parser.add_argument("--settings", nargs="+", choices=list(MEMORY_SETTINGS), default=list(MEMORY_SETTINGS))
    parser.add_argument("--meta-batch", type=int, default=4, help="tasks per meta-batch")
    add_group_option(parser)


def run(args) -> None:
    if args.group:
        print_group(args.group)
        return
    iters = args.iters or (2 if args.quick else 3)
    have_l2l = learn2learn_available()
    machine = machine_fields()
    print(cpu_header())
    print(
        f"second-order MAML, conv4, Omniglot 28x28, meta-batch {args.meta_batch}, ready-made tasks; "
        f"tasks/s: median of {iters} iterations after 1 warm-up (timed: 1 where the warm-up took over "
        f"{SLOW_S:.0f} s); one fresh process per row"
    )
    print(
        "metalearn: algo.vectorize=loop (one task per core at once); metalearn-checkpoint: "
        "algo.checkpoint_inner=true; learn2learn: l2l.algorithms.MAML clone/adapt, a task at a time"
    )
    print("base: resident memory before the first step; peak: peak resident memory; growth: peak - base")
    if not have_l2l:
        print("learn2learn is not installed: skipping its rows (bash scripts/install_learn2learn.sh adds it)")
    impls = [impl for impl in MEMORY_IMPLS if have_l2l or impl != "learn2learn"]
    rows = memory_rows(args.settings, args.steps, args.meta_batch, iters, args.data_root, impls)
    for r in rows:
        r.update(machine)
    if args.json:
        write_json(args.json, rows)
