"""MAML training step, metalearn against learn2learn, side by side on this machine.

Both libraries train the same conv4 (metalearn.models.Conv4) from the same
initial weights on the same ready-made task tensors (drawn beforehand from
the real Omniglot training classes; random images when --data-root has no
Omniglot). metalearn runs `MAML.meta_train_step`, the code path of the
runner; learn2learn runs its Omniglot example's loop (`l2l.algorithms.MAML`,
`clone()` and `adapt()` per task, one `backward()` per task). Each row runs
in a fresh process; its peak resident memory is counted from after the
tasks are drawn (the process with torch, model and tasks, then the steps). Before timing,
a float64 check computes one meta-gradient with both and prints the largest
relative difference.

    python scripts/bench.py --quick              # a short run
    python scripts/bench.py --json bench.json    # the full run, rows also as JSON

learn2learn is optional: `bash scripts/install_learn2learn.sh` installs it
into the active environment; without it only metalearn is measured.
"""

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_step import task_split  # the same tasks as the strategy benchmark
from metalearn.algorithms.maml import MAML
from metalearn.data import EpisodeSampler
from metalearn.models import Conv4

# (name, ways, shots, queries, inner steps, inner lr, meta-batch, orders)
SETTINGS = [
    ("5w1s", 5, 1, 15, 1, 0.4, 32, ("second", "first")),
    ("5w1s", 5, 1, 15, 1, 0.4, 8, ("second", "first")),
    ("20w1s", 20, 1, 5, 5, 0.1, 16, ("second",)),
]
FAST = {"amp": True, "channels_last": True}


def learn2learn_available() -> bool:
    try:
        import learn2learn  # noqa: F401
    except ImportError:
        return False
    return True


def make_model(ways: int, fast: bool, dtype=torch.float32) -> Conv4:
    torch.manual_seed(0)
    return Conv4(ways, **(FAST if fast else {})).to(dtype)


class Learn2LearnStep:
    """learn2learn's MAML Omniglot example, one meta-iteration on ready tensors."""

    def __init__(self, model, inner_lr: float, inner_steps: int, first_order: bool):
        import learn2learn as l2l

        self.maml = l2l.algorithms.MAML(model, lr=inner_lr, first_order=first_order)
        self.optimizer = torch.optim.Adam(self.maml.parameters(), lr=1e-3)
        self.inner_steps = inner_steps

    def gradients(self, episodes):
        self.optimizer.zero_grad()
        tasks = len(episodes.support)
        for sx, sy, qx, qy in zip(*episodes):
            learner = self.maml.clone()
            for _ in range(self.inner_steps):
                learner.adapt(F.cross_entropy(learner(sx), sy))
            F.cross_entropy(learner(qx), qy).backward()
        for p in self.maml.parameters():
            p.grad.data.mul_(1.0 / tasks)
        return {name: p.grad for name, p in self.maml.module.named_parameters()}

    def meta_train_step(self, episodes):
        self.gradients(episodes)
        self.optimizer.step()


def build(impl: str, setting: dict, first_order: bool, dtype=torch.float32):
    ways, inner_lr, steps = setting["ways"], setting["inner_lr"], setting["inner_steps"]
    model = make_model(ways, impl == "metalearn-fast", dtype)
    if impl == "learn2learn":
        return Learn2LearnStep(model, inner_lr, steps, first_order)
    return MAML(model, inner_lr=inner_lr, inner_steps=steps, inner_steps_eval=1, outer_lr=1e-3,
                first_order=first_order, vectorize=False)


def batches(setting: dict, count: int, meta_batch: int):
    split = task_split(setting["data_root"])
    sampler = EpisodeSampler(split, setting["ways"], setting["shots"], setting["queries"], "cpu", seed=0)
    return [sampler.sample(meta_batch) for _ in range(count)]


