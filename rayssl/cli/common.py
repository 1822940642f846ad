"""What every command shares: the S3 and GPU flags, and running a command to one exit code.

Every command has two phases. ``prepare`` parses and checks everything a user can get wrong
(options, config keys, paths, credentials) before Ray starts; ``execute`` does the work, in a
Ray session when the command needs one. ``run_command`` turns what happens into what a user
sees: a bad input is one line ``PROG: error: MESSAGE`` and exit code 2; a failure during the
work is one line ``PROG: failed: WHAT`` (the data problem or the root cause inside Ray's
wrapping) and exit code 1; Ctrl-C is exit code 130; success prints the result as one JSON
object, the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext
from typing import Any, Callable, TypeVar

from rayssl.checkpoint import CheckpointError
from rayssl.data.sources import DataError
from rayssl.outfile import OutputError
from rayssl.sections import ConfigError
from rayssl.storage import S3Options, endpoint_problem

T = TypeVar("T")

__all__ = ["UserError", "add_gpu_flag", "add_s3_flags", "gpu_choice", "print_json", "run_command", "s3_options",
           "s3_data_overrides"]


class UserError(ValueError):
    """A command-line input that cannot work; the message names the option."""


# Errors that mean "what you gave cannot work" (exit code 2), whichever phase finds them.
USER_ERRORS = (UserError, ConfigError, DataError, CheckpointError, OutputError, ValueError, FileNotFoundError)


# ----------------------------------------------------------------------------- flags


def _endpoint_url(value: str) -> str:
    problem = endpoint_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


def add_s3_flags(parser: argparse.ArgumentParser, *, anonymous: bool = True) -> None:
    """``--s3-endpoint URL`` and (``anonymous``) ``--s3-anonymous``: the same flags, help and
    URL check in every command. Both default to None (not given), so a command that layers
    flags over a config file can tell "not given" from "given"."""
    parser.add_argument("--s3-endpoint", default=None, type=_endpoint_url, metavar="URL",
                        help="S3-compatible endpoint for s3:// URIs (default: AWS_ENDPOINT_URL_S3 or "
                             "AWS_ENDPOINT_URL if set, else AWS); credentials always come from the AWS chain, "
                             "never from flags or configs")
    if anonymous:
        parser.add_argument("--s3-anonymous", action="store_const", const=True, default=None,
                            help="read s3:// data without signing requests (public buckets)")


def s3_options(args: argparse.Namespace) -> S3Options:
    """The ``add_s3_flags`` flags as storage options, the endpoint resolved here, once
    (``--s3-endpoint``, else this shell's ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``)."""
    return S3Options.resolved(getattr(args, "s3_endpoint", None) or "",
                              anonymous=bool(getattr(args, "s3_anonymous", False)))


def s3_data_overrides(args: argparse.Namespace) -> dict:
    """The ``data`` config keys for the ``add_s3_flags`` flags (the endpoint resolved as ``s3_options``)."""
    options = s3_options(args)
    out = {"s3_endpoint": options.endpoint, "s3_anonymous": getattr(args, "s3_anonymous", None)}
    return {k: v for k, v in out.items() if v}


def add_gpu_flag(parser: argparse.ArgumentParser, what: str = "work", default: str | None = "auto") -> None:
    """``--use-gpu auto|true|false``."""
    parser.add_argument("--use-gpu", choices=["auto", "true", "false"], default=default,
                        help=f"run the {what} on GPUs; auto: when the Ray cluster has them (default auto)")


def gpu_choice(value: str | None) -> bool | None:
    """``--use-gpu`` -> True, False, or None (auto, or not given)."""
    return {"auto": None, "true": True, "false": False, None: None}[value]


# ----------------------------------------------------------------------------- running


def print_json(result: dict) -> None:
    """The result as the last line of stdout (after anything printed before it)."""
    sys.stdout.flush()
    print(json.dumps(result, default=str), flush=True)


def run_command(prog: str, prepare: Callable[[], T], execute: Callable[[T], Any], *, ray: bool = False,
                dashboard: bool = True, log_to_driver: bool = True,
                execute_errors: tuple[type[BaseException], ...] = (UserError, ConfigError),
                hint: Callable[[T, str], str] | None = None,
                exit_code: Callable[[Any], int] | None = None) -> int:
    """Run a command's two phases; returns its exit code (see the module docstring).

    ``prepare`` returns what ``execute`` needs, or None when it answered the command itself.
    ``execute`` returns the result dict printed as the last JSON line (None prints nothing).
    ``ray``: run ``execute`` in a Ray session (``rayssl.runtime.cluster.ray_session``).
    ``execute_errors``: errors of the work phase that are the user's input (exit code 2), such
    as what only the cluster can tell (no GPU). ``hint(prepared, what)``: one more line after
    a failure (``what`` = "failed") or an interrupt ("interrupted"), e.g. how to continue.
    ``exit_code``: the code of a result (default 0).
    """
    try:
        prepared = prepare()
    except USER_ERRORS as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    if prepared is None:  # nothing to run: prepare answered (e.g. --print-config)
        return 0
    if ray:
        from rayssl.runtime.cluster import ray_session

        session = ray_session(dashboard=dashboard, log_to_driver=log_to_driver)
    else:
        session = nullcontext()
    try:
        with session:
            result = execute(prepared)
    except execute_errors as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted" + (f"; {hint(prepared, 'interrupted')}" if hint else ""), file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a failure of the work: one readable line
        from rayssl.runtime.errors import failure_line

        print(f"{prog}: failed: {failure_line(exc)}", file=sys.stderr)
        if hint:
            print(f"{prog}: {hint(prepared, 'failed')}", file=sys.stderr)
        return 1
    if result is not None:
        print_json(result)
    return exit_code(result) if exit_code is not None else 0
