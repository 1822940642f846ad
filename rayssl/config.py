"""A run's whole configuration: the shared sections plus the chosen method's own section.

Resolution order (later wins): dataclass defaults (the papers' settings) < preset
(``quick`` for the built-in scenes, ``paper`` otherwise; ``rayssl.presets``) <
``--config FILE.yaml`` < command-line flags < ``--set``. The resolved config is written next
to the run's checkpoints. The shared sections and the way values are read live in
``rayssl.sections``; each method's section lives with the method (``rayssl.methods``).
Nothing here imports Ray.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

from rayssl.methods import get_method, method_names
from rayssl.sections import (  # noqa: F401 - the configuration's public names, in one place
    SECTIONS,
    ConfigError,
    DataSection,
    EvalSection,
    ModelSection,
    OptimSection,
    RunSection,
    build_section,
    check,
    deep_merge,
    load_yaml,
    parse_assignment,
)


def apply_assignments(raw: dict, assignments) -> dict:
    """``raw`` with each ``section.key=value`` of ``assignments`` layered on, in order (``--set``)."""
    for text in assignments:
        raw = deep_merge(raw, parse_assignment(text))
    return raw


@dataclass
class Config:
    """The whole run: shared sections plus the section of the chosen method."""

    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    eval: EvalSection = field(default_factory=EvalSection)
    method: Any = None  # the method's own dataclass (e.g. SwAVConfig), under its name

    def __post_init__(self) -> None:
        spec = get_method(self.run.method)
        if self.method is None:
            self.method = spec.config_cls()
        check(isinstance(self.method, spec.config_cls), self.run.method,
              f"expected a {spec.config_cls.__name__} section")
        # Cross-section checks: the method knows what it needs of data and run.
        self.method.validate_with(self.run, self.data)
        check(not self.eval.online_probe or bool(self.eval.data)
              or (self.data.builtin_scenes and self.eval.num_test_images > 0), "eval.online_probe",
              "needs labelled images: add --eval-data (or train on the built-in scenes with eval.num_test_images > 0)")

    # -- conversion ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        out[self.run.method] = dataclasses.asdict(self.method)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "Config":
        raw = dict(raw or {})
        method = (raw.get("run") or {}).get("method", RunSection.method)
        if method not in method_names():
            raise ConfigError(f"run.method: unknown method {method!r}; choose one of {', '.join(method_names())}")
        spec = get_method(method)
        valid = list(SECTIONS) + [method]
        unknown = [k for k in raw if k not in valid]
        if unknown:
            raise ConfigError(
                f"unknown section(s) {', '.join(map(repr, unknown))}; valid sections: {', '.join(valid)}"
            )
        kwargs = {name: build_section(SECTIONS[name], raw.get(name) or {}, name) for name in SECTIONS}
        kwargs["method"] = build_section(spec.config_cls, raw.get(method) or {}, method)
        return cls(**kwargs)
