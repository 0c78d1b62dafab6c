"""`metalearn eval` wall time per algorithm, start-up included, and the start-up of the CLI itself.

For each algorithm a 2-step run is trained once on the real Omniglot (5-way
1-shot, the algorithm's defaults; distill's teacher is the finetune run), then
`metalearn eval run=<run> eval.episodes=600` is timed in a fresh process, as a
user runs it. Each row prints the accuracy ± interval and the fingerprint of
the scored episodes, so two code versions can be checked to score the same
episodes the same. The achieved GFLOP/s is the FLOP count of the scoring
(torch.utils.flop_counter on one episode, times the episodes) over the wall
time after start-up; the header prints the machine's plain conv4 training
throughput (forward + backward, one batch of 80 Omniglot images on all cores)
for comparison.

    python scripts/bench.py eval                         # every algorithm (about 5 minutes on 2 cores)
    python scripts/bench.py eval --algos maml reptile --json after.json
    git worktree add ../before <commit>
    python scripts/bench.py eval --code ../before        # before / after columns, speed-up, "same result"
    python scripts/bench.py eval --overrides device.amp=false   # eval overrides (here: float32 on a bf16 CPU)

--code times the evaluations of another checkout of this repository (a
`git worktree`, say) on the same runs, in the same environment, right before
this checkout's of each algorithm, so that a slow spell of the machine hits
both alike.
"""

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from metalearn.algorithms import build_algorithm, run_dtype
from metalearn.config.compose import compose
from metalearn.data import EpisodeSampler, load_split
from metalearn.data.transforms import preprocess_of
from metalearn.device import native_bf16
from metalearn.storage.checkpoint import checkpoint_path, load_checkpoint
from metalearn.storage.run_folder import saved_overrides

from .common import (
    IMAGE_SHAPE,
    add_data_root,
    cpu_header,
    cpu_name,
    metalearn_command,
    plain_training_gflops,
    write_json,
)

ALGOS = ("maml", "fomaml", "anil", "metasgd", "mamlpp", "reptile", "protonet", "finetune", "distill")
# Goals on a 2-core CPU, start-up included (seconds); other algorithms: DEFAULT_GOAL_S. FOMAML and
# MAML++ score as MAML does (the same 10 / 5 adaptation steps at test time): MAML's goal.
GOALS_S = {"reptile": 120.0, "maml": 50.0, "fomaml": 50.0, "mamlpp": 50.0}
DEFAULT_GOAL_S = 15.0
STARTUP_GOAL_S = 1.0


def timed(command, env, cwd=None, check=True) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if check and done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds


def train_run(folder: Path, algo: str, data_root: str, teacher: Path = None) -> Path:
    """A 2-step run of `algo` (5-way 1-shot, its defaults), trained once and reused."""
    if (folder / "checkpoints" / "best.pt").is_file():
        return folder
    command, env, cwd = metalearn_command()
    overrides = [
        f"algo={algo}",
        f"data.root={Path(data_root).resolve()}",
        "train.steps=2",
        "train.val_every=2",
        "train.val_episodes=5",
        f"hydra.run.dir={folder}",
    ]
    if teacher is not None:
        overrides.append(f"algo.teacher={teacher}")
    timed(command + ["train", *overrides], env, cwd)
    return folder


