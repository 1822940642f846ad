"""Search spaces: the default one per method, the YAML override format, and validation.

A space maps a config key, spelled as for ``--set`` (``section.key``), to a dimension.
In a YAML file (``--search-space FILE.yaml``) keys are grouped by section, as in a
``--config`` file; a dimension is one of

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
temperature or ``mls.k`` not below ``mls.queue_size``. Nothing here imports Ray; ``to_tune``
converts to Ray Tune's sampling objects on demand.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from rayssl.config import SECTIONS, Config, ConfigError, deep_merge, load_yaml

KINDS = ("choice", "uniform", "loguniform", "randint")


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

    def to_tune(self):
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "uniform":
            return tune.uniform(*self.values)
        if self.kind == "loguniform":
            return tune.loguniform(*self.values)
        return tune.randint(self.values[0], self.values[1] + 1)  # tune's upper bound is exclusive

    def describe(self) -> str:
        if self.kind == "choice":
            return "choice " + ", ".join(map(str, self.values))
        return f"{self.kind} [{self.values[0]}, {self.values[1]}]"


def choice(*values) -> Dim:
    return Dim("choice", tuple(values))


def uniform(low: float, high: float) -> Dim:
    return Dim("uniform", (low, high))


def loguniform(low: float, high: float) -> Dim:
    return Dim("loguniform", (low, high))


def randint(low: int, high: int) -> Dim:
    """An integer in [low, high], both included."""
    return Dim("randint", (low, high))


# --------------------------------------------------------------------------- defaults
# What each paper says matters, around the paper's value. Keys are ``--set`` keys; a method
# whose name is not registered yet (e.g. while it is being built) is skipped by the CLI.
DEFAULT_SPACES: dict[str, dict[str, Any]] = {
    # SwAV (Caron et al. 2020): K, epsilon and tau of the swapped prediction; the queue
    # (length and first epoch) is what makes or breaks small-batch runs.
    "swav": {
        "swav.num_prototypes": choice(256, 1000, 3000),
        "swav.epsilon": loguniform(0.02, 0.1),
        "swav.temperature": loguniform(0.05, 0.2),
        "swav.queue_length": choice(0, 3840),
        "swav.queue_start_epoch": choice(1, 5, 15),
        "optim.base_lr": loguniform(0.05, 0.6),
    },
    # MLS (Zhu, Fu, Wu 2023): k positives (ablated 1/5/20/40), tau, the BCE weight lambda
    # and the queue size D; k stays below the smallest D.
    "mls": {
        "mls.k": choice(1, 5, 20, 40),
        "mls.temperature": loguniform(0.1, 0.3),
        "mls.lam": uniform(0.1, 1.0),
        "mls.queue_size": choice(1024, 4096),
        "optim.base_lr": loguniform(0.01, 0.3),
    },
    # MoCo-v2, the lambda = 0 baseline of MLS.
    "moco": {
        "moco.temperature": loguniform(0.1, 0.3),
        "moco.queue_size": choice(1024, 4096),
        "optim.base_lr": loguniform(0.01, 0.3),
    },
    # CDUL (Abdelfattah et al. 2023), training stage: how often gradient alignment updates
    # the labels, the sigma of its Gaussian weight around 0.5, its step, and the lr. The
    # labelling stage's snippet grid, gamma and lambda are options of the separate CLIP job
    # (`python -m rayssl.pseudolabel --grid --gamma --lam`), whose output a sweep takes as
    # --set cdul.pseudo_labels=URI: compare label sets by running that job once per setting.
    "cdul": {
        "cdul.label_update_every": choice(1, 2, 5),
        "cdul.label_sigma": loguniform(0.1, 1.0),
        "cdul.label_lr": loguniform(0.1, 10.0),
        "optim.base_lr": loguniform(0.001, 0.1),
    },
}

# Keys a sweep owns: every trial writes to its own directory and resumes by itself.
RESERVED_KEYS = ("run.method", "run.output", "run.resume")


def default_space(method: str) -> dict[str, Any]:
    if method not in DEFAULT_SPACES:
        raise ConfigError(f"--method: no default search space for {method!r}; give one with --search-space FILE.yaml")
    return dict(DEFAULT_SPACES[method])


# --------------------------------------------------------------------------- files


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
    from rayssl.methods import get_method

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
            Config.from_dict(deep_merge(dict(base), nest(assignment)))
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
    return {k: ({v.kind: list(v.values)} if isinstance(v, Dim) else v) for k, v in space.items()}


def describe(space: Mapping[str, Any]) -> str:
    return "\n".join(f"  {k}: {v.describe() if isinstance(v, Dim) else f'fixed {v}'}" for k, v in space.items())
