"""Ray Tune sweeps over rayssl runs: ``python -m tuning.sweep`` (see ``tuning/sweep.py``);
the default search space of each method is in ``tuning/spaces.py``."""
