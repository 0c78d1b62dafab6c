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

    python scripts/bench.py --quick              # a short run (about 3 minutes)
    python scripts/bench.py --json bench.json    # the full run, rows also as JSON
    python scripts/bench.py --quick --impls metalearn metalearn-nchw metalearn-bf16

--memory: second-order MAML's peak memory as the inner steps grow (conv4,
Omniglot 28x28, meta-batch 4; 20-way 5-shot with 5 queries and 5-way 1-shot
with 15 queries per class, inner_lr 0.1 and 0.4, as the settings above; the
"step" figure's ready-made task tensors). Three implementations: "metalearn"
(the CPU default, algo.vectorize=loop, which runs one task per core at once),
"metalearn-checkpoint" (algo.checkpoint_inner=true: each inner step's
activations recomputed in the backward pass) and "learn2learn"
(l2l.algorithms.MAML, clone() / adapt(), first_order=False, a task at a
time). Every (setting, inner steps, implementation) runs in its own fresh
process; "base" is its resident memory once the model and tasks are built,
before the first step, "peak" its peak resident memory over the warm-up and
timed iterations, "growth" their difference; "tasks/s" the median over 3
timed iterations (--quick: 2), or over 1 where the warm-up took over 20 s.

    python scripts/bench.py --memory                  # inner steps 1 5 10 20 (about 12 minutes on 2 cores)
    python scripts/bench.py --memory --quick --steps 1 5 --settings 5w1s

--eval: `metalearn eval` wall time per algorithm and the CLI's start-up
(scripts/bench_eval.py says how):

    python scripts/bench.py --eval --json eval.json

--budget MINUTES: time to accuracy, MAML trained for the same wall-clock time
by metalearn and by learn2learn's example loop, both scored on the same test
episodes (scripts/bench_budget.py says how):

    python scripts/bench.py --budget 20

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
from typing import NamedTuple

import bench_eval
import torch
import torch.nn.functional as F
from bench_step import task_split  # the same tasks as the strategy benchmark

from metalearn.algorithms import build_algorithm
from metalearn.config.compose import compose
from metalearn.data import EpisodeSampler
from metalearn.data.cache import cache_dir
from metalearn.device import cpu_isa, cpu_model, native_bf16
from metalearn.models import build_model


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
# name: (bf16 autocast, channels-last), i.e. device.amp and device.channels_last
IMPLS = {"metalearn": (False, True), "metalearn-bf16": (True, True), "metalearn-nchw": (False, False)}
DEFAULT_IMPLS = ("metalearn", "metalearn-bf16")
IMAGE_SHAPE = (1, 28, 28)  # Omniglot's
FIGURES = ("step", "iteration")
# --memory: name -> (ways, shots, queries, inner_lr), the queries and inner rates of SETTINGS' 5-way and 20-way rows
MEMORY_SETTINGS = {"20w5s": (20, 5, 5, 0.1), "5w1s": (5, 1, 15, 0.4)}
MEMORY_IMPLS = ("metalearn", "metalearn-checkpoint", "learn2learn")
CHECKPOINTED = "metalearn-checkpoint"  # "metalearn" with algo.checkpoint_inner=true
SLOW_S = 20.0  # --memory: a row whose warm-up iteration takes longer is timed over one iteration


def learn2learn_available() -> bool:
    try:
        import learn2learn  # noqa: F401
    except ImportError:
        return False
    return True


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


def make_model(ways: int, dtype=torch.float32) -> torch.nn.Module:
    """The runner's conv4 (models.build_model) for Omniglot images, with the seed-0 initial weights."""
    torch.manual_seed(0)
    return build_model(compose().model, ways, IMAGE_SHAPE).to(dtype)


# --- learn2learn, as its examples write it ------------------------------------


def learn2learn_model(ways: int, dtype=torch.float32) -> torch.nn.Module:
    """learn2learn's own conv4 (conv, BatchNorm, ReLU, max-pool blocks) holding metalearn's initial weights.

    ways=0 gives the embedding network (ProtoNet).
    """
    from learn2learn.vision.models import ConvBase

    layers = [ConvBase(hidden=64, channels=1, max_pool=True, layers=4), torch.nn.Flatten()]
    if ways:
        layers.append(torch.nn.Linear(64, ways))
    model = torch.nn.Sequential(*layers).to(dtype)
    ours = make_model(ways, dtype=dtype).state_dict()
    with torch.no_grad():
        for theirs, mine in zip(learn2learn_names(ways), ours, strict=False):
            model.get_parameter(theirs).copy_(ours[mine])
    return model


