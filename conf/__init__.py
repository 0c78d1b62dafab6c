# Makes conf/ importable as metalearn.conf, so Hydra finds it inside the wheel.
