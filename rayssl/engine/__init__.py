"""Pure-PyTorch training: the engine the Ray worker, the benchmark and the experiments share.

``Engine`` (``step.py``) builds the method, optimiser, schedule and precision of a run and holds
THE training step, ``Engine.train_step``; ``Monitor`` (``monitor.py``) turns steps into progress
lines and epoch reports; ``EpochEvaluator`` (``evaluate.py``) scores the backbone on held-out
scenes; ``lockstep`` keeps ranks stepping together without a device sync per step. No Ray.
"""

from rayssl.engine.datawait import DataWait
from rayssl.engine.evaluate import EpochEvaluator
from rayssl.engine.lockstep import control_group, lockstep
from rayssl.engine.monitor import CollapseWatch, Monitor, log
from rayssl.engine.step import (Engine, autocast_for, build_method, checked_forward, new_method,
                                resolve_precision, set_cudnn_benchmark, training_precision, uses_channels_last)

__all__ = ["CollapseWatch", "DataWait", "Engine", "EpochEvaluator", "Monitor", "autocast_for", "build_method",
           "checked_forward", "control_group", "lockstep", "log", "new_method", "resolve_precision", "set_cudnn_benchmark",
           "training_precision", "uses_channels_last"]
