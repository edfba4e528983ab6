"""Atomic file writes: a file attrlab writes is either complete or not there.

The data goes to a hidden temporary file next to the destination, which then
replaces the destination in one ``os.replace`` (atomic on POSIX and Windows for
paths on one file system). A write that fails half-way leaves the old file, if
any, untouched and no temporary file behind.

Example:
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.txt"
    >>> write_atomically(p, lambda tmp: tmp.write_text("done")).read_text()
    'done'
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomically(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a temporary path next to ``path``, then move it onto ``path``.

    Raises whatever ``write`` or the move raises (``IsADirectoryError`` when
    ``path`` is a directory, ``FileNotFoundError`` when its directory is
    missing, ``PermissionError`` ...), after removing the temporary file.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> write_atomically(d / "a.bin", lambda tmp: tmp.write_bytes(b"ab")).stat().st_size
        2
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(e, OSError) and e.errno is not None and e.filename in (None, str(tmp)):
            # name the file the caller asked for, not the temporary one
            raise type(e)(e.errno, e.strerror, str(path)) from e
        raise
    return path
