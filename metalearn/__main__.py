"""`python -m metalearn <command> ...`, the form torchrun starts: `torchrun --nproc_per_node=K -m metalearn train`."""

from metalearn.cli import main

main()
