"""One module per command: its arguments, its Hydra app and what it runs."""