def learn2learn_names(ways: int):
    """learn2learn's parameter names in the order of metalearn's."""
    body = [f"0.{i}.{part}.{kind}" for i in range(4) for part in ("conv", "normalize") for kind in ("weight", "bias")]
    return body + (["2.weight", "2.bias"] if ways else [])


class Learn2LearnLoop:
    """One backward() per task, gradients averaged over the meta-batch, then the optimizer's step."""

    def __init__(self, module: torch.nn.Module):
        self.optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
        self.params = list(module.parameters())

    def accumulate(self, tasks) -> None:
        self.optimizer.zero_grad()
        count = 0
        for task in tasks:
            self.task_backward(*task)
            count += 1
        for p in self.params:
            p.grad.data.mul_(1.0 / count)

    def train_on(self, tasks) -> None:
        self.accumulate(tasks)
        self.optimizer.step()

    def meta_train_step(self, episodes) -> None:
        self.train_on(zip(*episodes, strict=False))


class Learn2LearnMAML(Learn2LearnLoop):
    """learn2learn's MAML Omniglot example: clone() and adapt() per task."""

    def __init__(self, ways, inner_lr: float, inner_steps: int, first_order: bool, dtype=torch.float32):
        import learn2learn as l2l

        self.maml = l2l.algorithms.MAML(learn2learn_model(ways, dtype), lr=inner_lr, first_order=first_order)
        super().__init__(self.maml)
        self.inner_steps = inner_steps

    def task_backward(self, sx, sy, qx, qy):
        learner = self.maml.clone()
        for _ in range(self.inner_steps):
            learner.adapt(F.cross_entropy(learner(sx), sy))
        F.cross_entropy(learner(qx), qy).backward()

    def gradients(self, episodes):
        """The meta-gradient by metalearn's parameter names."""
        self.accumulate(zip(*episodes, strict=False))
        params = dict(self.maml.module.named_parameters())
        ours = [name for name, _ in make_model(2).named_parameters()]
        return {mine: params[theirs].grad for mine, theirs in zip(ours, learn2learn_names(2), strict=False)}


class Learn2LearnProtoNet(Learn2LearnLoop):
    """learn2learn's ProtoNet example: embed, class-mean prototypes, negative squared distances."""

    def __init__(self):
        self.model = learn2learn_model(0)
        super().__init__(self.model)

    def task_backward(self, sx, sy, qx, qy):
        ways = int(sy.max()) + 1
        embeddings = self.model(torch.cat([sx, qx]))
        support, query = embeddings[: len(sx)], embeddings[len(sx) :]
        prototypes = torch.stack([support[sy == c].mean(dim=0) for c in range(ways)])
        logits = -((query.unsqueeze(1) - prototypes.unsqueeze(0)) ** 2).sum(dim=2)
        F.cross_entropy(logits, qy).backward()


def learn2learn_tasks(row: dict):
    """learn2learn's Omniglot benchmark tasksets on local files; a function drawing one task.

    torchvision's Omniglot checks the zips' md5 against the original
    download, which our re-encoded copies do not match, so the archives are
    extracted once into the cache and that check is pointed at the folders.
    """
    import zipfile

    import learn2learn as l2l
    import torchvision

    root = cache_dir(None) / "learn2learn-omniglot"
    for part in ("images_background", "images_evaluation"):
        if not (root / "omniglot-py" / part).is_dir():
            with zipfile.ZipFile(Path(row["data_root"]) / "omniglot-py" / f"{part}.zip") as archive:
                archive.extractall(root / "omniglot-py")
    torchvision.datasets.Omniglot._check_integrity = lambda self: (Path(self.root) / self._get_target_folder()).is_dir()
    tasksets = l2l.vision.benchmarks.get_tasksets(
        "omniglot",
        train_ways=row["ways"],
        train_samples=row["shots"] + row["queries"],
        test_ways=row["ways"],
        test_samples=row["shots"] + row["queries"],
        root=str(root),
    )
    per_class = row["shots"] + row["queries"]
    support = (torch.arange(row["ways"] * per_class) % per_class) < row["shots"]

    def draw():
        data, labels = tasksets.train.sample()
        return data[support], labels[support], data[~support], labels[~support]

    return draw


