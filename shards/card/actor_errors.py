"""One-line errors for exceptions raised inside shard actors, and for their deaths.

Ray hands the driver an exception raised in an actor as a ``RayTaskError`` whose message is the
remote traceback: many lines, ANSI colour codes, ``ray::CalibrationRunner.load() (pid=…, ip=…,
actor_id=…)`` and source lines, with the real message at its end. A dead actor arrives as a
``RayActorError`` of several lines. :func:`actor_error` turns either into one line::

    KeyError in shard actor dp_rank=0, tp_rank=1 (measure_batch): 'lm_head'; full traceback in <log>

and writes the whole text (ANSI codes stripped) to that log file. The log folder is
``$FP8_ORCHESTRATOR_LOG_DIR`` when set, else ``<tempdir>/fp8-orchestrator-logs`` (``/tmp/...`` on
Linux); one file per error, named by time, driver pid, rank, method and exception type, e.g.
``20260101-120000-pid42-dp0-tp1-measure_batch-KeyError-x1y2.log``. It starts with the same line.
If no log can be written (the folder, then the tempdir, is tried) the message says why instead;
the error is raised all the same.

Our own errors raised in an actor (``own``: ``ShardError`` here, the orchestrator adds its own and the
stats store's) already have one-line messages: they come back as themselves, as before, with the log
path as a note (shown under a Python traceback, not in ``str(e)``).

Ranks come from a registry the driver fills when it starts actors (``orchestrator.driver.grid`` registers
each one with its dp and tp rank): errors name the actor by Ray id, and only the driver knows
which rank that is. Every error returned is chained to Ray's (``__cause__``); nothing is swallowed.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from ray.exceptions import RayActorError, RayTaskError

from shards.errors import ShardError

#: environment variable naming the folder for actor-error logs
LOG_DIR_ENV = "FP8_ORCHESTRATOR_LOG_DIR"

# CSI sequences (colours, cursor moves), OSC sequences (titles, links) and two-byte escapes.
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
_HEADER = re.compile(r"ray::(?:[\w.<>]*\.)?(?P<method>[\w<>]+)\(\)")
_ACTOR_ID = re.compile(r"actor_id[=:]\s*(?P<id>[0-9a-f]{8,})")
_EXC_LINE = re.compile(r"^(?P<type>[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Warning)|[A-Z]\w*): ?(?P<msg>.*)$")

_RANKS: dict[str, tuple[int, int]] = {}  # Ray actor id (hex) -> (dp_rank, tp_rank), in the driver


class ShardActorError(ShardError, RuntimeError):
    """An exception raised inside a shard actor, or the actor's death, as one line.

    Attributes: ``exc_type`` (name of the original exception), ``summary`` (its message's first
    line), ``log_text`` (``full traceback in <path>``, or why none was written), ``dp_rank`` and ``tp_rank`` (None
    when unknown), ``method`` (the actor method, None when unknown), ``log_path`` (the full
    traceback; None when it could not be written) and ``cause`` (the exception raised in the
    actor, when Ray could send it). Constructed with a single message argument, so it pickles.
    """

    exc_type: str = ""
    summary: str = ""
    log_text: str = ""
    dp_rank: int | None = None
    tp_rank: int | None = None
    method: str | None = None
    log_path: Path | None = None
    cause: BaseException | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.args = (message,)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ShardTaskError(ShardActorError, RayTaskError):
    """An exception raised inside a shard actor method (still a ``RayTaskError`` for old callers)."""


class ShardActorDiedError(ShardActorError, RayActorError):
    """A shard actor died (process killed, out of memory, crash) (still a ``RayActorError``)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.error_msg = message  # what RayActorError.__str__ would print
        self.actor_id = None
        self._actor_init_failed = False
        self._preempted = False


# ---- the rank registry ------------------------------------------------------------------------
def _actor_hex(actor: Any) -> str | None:
    actor_id = getattr(actor, "_actor_id", None)
    return actor_id.hex() if actor_id is not None else None


def register_actor(actor: Any, dp_rank: int, tp_rank: int) -> None:
    """Remember which rank the actor handle ``actor`` is, so its errors can name it."""
    key = _actor_hex(actor)
    if key:
        _RANKS[key] = (int(dp_rank), int(tp_rank))


def forget_actor(actor: Any) -> None:
    """Drop ``actor`` from the registry (it was killed)."""
    key = _actor_hex(actor)
    if key:
        _RANKS.pop(key, None)


