"""Ray Tune sweeps over rayssl runs: ``python -m tuning.sweep``. ``runner.py`` runs the sweep
(one TorchTrainer run per trial); ``spaces.py`` reads, checks and converts search spaces (each
method registers its default space in ``rayssl/methods/``)."""
