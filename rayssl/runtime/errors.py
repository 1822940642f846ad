"""Failures that come back through Ray, made into one line a user can act on.

An error raised in a Ray task or a Ray Train worker often reaches the driver only as text
(``RayTaskError(UserCodeException)``, a ``WorkerGroupError``'s worker failures, a
``ControllerError``): the original class is not always chained, so its message is also
searched for in the text as ``<ErrorType>: message``.
"""

from __future__ import annotations

import re

from rayssl.data.sources import DataError

__all__ = ["data_error_message", "failure_line", "root_cause", "wrapped_error_message"]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def wrapped_error_message(exc: BaseException, error_type: type[BaseException]) -> str | None:
    """The message of an ``error_type`` error inside a (Ray-wrapped) failure, or None."""
    line = re.compile(rf"\b{re.escape(error_type.__name__)}: ([^\n]+)")
    todo, seen = [exc], set()
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if type(e) is error_type:
            return str(e).strip().splitlines()[0]
        m = line.search(_ANSI.sub("", str(e)))
        if m:
            return m.group(1).strip()
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            todo.extend(failures.values())
        todo.extend([getattr(e, "cause", None), getattr(e, "controller_failure", None), e.__cause__,
                     e.__context__])
    return None


def data_error_message(exc: BaseException) -> str | None:
    """The DataError message inside a (Ray-wrapped) failure (a bad bucket, too many bad images), or None."""
    return wrapped_error_message(exc, DataError)


def root_cause(exc: BaseException) -> str:
    """The innermost error message of a (Ray-wrapped) exception chain, on one line."""
    seen = exc
    while True:
        nxt = getattr(seen, "cause", None) or seen.__cause__
        if nxt is None or nxt is seen:
            break
        seen = nxt
    text = str(seen).strip().splitlines()
    return f"{type(seen).__name__}: {text[-1] if text else ''}"


def failure_line(exc: BaseException) -> str:
    """What went wrong, in one line: a data problem, a non-finite loss, else the root cause."""
    return data_error_message(exc) or wrapped_error_message(exc, FloatingPointError) or root_cause(exc)