def actor_rank(actor_id: str | None) -> tuple[int, int] | None:
    """``(dp_rank, tp_rank)`` of a registered actor (by Ray actor id in hex), or None."""
    return _RANKS.get(actor_id) if actor_id else None


# ---- text helpers -----------------------------------------------------------------------------
def strip_ansi(text: str) -> str:
    """``text`` without ANSI escape sequences."""
    return _ANSI.sub("", text)


def first_line(text: str) -> str:
    """The first non-blank line of ``text``, ANSI stripped, whitespace collapsed."""
    for line in strip_ansi(text).splitlines():
        if line.strip():
            return " ".join(line.split())
    return ""


def log_dir() -> Path:
    """Where actor-error logs go: ``$FP8_ORCHESTRATOR_LOG_DIR``, else ``<tempdir>/fp8-orchestrator-logs``."""
    env = os.environ.get(LOG_DIR_ENV)
    return Path(env) if env else Path(tempfile.gettempdir()) / "fp8-orchestrator-logs"


def _safe_str(e: BaseException) -> str:
    try:
        return str(e)
    except Exception as inner:  # a broken __str__ must not hide the original error
        return f"<{type(e).__name__}: str() failed with {type(inner).__name__}>"


def _ray_text(e: BaseException) -> str:
    """Ray's whole text for ``e`` (remote traceback or death report), ANSI stripped."""
    return strip_ansi(_safe_str(e))


def _own_cause(e: BaseException) -> BaseException | None:
    """The exception raised in the actor (None for a death, or when Ray could not send it)."""
    if not isinstance(e, RayTaskError):
        return None
    cause = e.__dict__.get("cause")  # Ray's dual class forwards unknown attributes to the cause
    return cause if isinstance(cause, BaseException) else None


def _last_exception_line(text: str) -> tuple[str, str] | None:
    """``(type, message)`` of the last ``SomeError: message`` line of a traceback text."""
    for line in reversed(text.splitlines()):
        if line[:1].isspace():
            continue
        m = _EXC_LINE.match(line.strip())
        if m:
            return m["type"].rsplit(".", 1)[-1], m["msg"]
    return None


def _describe(e: RayTaskError | RayActorError, method: str | None) -> tuple[str, str, str | None, str | None]:
    """``(exception type, one-line message, method, actor id)`` of a Ray error."""
    text = _ray_text(e)
    header = _HEADER.search(text)
    found = _ACTOR_ID.search(text)
    actor_id = getattr(e, "actor_id", None) if isinstance(e, RayActorError) else e.__dict__.get("_actor_id")
    actor_id = actor_id or (found["id"] if found else None)
    if isinstance(e, RayActorError):
        if "creation task" in text:  # __init__ raised: report its exception
            last = _last_exception_line(text)
            what = f"{last[0]}: {first_line(last[1])}" if last else first_line(text)
            summary = f"the actor died in its creation task: {what}"
            return type(e).__name__, summary, "__init__", actor_id
        summary = first_line(text).rstrip(".") or "the actor died"
        details = [f"pid {m[1]}" for m in [re.search(r"\bpid:?\s*(\d+)", text)] if m]
        details += [f"worker exit type {m[1]}" for m in [re.search(r"Worker exit type: (\w+)", text)] if m]
        if details:
            summary += f" ({', '.join(details)})"
        return type(e).__name__, summary, method, actor_id
    method = method or (header["method"] if header else e.__dict__.get("function_name"))
    cause = _own_cause(e)
    if cause is not None and type(cause).__name__ != "RayError":
        return type(cause).__name__, first_line(_safe_str(cause)), method, actor_id
    # No usable cause (Ray could not pickle it): the traceback's last exception line names it.
    last = _last_exception_line(text)
    if last:
        return last[0], first_line(last[1]), method, actor_id
    return type(e).__name__, first_line(text), method, actor_id


