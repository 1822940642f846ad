"""Every command the README and docs/ show exists as written: each answers ``--help``.

``python -m MODULE ...`` forms run in one fresh interpreter through ``runpy.run_module(MODULE,
run_name="__main__", alter_sys=True)``, which is what ``python -m`` does; the experiments'
scripts through ``runpy.run_path``; the ``rayssl`` console script in its own process.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from rayssl.cli import COMMANDS

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
# `python -m MODULE [SUBCOMMAND]`, `rayssl COMMAND`, `python experiments/SCRIPT.py`
PATTERN = re.compile(r"(?<![\w/.-])(?:python -m ((?:rayssl|tuning)[a-z_.]*)(?: ([a-z][a-z-]+))?"
                     r"|rayssl ([a-z][a-z-]+)|python (experiments/[a-z_]+\.py))")
CONSOLE_SCRIPT = Path(sys.executable).parent / "rayssl"

# Runs each documented form with --help in this one interpreter; prints {form: exit code and usage seen}.
RUNNER = r"""
import contextlib, io, json, runpy, sys
results = {}
for kind, target, sub in json.loads(sys.argv[1]):
    sys.argv = [target] + ([sub] if sub else []) + ["--help"]
    out = io.StringIO()
    code = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            if kind == "module":
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(target, run_name="__main__")
        except SystemExit as exc:
            code = exc.code
    results[" ".join([kind, target, sub or ""])] = [code, "usage:" in out.getvalue(), out.getvalue()[-800:]]
print(json.dumps(results))
"""


def documented() -> tuple[set[tuple[str, str, str]], set[str]]:
    """(module and script forms as (kind, target, subcommand), console-script commands)."""
    forms, commands = set(), set()
    for page in PAGES:
        for module, sub, command, script in PATTERN.findall(page.read_text()):
            if module:
                forms.add(("module", module, sub))
            elif command:
                commands.add(command)
            else:
                forms.add(("path", script, ""))
    return forms, commands


def test_every_documented_command_answers_help():
    forms, commands = documented()
    # The pages show every command of the `rayssl` console script, each `python -m` form of the
    # train and sweep commands, and the experiments.
    assert commands == set(COMMANDS)
    assert ("module", "rayssl.train", "") in forms and ("module", "tuning.sweep", "") in forms
    assert any(kind == "path" for kind, _, _ in forms)
    done = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(sorted(forms))], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    failed = {form: out for form, (code, usage, out) in results.items() if code not in (0, None) or not usage}
    assert failed == {} and len(results) == len(forms)


def test_the_console_script_runs_every_command_and_names_an_unknown_one():
    assert CONSOLE_SCRIPT.exists(), "the rayssl console script is not installed (pip install -e .)"
    done = subprocess.run([str(CONSOLE_SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and all(name in done.stdout for name in COMMANDS)
    done = subprocess.run([str(CONSOLE_SCRIPT), "train", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "usage: rayssl train" in done.stdout
    done = subprocess.run([str(CONSOLE_SCRIPT), "trian"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown command 'trian'" in done.stderr and "train" in done.stderr
