"""The house's rules, read from the code's own imports (every import, also inside functions):

* only the command line (``rayssl/cli/``) parses argv; ``python -m`` shims only call it;
* only the Ray rooms import Ray: the runtime, the Ray Data pipelines and jobs, and Tune;
* no private name crosses a module border (``from x import _y``);
* no room imports a room above it (the engine never reaches the runtime, data never the
  engine, nothing below the command line reaches it ...);
* files stay small and the Ray worker function stays glue.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for root in ("rayssl", "tuning") for p in (REPO / root).rglob("*.py"))

# The documented `python -m` forms that live inside lower packages: they only call rayssl.cli.
SHIMS = {"rayssl/train.py", "rayssl/__main__.py", "tuning/sweep.py", "rayssl/eval/__main__.py",
         "rayssl/export/__main__.py", "rayssl/pseudolabel/__main__.py", "rayssl/viz/__main__.py",
         "rayssl/bench/__main__.py", "rayssl/data/scenes/__main__.py", "rayssl/data/shards/__main__.py"}
RAY_ROOMS = ("rayssl/runtime/", "rayssl/data/pipeline.py", "rayssl/data/indexed.py", "rayssl/data/stats.py",
             "rayssl/data/shards/write.py", "rayssl/eval/job.py", "rayssl/pseudolabel/job.py", "tuning/")
ROOMS = {  # a room: the files under these paths
    "cli": ("rayssl/cli/",), "tuning": ("tuning/",), "bench": ("rayssl/bench/",), "runtime": ("rayssl/runtime/",),
    "engine": ("rayssl/engine/",), "viz": ("rayssl/viz/",), "methods": ("rayssl/methods/",),
    "pseudolabel": ("rayssl/pseudolabel/",), "eval": ("rayssl/eval/",), "export": ("rayssl/export/",),
    "data": ("rayssl/data/",), "parts": ("rayssl/modules/", "rayssl/losses/", "rayssl/optim/"),
    "core": ("rayssl/sections.py", "rayssl/space.py", "rayssl/checkpoint.py", "rayssl/storage/", "rayssl/dist.py",
             "rayssl/outfile.py"),
}
ABOVE = ("cli", "tuning", "bench", "runtime")
NEVER = [(low, high) for low in ROOMS for high in ABOVE if low != high and not (low == "cli")
         and not (low in ("tuning", "bench") and high == "runtime")] + [
    ("engine", "viz"), ("methods", "engine"), ("methods", "viz"), ("data", "engine"), ("data", "methods"),
    ("data", "eval"), ("data", "pseudolabel"), ("data", "viz"), ("eval", "methods"), ("eval", "engine"),
    ("eval", "pseudolabel"), ("pseudolabel", "methods"), ("pseudolabel", "engine"), ("parts", "methods"),
    ("parts", "data"), ("core", "methods"), ("core", "data"), ("core", "engine"), ("core", "eval")]


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def _module(rel: str) -> str:
    return rel[:-3].replace("/", ".").removesuffix(".__init__")


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import statement in ``path``, nested ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names]))
    return out


def _room(module: str) -> str | None:
    path = module.replace(".", "/")
    for room, prefixes in ROOMS.items():
        if any(path == p.rstrip("/").removesuffix(".py") or path.startswith(p.rstrip("/") + "/")
               or path + ".py" == p for p in prefixes):
            return room
    return None


def test_only_the_command_line_parses_argv_and_shims_only_call_it():
    parsers = [_rel(p) for p in SOURCES if any(m == "argparse" for m, _ in _imports(p))]
    assert parsers and all(p.startswith("rayssl/cli/") for p in parsers), parsers
    for shim in SHIMS:
        modules = {m for m, _ in _imports(REPO / shim)}
        assert modules <= {"sys", "rayssl.cli", "rayssl.cli.train", "rayssl.cli.sweep", "rayssl.cli.eval",
                           "rayssl.cli.export", "rayssl.cli.label", "rayssl.cli.viz", "rayssl.cli.bench",
                           "rayssl.cli.scenes", "rayssl.cli.shards"}, (shim, modules)


def test_only_the_ray_rooms_import_ray():
    users = [_rel(p) for p in SOURCES if any(m == "ray" or m.startswith("ray.") for m, _ in _imports(p))]
    assert users and all(u.startswith(RAY_ROOMS) for u in users), [u for u in users if not u.startswith(RAY_ROOMS)]


def test_no_private_name_crosses_a_module_border():
    crossings = [(_rel(p), m, n) for p in SOURCES for m, names in _imports(p) if m.startswith(("rayssl", "tuning"))
                 for n in names if n.startswith("_") and not n.startswith("__")]
    assert crossings == []


@pytest.mark.parametrize("low,high", NEVER)
def test_no_room_imports_a_room_above_it(low, high):
    found = [(_rel(p), m) for p in SOURCES if _rel(p) not in SHIMS and _room(_module(_rel(p))) == low
             for m, _ in _imports(p) if _room(m) == high]
    assert found == [], f"{low} must not import {high}"


def test_files_stay_small_and_the_worker_is_glue():
    from rayssl.runtime.worker import train_loop_per_worker

    long = {_rel(p): n for p in SOURCES if (n := len(p.read_text().splitlines())) > 450}
    assert long == {}
    assert len(inspect.getsource(train_loop_per_worker).splitlines()) <= 80
