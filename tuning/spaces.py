"""Search spaces: the default one per method, the YAML override format, and validation.

A space maps a config key, spelled as for ``--set`` (``section.key``), to a dimension
(``rayssl.space``). Each method registers its default space (``rayssl.methods``). In a YAML
file (``--search-space FILE.yaml``) keys are grouped by section, as in a ``--config`` file::

    swav:
      epsilon: {loguniform: [0.02, 0.1]}     # log-uniform between the bounds
      temperature: {uniform: [0.05, 0.2]}    # uniform between the bounds
      queue_start_epoch: {randint: [0, 15]}  # an integer, both bounds included
      num_prototypes: {choice: [256, 1000, 3000]}
      sinkhorn_iterations: 3                 # a plain value: fixed for every trial

The file's keys replace the same keys of the method's default space; the other default
dimensions stay. Before any trial starts the whole space is checked against the run's
config: unknown keys, empty or reversed ranges, and every corner of the space (each
dimension at its lowest and highest value, in every combination) is built into a
``Config`` so that the dataclasses' own checks refuse, naming the key, e.g. a negative
temperature or ``mls.k`` not below ``mls.queue_size``. Ray is imported only by ``to_tune``,
which converts to Ray Tune's sampling objects.
"""

from __future__ import annotations

import itertools
from dataclasses import fields
from pathlib import Path
from typing import Any, Mapping

from rayssl.config import SECTIONS, Config, ConfigError, deep_merge, load_yaml
from rayssl.methods import get_method
from rayssl.space import Dim, parse_dim

# Keys a sweep owns: every trial writes to its own directory and resumes by itself.
RESERVED_KEYS = ("run.method", "run.output", "run.resume")

__all__ = ["RESERVED_KEYS", "default_space", "describe", "load_space_file", "nest", "space_to_jsonable", "to_tune",
           "validate_space"]


def default_space(method: str) -> dict[str, Any]:
    """The space the method registered with (``rayssl.methods``): what its paper says matters."""
    space = get_method(method).space
    if not space:
        raise ConfigError(f"--method: no default search space for {method!r}; give one with --search-space FILE.yaml")
    return dict(space)


def to_tune(dim: Any):
    """A Dim -> Ray Tune's sampling object (a fixed value stays as it is)."""
    if not isinstance(dim, Dim):
        return dim
    from ray import tune

    if dim.kind == "choice":
        return tune.choice(list(dim.values))
    if dim.kind == "uniform":
        return tune.uniform(*dim.values)
    if dim.kind == "loguniform":
        return tune.loguniform(*dim.values)
    return tune.randint(dim.values[0], dim.values[1] + 1)  # tune's upper bound is exclusive


# --------------------------------------------------------------------------- files


def load_space_file(path: str | Path) -> dict[str, Any]:
    """Read a ``--search-space`` YAML file of sections -> ``{"section.key": Dim | value}``."""
    raw = load_yaml(path, option="--search-space")
    where = f"--search-space {Path(path)}: "
    out: dict[str, Any] = {}
    for section, keys in raw.items():
        if not isinstance(keys, Mapping):
            raise ConfigError(f"{where}{section}: expected a mapping of keys to dimensions, got {keys!r}")
        for key, value in keys.items():
            dotted = f"{section}.{key}"
            out[dotted] = parse_dim(dotted, value, where)
    return out


# --------------------------------------------------------------------------- validation


def _section_fields(section: str, method_cls: type, method: str) -> list[str]:
    cls = method_cls if section == method else SECTIONS[section]
    return [f.name for f in fields(cls) if f.init]


def validate_space(space: Mapping[str, Any], base: Mapping[str, Any], where: str = "search space: ") -> None:
    """Refuse, naming the key, a space that some trial could not run with.

    ``base`` is the resolved run config as a dict (``Config.to_dict()``) that every trial
    starts from. Checks key names, then builds a ``Config`` at every corner of the space.
    """
    method = base["run"]["method"]
    method_cls = get_method(method).config_cls
    sections = [*SECTIONS, method]
    for key, dim in space.items():
        if "." not in key:
            raise ConfigError(f"{where}{key}: expected section.key (sections: {', '.join(sections)})")
        section, name = key.split(".", 1)
        if section not in sections:
            raise ConfigError(f"{where}{key}: unknown section {section!r} for method {method}; "
                              f"valid sections: {', '.join(sections)}")
        valid = _section_fields(section, method_cls, method)
        if name not in valid:
            raise ConfigError(f"{where}{key}: unknown key; valid keys in {section}: {', '.join(valid)}")
        if key in RESERVED_KEYS:
            raise ConfigError(f"{where}{key}: set by the sweep itself (each trial has its own output), not searchable")
        if isinstance(dim, Dim) and dim.kind == "choice" and not dim.values:
            raise ConfigError(f"{where}{key}: choice needs at least one value")
    keys = list(space)
    corner_lists = [space[k].corners() if isinstance(space[k], Dim) else [space[k]] for k in keys]
    for corner in itertools.product(*corner_lists):
        assignment = dict(zip(keys, corner))
        try:
            if Config.from_dict(deep_merge(dict(base), nest(assignment))).run.in_process:
                raise ConfigError("run.num_workers: a sweep's trials train on Ray Train workers (1 or more); "
                                  "0, training in this process, is for a single run")
        except ConfigError as exc:
            at = ", ".join(f"{k}={v}" for k, v in assignment.items() if isinstance(space[k], Dim))
            raise ConfigError(f"{where}{exc}" + (f" (a trial of this space could draw {at})" if at else "")) from None


def nest(assignment: Mapping[str, Any]) -> dict:
    """``{"swav.epsilon": 0.05}`` -> ``{"swav": {"epsilon": 0.05}}``."""
    out: dict = {}
    for dotted, value in assignment.items():
        section, key = dotted.split(".", 1)
        out.setdefault(section, {})[key] = value
    return out


def space_to_jsonable(space: Mapping[str, Any]) -> dict:
    """The space as plain data (for the sweep's stored spec and the results file)."""
    return {k: (v.to_jsonable() if isinstance(v, Dim) else v) for k, v in space.items()}


def describe(space: Mapping[str, Any]) -> str:
    return "\n".join(f"  {k}: {v.describe() if isinstance(v, Dim) else f'fixed {v}'}" for k, v in space.items())