def last_record(run: Path) -> dict:
    lines = (run / "evals.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


def eval_flops(run: Path, episodes: int) -> float:
    """FLOPs of scoring `episodes` episodes: one episode counted in this process (one thread, so that the
    counter sees every operation), times the episodes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = compose(saved_overrides(run))
        split = load_split(cfg.data, "test")
        device = torch.device("cpu")
        task = cfg.task
        sampler = EpisodeSampler(
            split,
            task.ways,
            task.shots,
            task.queries,
            device,
            seed=0,
            dtype=run_dtype(cfg),
            preprocess=preprocess_of(cfg.data),
        )
        ckpt = load_checkpoint(checkpoint_path(run, "best"))
        algo = build_algorithm(cfg, device, ckpt.get("train_classes", 0), split.image_shape)
        algo.load_state_dict(ckpt["algo"])
        batch = sampler.gather(sampler.episode_ids(0, 1))
        with FlopCounterMode(display=False) as counter:
            algo.predict(batch)
        return counter.get_total_flops() * episodes
    finally:
        torch.set_num_threads(threads)


def startup_rows(run: Path, code: Path = None) -> list:
    """Seconds to answer `--help`, `train --cfg job` and a 1-episode `eval` (median of 3)."""
    command, env, cwd = metalearn_command(code)
    probes = {
        "metalearn --help": command + ["--help"],
        "metalearn train --cfg job": command + ["train", "--cfg", "job"],
        "metalearn eval (1 episode)": command + ["eval", f"run={run}", "eval.episodes=1"],
    }
    return [
        {"what": what, "seconds": statistics.median(timed(probe, env, cwd) for _ in range(3))}
        for what, probe in probes.items()
    ]


def scored(run: Path, code: Path, args) -> tuple:
    """Wall seconds of `metalearn eval` on the run (from `code`, None: this checkout), and its record."""
    command, env, cwd = metalearn_command(code)
    seconds = timed(command + ["eval", f"run={run}", f"eval.episodes={args.episodes}", *args.overrides], env, cwd)
    return seconds, last_record(run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_root(parser)
    parser.add_argument("--algos", nargs="+", choices=ALGOS, default=list(ALGOS))
    parser.add_argument("--episodes", type=int, default=600, help="episodes per evaluation")
    parser.add_argument("--runs-dir", help="where the 2-step runs are trained (and reused)")
    parser.add_argument("--code", help="also time this other checkout of the repository (before / after)")
    parser.add_argument("--overrides", nargs="*", default=[], help="of every evaluation")
    parser.add_argument("--json", help="also write the rows to this file")


def run(args) -> None:
    other = Path(args.code) if args.code else None
    runs_dir = Path(args.runs_dir or Path(tempfile.gettempdir()) / "metalearn-bench-eval").resolve()
    machine = cpu_name()
    print(cpu_header())
    print(f"runs: {runs_dir} (2 training steps each, 5-way 1-shot, defaults)")
    if other:
        print(f"before: the checkout {other}; after: this one; each algorithm timed with both in turn")
    if args.overrides:
        print(f"evaluated with: {' '.join(args.overrides)}")
    bf16, why = native_bf16(torch.device("cpu"))
    print(f"device.amp=auto, the runs' setting, computes in {'bf16' if bf16 else 'float32'} here: {why}")
    throughput = {"float32": plain_training_gflops("conv4", IMAGE_SHAPE, False)}
    if bf16:
        throughput["bf16"] = plain_training_gflops("conv4", IMAGE_SHAPE, True)
    print(
        "plain conv4 training throughput here (forward + backward, batch of 80): "
        + ", ".join(f"{rate:.1f} GFLOP/s in {kind}" for kind, rate in throughput.items())
    )
    runs = {}
    for algo in args.algos:
        teacher = runs.get("finetune") or (train_run(runs_dir / "finetune", "finetune", args.data_root))
        runs[algo] = train_run(runs_dir / algo, algo, args.data_root, teacher if algo == "distill" else None)
    startup = {"after": startup_rows(runs[args.algos[0]])}
    if other:
        startup["before"] = startup_rows(runs[args.algos[0]], other)
    for i, row in enumerate(startup["after"]):
        goal = f"  (goal: under {STARTUP_GOAL_S:.0f} s)" if "episode" not in row["what"] else ""
        was = f"  (before: {startup['before'][i]['seconds']:.2f} s)" if other else ""
        print(f"{row['what']:<28} {row['seconds']:6.2f} s{was}{goal}")
    eval_startup = startup["after"][-1]["seconds"]
    header = (
        f"{'algo':<9} {'episodes':>8} {'wall s':>7} {'goal s':>6} {'GFLOP':>7} {'GFLOP/s':>7} "
        f"{'test accuracy':>15}  {'episodes sha256':<15}"
    )
    if other:
        header += f" {'before s':>8} {'speed-up':>8} {'same result':>11}"
    print(header)
    rows = []
    for algo in args.algos:
        run = runs[algo]
        before = scored(run, other, args) if other else None
        seconds, record = scored(run, None, args)
        flops = eval_flops(run, args.episodes)
        rate = flops / 1e9 / max(seconds - eval_startup, 1e-9)
        row = {
            "algo": algo,
            "episodes": args.episodes,
            "seconds": seconds,
            "goal_s": GOALS_S.get(algo, DEFAULT_GOAL_S),
            "gflop": flops / 1e9,
            "gflop_per_s": rate,
            "accuracy": record["accuracy"],
            "ci95": record["ci95"],
            "episode_digest": record["episode_digest"],
        }
        line = (
            f"{algo:<9} {args.episodes:>8} {seconds:>7.1f} {row['goal_s']:>6.0f} {row['gflop']:>7.0f} {rate:>7.1f} "
            f"{100 * row['accuracy']:>7.2f} ± {100 * row['ci95']:<5.2f}  {row['episode_digest'][:12]:<15}"
        )
        if before:
            old_seconds, old = before
            same = old["accuracy"] == row["accuracy"] and old["episode_digest"] == row["episode_digest"]
            row.update({"before_s": old_seconds, "before_accuracy": old["accuracy"], "same_result": same})
            line += f" {old_seconds:>8.1f} {old_seconds / seconds:>7.2f}x {'yes' if same else 'NO':>11}"
        print(line, flush=True)
        rows.append(row)
    if args.json:
        payload = {"machine": machine, "conv4_gflop_per_s": throughput, "startup": startup, "rows": rows}
        write_json(args.json, payload)