# --- the implementations under test -------------------------------------------


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


def reset_peak_memory() -> None:
    """Start the peak resident-memory count afresh (Linux)."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def resident_memory_mib() -> float:
    """The process's resident memory now (Linux; 0 elsewhere)."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) / 1024
    except (OSError, StopIteration):
        return 0.0


def peak_memory_mib() -> float:
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
                timed = 1  # --memory: a slow row's peak is in its warm-up already; one timed iteration
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


def in_subprocess(row: dict) -> list:
    out = subprocess.run([sys.executable, __file__, "--group", json.dumps(row)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{row['algo']} {row['setting']} {row['figure']} {row['impls']} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


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
                (r,) = in_subprocess(row)
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument(
        "--quick", action="store_true", help="2 timed iterations; MAML 5-way meta-batch 32 and ProtoNet only"
    )
    parser.add_argument(
        "--iters", type=int, default=None, help="timed iterations per figure (default 10, --memory 3, quick 2)"
    )
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument(
        "--impls",
        nargs="+",
        choices=list(IMPLS),
        default=list(DEFAULT_IMPLS),
        help="metalearn variants to measure (learn2learn joins when installed)",
    )
    parser.add_argument(
        "--memory", action="store_true", help="second-order MAML's peak memory and tasks/s against the inner steps"
    )
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5, 10, 20], help="--memory: inner steps")
    parser.add_argument(
        "--settings", nargs="+", choices=list(MEMORY_SETTINGS), default=list(MEMORY_SETTINGS), help="--memory: settings"
    )
    parser.add_argument("--meta-batch", type=int, default=4, help="--memory: tasks per meta-batch")
    parser.add_argument("--eval", action="store_true", help="metalearn eval's wall time per algorithm, and start-up")
    parser.add_argument("--algos", nargs="+", choices=bench_eval.ALGOS, default=list(bench_eval.ALGOS), help="--eval")
    parser.add_argument("--episodes", type=int, default=600, help="--eval: episodes per evaluation")
    parser.add_argument("--runs-dir", help="--eval: where the 2-step runs are trained (and reused)")
    parser.add_argument("--code", help="--eval: also time this other checkout of the repository (before / after)")
    parser.add_argument(
        "--overrides", nargs="*", default=[], help="--eval: of every evaluation; --budget: of both libraries' MAML"
    )
    parser.add_argument(
        "--budget", type=float, metavar="MINUTES", help="time to accuracy: MAML trained MINUTES per library"
    )
    parser.add_argument("--group", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.group:
        print(json.dumps(run_group(json.loads(args.group))))
        return
    if args.eval:
        bench_eval.run_eval_bench(args)
        return
    if args.budget:
        from bench_budget import run_budget_bench  # imports bench: not at the top

        run_budget_bench(args)
        return

    iters = args.iters or (2 if args.quick else 3 if args.memory else 10)
    have_l2l = learn2learn_available()
    impls = list(args.impls) + (["learn2learn"] if have_l2l else [])
    machine = {"cpu": cpu_model(), "isa": cpu_isa()}
    if args.memory:
        print(f"CPU: {machine['cpu']} ({machine['isa']}); torch {torch.__version__}, {torch.get_num_threads()} threads")
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
        memory_impls = [impl for impl in MEMORY_IMPLS if have_l2l or impl != "learn2learn"]
        rows = memory_rows(args.settings, args.steps, args.meta_batch, iters, args.data_root, memory_impls)
        for r in rows:
            r.update(machine)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
            print(f"rows written to {args.json}")
        return
    bf16, why = native_bf16(torch.device("cpu"))
    print(f"CPU: {machine['cpu']} ({machine['isa']}); torch {torch.__version__}, {torch.get_num_threads()} threads")
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
                group = in_subprocess({**row, "figure": figure})
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
        Path(args.json).write_text(json.dumps(rows, indent=1))
        print(f"rows written to {args.json}")


if __name__ == "__main__":
    main()