def _write_log(e: BaseException, headline: str, exc_type: str, method: str | None,
               rank: tuple[int, int] | None) -> tuple[Path | None, str]:
    """Write ``headline`` and the full text of ``e`` to a new log file: ``(path, "")``, or ``(None, why not)``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rank_part = f"dp{rank[0]}-tp{rank[1]}" if rank else "actor"
    safe = re.sub(r"[^\w.-]", "_", f"{stamp}-pid{os.getpid()}-{rank_part}-{method or 'call'}-{exc_type}-")
    try:
        body = "".join(traceback.format_exception(e))
    except Exception:  # formatting must never hide the error
        body = _safe_str(e)
    when = time.strftime("%Y-%m-%d %H:%M:%S %z")
    text = strip_ansi(f"{headline}\ntime: {when}\ndriver pid: {os.getpid()}\n\n{body}")
    errors = []
    for folder in dict.fromkeys([log_dir(), Path(tempfile.gettempdir())]):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=safe, suffix=".log", dir=folder)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text if text.endswith("\n") else text + "\n")
            return Path(name), ""
        except OSError as err:
            errors.append(f"{folder}: {err.strerror or err}")
    return None, "; ".join(errors)


def _where(rank: tuple[int, int] | None, actor_id: str | None) -> str:
    if rank is not None:
        return f"shard actor dp_rank={rank[0]}, tp_rank={rank[1]}"
    return f"shard actor {actor_id[:16]}" if actor_id else "a shard actor"


def describe_actor_error(e: RayTaskError | RayActorError, *, rank: tuple[int, int] | None = None,
                         method: str | None = None) -> dict[str, Any]:
    """Everything :func:`actor_error` puts in its message, and the log file (written now).

    Returns a dict with ``exc_type``, ``summary`` (the original message's first line, ANSI
    stripped), ``where`` (``shard actor dp_rank=0, tp_rank=1``), ``method``, ``rank``,
    ``log_path`` (None if it could not be written) and ``log_text`` (``full traceback in <path>``,
    or why no log was written).
    """
    exc_type, summary, method, actor_id = _describe(e, method)
    rank = rank if rank is not None else actor_rank(actor_id)
    where = _where(rank, actor_id)
    summary = summary or "(no message)"
    headline = f"{exc_type} in {where}" + (f" ({method})" if method else "") + f": {summary}"
    path, why = _write_log(e, headline, exc_type, method, rank)
    noun = "traceback" if isinstance(e, RayTaskError) else "error"
    log_text = f"full {noun} in {path}" if path else f"full {noun} not saved ({why})"
    return dict(exc_type=exc_type, summary=summary, where=where, method=method, rank=rank,
                log_path=path, log_text=log_text)


def actor_error(e: RayTaskError | RayActorError, *, own: tuple[type[BaseException], ...] = (ShardError,),
                rank: tuple[int, int] | None = None, method: str | None = None) -> BaseException:
    """The error to raise for Ray's ``e`` (``raise actor_error(e) from e``); chained to ``e`` already.

    * ``e`` carries an exception of a class in ``own`` (already one line): that exception itself,
      with the log path added as a note.
    * any other exception raised in the actor: a :class:`ShardTaskError`, ``"<type> in shard actor
      dp_rank=.., tp_rank=.. (<method>): <first line of its message>; full traceback in <log>"``.
    * the actor died: a :class:`ShardActorDiedError` worded the same way.

    ``rank`` and ``method`` override what the registry and Ray's text say. Anything but a Ray error,
    and an error this function made already, is returned unchanged (never swallowed, never replaced).
    """
    if isinstance(e, ShardActorError) or not isinstance(e, (RayTaskError, RayActorError)):
        return e  # already converted (ShardTaskError is a RayTaskError too), or not from Ray
    try:
        info = describe_actor_error(e, rank=rank, method=method)
    except Exception as inner:  # never let the description hide the actor's error
        cause = _own_cause(e)
        info = dict(exc_type=type(cause or e).__name__, summary=first_line(_safe_str(cause or e)) or "(no message)",
                    where="a shard actor", method=method, rank=rank, log_path=None,
                    log_text=f"full traceback not saved ({type(inner).__name__}: {inner})")
    cause = _own_cause(e)
    if cause is not None and own and isinstance(cause, own):
        if info["log_path"] is not None and hasattr(cause, "add_note"):
            call = f" ({info['method']})" if info["method"] else ""
            cause.add_note(f"{info['where']}{call}: {info['log_text']}")
        cause.__cause__ = e
        return cause
    cls = ShardTaskError if isinstance(e, RayTaskError) else ShardActorDiedError
    method_part = f" ({info['method']})" if info["method"] else ""
    err = cls(f"{info['exc_type']} in {info['where']}{method_part}: {info['summary']}; {info['log_text']}")
    err.exc_type, err.summary, err.log_text = info["exc_type"], info["summary"], info["log_text"]
    err.method, err.log_path, err.cause = info["method"], info["log_path"], cause
    if info["rank"] is not None:
        err.dp_rank, err.tp_rank = info["rank"]
    if isinstance(err, ShardActorDiedError):
        err.actor_id = getattr(e, "actor_id", None)
    err.__cause__ = e
    return err
