"""metalearn's benchmarks, one command: `python scripts/bench.py <subcommand> [options]`.

The subcommands: compare (metalearn against learn2learn, training step and iteration), memory
(second-order MAML's memory against the inner steps), eval (`metalearn eval` wall time per algorithm),
train (`metalearn train` speed, CPU time and memory per algorithm),
budget (time to accuracy), step (MAML per strategy and order, CPU or GPU), backbone (conv4 and ResNet-12
on RGB images), distributed (1 against K processes), fidelity (float32, bf16 and TF32 updates and
predictions against float64, per algorithm). `python scripts/bench.py <subcommand> --help` says
what each measures and how. For example:

    python scripts/bench.py compare --quick              # a short run (about 3 minutes)
    python scripts/bench.py compare --json bench.json    # the full run, rows also as JSON
    python scripts/bench.py memory --quick --steps 1 5 --settings 5w1s
    python scripts/bench.py eval --json eval.json
    python scripts/bench.py train --algos protonet maml
    python scripts/bench.py budget 20
    python scripts/bench.py step --device cuda
    python scripts/bench.py fidelity --algos maml reptile

Every benchmark prints the processor it ran on. learn2learn is optional: `bash
scripts/install_learn2learn.sh` installs it into the active environment; without it only metalearn is
measured. The code is in scripts/benchmarks/, one module per subcommand.
"""

import argparse
import importlib
import sys

# name: (its module in scripts/benchmarks/, one line for --help). Only the chosen subcommand's module is
# imported, so that a benchmark's child process holds no other benchmark's imports in its measured memory.
SUBCOMMANDS = {
    "compare": ("compare", "metalearn against learn2learn: the training step and the whole iteration"),
    "memory": ("memory", "second-order MAML's peak memory and tasks/s as the inner steps grow"),
    "eval": ("evaluation", "`metalearn eval` wall time per algorithm, and the CLI's start-up"),
    "train": ("training", "`metalearn train` tasks/s, GFLOP/s, CPU time and memory per algorithm"),
    "budget": ("budget", "time to accuracy: MAML trained MINUTES by each library"),
    "step": ("step", "MAML meta-iterations/s per strategy (loop, vmap) and order"),
    "backbone": ("backbone", "speed and memory of conv4 and ResNet-12 steps on RGB images"),
    "distributed": ("distributed", "tasks/s of one training run on 1 and K processes (torchrun)"),
    "fidelity": ("fidelity", "float32, bf16 and TF32 updates and predictions of each algorithm against float64"),
}


def parser(chosen: str | None) -> argparse.ArgumentParser:
    """The command's parser, with the options of the `chosen` subcommand (its module imported)."""
    top = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    subcommands = top.add_subparsers(dest="subcommand", required=True)
    for name, (module_name, summary) in SUBCOMMANDS.items():
        if name != chosen:
            subcommands.add_parser(name, help=summary)
            continue
        module = importlib.import_module(f"benchmarks.{module_name}")
        sub = subcommands.add_parser(
            name, help=summary, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return top


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    args = parser(chosen).parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
