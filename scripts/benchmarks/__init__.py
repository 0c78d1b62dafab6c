"""The benchmarks behind `python scripts/bench.py <subcommand>`.

One module per subcommand (compare, memory, evaluation for `eval`, budget, step, backbone, distributed),
each with add_arguments(parser) and run(args); what several of them share lives in common (the machine,
task tensors, timing, memory, child processes), learn2learn_examples (learn2learn's example loops) and
turns (a setting's implementations timed in turns: compare and memory). Imports run one way:
bench.py -> subcommand modules -> shared modules; a subcommand module never imports another.
"""
