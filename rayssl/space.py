"""Search-space dimensions: plain data that says which values a config key may take in a sweep.

A method declares its default space with these (``rayssl.methods``); ``tuning.spaces`` reads
the YAML form, checks a space against a run's config and turns dimensions into Ray Tune's
sampling objects. Nothing here imports Ray or torch.

In YAML a dimension is one of::

    epsilon: {loguniform: [0.02, 0.1]}     # log-uniform between the bounds
    temperature: {uniform: [0.05, 0.2]}    # uniform between the bounds
    queue_start_epoch: {randint: [0, 15]}  # an integer, both bounds included
    num_prototypes: {choice: [256, 1000, 3000]}
    sinkhorn_iterations: 3                 # a plain value: fixed for every trial
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from rayssl.sections import ConfigError

KINDS = ("choice", "uniform", "loguniform", "randint")

__all__ = ["KINDS", "Dim", "choice", "uniform", "loguniform", "randint", "parse_dim"]


@dataclass(frozen=True)
class Dim:
    """One dimension: ``kind`` in KINDS with its ``values`` (choices, or [low, high])."""

    kind: str
    values: tuple

    def corners(self) -> list:
        """The values at which a range is most extreme (every choice for categorical ones)."""
        if self.kind != "choice":
            return [self.values[0], self.values[1]]
        vals = list(self.values)
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            return sorted({min(vals), max(vals)})
        return vals

    def describe(self) -> str:
        if self.kind == "choice":
            return "choice " + ", ".join(map(str, self.values))
        return f"{self.kind} [{self.values[0]}, {self.values[1]}]"

    def to_jsonable(self) -> dict:
        return {self.kind: list(self.values)}


def choice(*values) -> Dim:
    return Dim("choice", tuple(values))


def uniform(low: float, high: float) -> Dim:
    return Dim("uniform", (low, high))


def loguniform(low: float, high: float) -> Dim:
    return Dim("loguniform", (low, high))


def randint(low: int, high: int) -> Dim:
    """An integer in [low, high], both included."""
    return Dim("randint", (low, high))


def parse_dim(key: str, value: Any, where: str) -> Any:
    """A YAML value -> a Dim or a fixed value; errors name the key and the file."""
    if not isinstance(value, Mapping):
        if isinstance(value, list):
            raise ConfigError(f"{where}{key}: a list is ambiguous; write {{choice: {value}}} to sweep over it")
        return value
    if len(value) != 1 or next(iter(value)) not in KINDS:
        raise ConfigError(f"{where}{key}: expected one of {', '.join(f'{{{k}: [...]}}' for k in KINDS)}, "
                          f"got {dict(value)!r}")
    kind, args = next(iter(value.items()))
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{where}{key}: {kind} needs a non-empty list, got {args!r}")
    if kind == "choice":
        return Dim(kind, tuple(args))
    if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        raise ConfigError(f"{where}{key}: {kind} needs [low, high] numbers, got {args!r}")
    low, high = args
    if kind == "randint" and not all(float(a).is_integer() for a in args):
        raise ConfigError(f"{where}{key}: randint bounds must be integers, got {args!r}")
    if low > high:
        raise ConfigError(f"{where}{key}: impossible range [{low}, {high}]: the low bound is above the high bound")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}{key}: loguniform needs bounds > 0, got [{low}, {high}]")
    if kind == "randint":
        return Dim(kind, (int(low), int(high)))
    return Dim(kind, (float(low), float(high)))