def gradient_check(setting: dict, first_order: bool) -> float:
    """Largest relative difference of one float64 meta-gradient (4 tasks), metalearn vs learn2learn."""
    (episodes,) = batches(setting, 1, 4)
    episodes = type(episodes)(episodes.support.double(), episodes.support_labels, episodes.query.double(),
                              episodes.query_labels)
    ours = build("metalearn", setting, first_order, torch.float64).meta_gradients(episodes)
    theirs = build("learn2learn", setting, first_order, torch.float64).gradients(episodes)
    return max(((ours[n] - theirs[n]).norm() / theirs[n].norm().clamp_min(1e-30)).item() for n in theirs)


def reset_peak_memory() -> None:
    """Start the peak resident-memory count afresh (Linux), so loading the dataset does not count."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_mib() -> float:
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_row(row: dict) -> dict:
    """Time one implementation on one setting (called in a fresh process)."""
    torch.manual_seed(0)
    first_order = row["order"] == "first"
    algo = build(row["impl"], row, first_order)
    work = batches(row, row["warmup"] + row["iters"], row["meta_batch"])
    reset_peak_memory()
    times = []
    for i, episodes in enumerate(work):
        tick = time.perf_counter()
        algo.meta_train_step(episodes)
        if i >= row["warmup"]:
            times.append(time.perf_counter() - tick)
    median = statistics.median(times)
    return {**row, "figure": "step", "it_per_s": 1 / median, "tasks_per_s": row["meta_batch"] / median,
            "peak_mem_mib": peak_memory_mib()}


def in_subprocess(row: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--row", json.dumps(row)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"row {row} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--quick", action="store_true", help="3 timed iterations and the 5-way settings only")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations per row (default 10, quick 3)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        print(json.dumps(run_row(json.loads(args.row))))
        return

    iters = args.iters or (3 if args.quick else 10)
    impls = ["metalearn", "metalearn-fast"] + (["learn2learn"] if learn2learn_available() else [])
    print(f"MAML conv4 training step on ready task tensors; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {iters} timed iterations after 1 warm-up, median")
    if "learn2learn" not in impls:
        print("learn2learn is not installed: measuring metalearn only (bash scripts/install_learn2learn.sh adds it)")
    print("metalearn-fast: device.amp=true device.channels_last=true")
    header = f"{'setting':<8} {'order':<7} {'batch':>5} {'impl':<15} {'meta-it/s':>9} {'tasks/s':>8} " \
             f"{'peak MiB':>9} {'vs l2l':>7}"
    print(header)
    rows = []
    settings = [s for s in SETTINGS if not args.quick or s[0] == "5w1s"]
    for name, ways, shots, queries, steps, inner_lr, meta_batch, orders in settings:
        for order in orders:
            setting = {"algo": "maml", "setting": name, "ways": ways, "shots": shots, "queries": queries,
                       "inner_steps": steps, "inner_lr": inner_lr, "meta_batch": meta_batch, "order": order,
                       "data_root": args.data_root, "iters": iters, "warmup": 1}
            if "learn2learn" in impls and meta_batch == max(s[6] for s in settings if s[0] == name):
                check = gradient_check(setting, order == "first")
                print(f"{name:<8} {order:<7} float64 meta-gradient, max relative difference to learn2learn: "
                      f"{check:.1e}")
            group = [in_subprocess({**setting, "impl": impl}) for impl in impls]
            reference = next((r for r in group if r["impl"] == "learn2learn"), None)
            for r in group:
                if reference is not None and r["impl"] != "learn2learn":
                    r["speedup_vs_learn2learn"] = r["tasks_per_s"] / reference["tasks_per_s"]
                ratio = f"{r['speedup_vs_learn2learn']:.2f}x" if "speedup_vs_learn2learn" in r else ""
                print(f"{name:<8} {order:<7} {meta_batch:>5} {r['impl']:<15} {r['it_per_s']:>9.3f} "
                      f"{r['tasks_per_s']:>8.2f} {r['peak_mem_mib']:>9.0f} {ratio:>7}", flush=True)
                rows.append({k: v for k, v in r.items() if k not in ("data_root", "warmup")})
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
        print(f"rows written to {args.json}")


if __name__ == "__main__":
    main()
