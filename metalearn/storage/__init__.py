"""What a run leaves on disk: atomic writes (atomic), checkpoints, the run folder and its one writer (run_lock)."""
