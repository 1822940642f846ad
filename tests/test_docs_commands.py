"""Every command the README and docs/ show exists as written: each answers ``--help``."""

from __future__ import annotations

import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rayssl.cli import COMMANDS

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
# `python -m MODULE [SUBCOMMAND]`, `rayssl COMMAND`, `python experiments/SCRIPT.py`
PATTERN = re.compile(r"(?<![\w/.-])(?:python -m ((?:rayssl|tuning)[a-z_.]*)(?: ([a-z][a-z-]+))?"
                     r"|rayssl ([a-z][a-z-]+)|python (experiments/[a-z_]+\.py))")
CONSOLE_SCRIPT = Path(sys.executable).parent / "rayssl"


def documented() -> set[tuple[str, ...]]:
    """The argv (before --help) of every command the pages show."""
    found: set[tuple[str, ...]] = set()
    for page in PAGES:
        for module, sub, command, script in PATTERN.findall(page.read_text()):
            if module:
                found.add((sys.executable, "-m", module, *([sub] if sub else [])))
            elif command:
                found.add((str(CONSOLE_SCRIPT), command))
            else:
                found.add((sys.executable, script))
    return found


def _help(argv: tuple[str, ...]) -> tuple[tuple[str, ...], int, str]:
    done = subprocess.run([*argv, "--help"], cwd=REPO, capture_output=True, text=True, timeout=300)
    return argv, done.returncode, done.stdout + done.stderr


def test_every_documented_command_answers_help():
    commands = documented()
    # The pages show every command of the `rayssl` console script, each form of the train
    # command, and the experiments.
    assert {c[1] for c in commands if c[0] == str(CONSOLE_SCRIPT)} == set(COMMANDS)
    assert (sys.executable, "-m", "rayssl.train") in commands and (sys.executable, "-m", "tuning.sweep") in commands
    assert any(c[1].startswith("experiments/") for c in commands if len(c) == 2)
    assert CONSOLE_SCRIPT.exists(), "the rayssl console script is not installed (pip install -e .)"
    with ThreadPoolExecutor(4) as pool:
        for argv, rc, out in pool.map(_help, sorted(commands)):
            assert rc == 0 and "usage:" in out, f"{' '.join(argv[1:])} --help: exit {rc}\n{out[-2000:]}"


def test_the_console_script_names_an_unknown_command():
    done = subprocess.run([str(CONSOLE_SCRIPT), "trian"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown command 'trian'" in done.stderr and "train" in done.stderr
