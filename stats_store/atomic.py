"""Writing a file so that readers see the old content or the new, never half of it.

The bytes go to a temporary sibling (same directory, hence same file system, so the rename is
atomic on POSIX), are flushed to disk, and ``os.replace`` puts them in place. Used for a local
stats store's commit records (``stats_store.store_io``; on S3 one PUT does the same) and for INC
exports (``stats_store.inc_write``).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import IO, Any, Callable

__all__ = ["atomic_write", "atomic_write_json"]

# Tightest JSON: commit records of models with thousands of modules are MBs.
COMPACT_SEPARATORS = (",", ":")


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` via a temporary sibling and ``os.replace``; ``write`` fills the open file.

    The parent folder must exist. Any error of ``write`` or of the rename propagates, and the
    temporary file is removed.
    """
    # A uuid rather than the pid: two threads of one process may write the same file.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            # Without fsync a crash just after the rename can leave an empty file under the new name.
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left behind when the write itself failed (and re-raised)


def atomic_write_json(
    path: Path,
    value: Any,
    *,
    indent: int | None = None,
    separators: tuple[str, str] | None = COMPACT_SEPARATORS,
) -> None:
    """Write ``value`` as JSON (UTF-8) to ``path`` atomically (see :func:`atomic_write`).

    ``indent`` and ``separators`` are :func:`json.dumps`'s; ``separators=None`` keeps json's
    defaults, which INC's files use (an exact re-export must reproduce them).
    """
    # json.dumps without indent is json's C encoder; json.dump (chunked) and indents are pure
    # Python, 10x slower on the MB-sized records of models with thousands of modules. The text is
    # built before the temporary file is opened, so a value json cannot encode leaves no file.
    text = json.dumps(value, indent=indent, separators=separators)
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
