"""metalearn's Hydra plugins: the Optuna study sweeper."""
