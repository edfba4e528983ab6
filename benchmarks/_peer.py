"""A peer library in its own venv as a long-lived subprocess, so its timed units
interleave with attrlab's (``_interleave.interleaved``) inside one process window.

Protocol (one line each way): the parent writes ``"<command> <json>\\n"`` (the JSON
optional, e.g. ``"run\\n"``); the peer answers with one line ``"@@<json>"`` (other
lines it prints are ignored). After its setup the peer prints one ``"@@<json>"``
line of its own (what it loaded); ``"quit"`` or end of input ends it.

Parent side::

    with PeerProcess([str(PEER_PY), __file__, "--serve"], cwd=ROOT) as tl:
        print(tl.ready)
        times = interleaved({"attrlab": ours, "tl": lambda: tl.call("run")})

Peer side (in the peer venv, the script run with ``--serve``)::

    serve({"run": lambda msg: {"seconds": run_once()}}, ready={"loaded": True})

Example:
    python -c "import _peer; print(_peer.rows_or_error('x', '/no/python', 'pip install x', list))"
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

TAG = "@@"


class PeerError(RuntimeError):
    """The peer process could not start (e.g. an import failed in its venv) or failed a command."""


class PeerProcess:
    """The peer subprocess: started once, then ``call(command, **args)`` per unit."""

    def __init__(
        self,
        argv: list[str],
        cwd: str | Path | None = None,
        env: dict[str, str] | None = None,
        stderr: str | Path | None = None,
    ):
        """``stderr``: a file for the peer's stderr (its progress bars); None: ours.
        ``PYTHONPATH`` is not passed on (the peer venv has its own packages)."""
        base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        self.log_path = None if stderr is None else Path(stderr)
        self.log = None if self.log_path is None else open(self.log_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            argv,
            cwd=None if cwd is None else str(cwd),
            env={**base, "PYTHONUNBUFFERED": "1", **(env or {})},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        self.ready: dict[str, Any] = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(TAG):
                out: dict[str, Any] = json.loads(line[len(TAG) :])
                if "peer_error" in out:
                    raise PeerError(f"peer failed: {out['peer_error']}")
                return out
        where = "its stderr above"
        if self.log is not None and self.log_path is not None:
            self.log.flush()
            where = f"the end of {self.log_path}:\n{self.log_path.read_text()[-2000:]}"
        raise PeerError(f"the peer process ended (exit code {self.proc.wait()}; {where})")

    def call(self, command: str = "run", **args: Any) -> dict[str, Any]:
        """Send one command, wait for its one-line JSON answer."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + (" " + json.dumps(args) if args else "") + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        if self.log is not None:
            self.log.close()

    def __enter__(self) -> PeerProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def serve(handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]], ready: dict) -> None:
    """Peer side: announce ``ready``, then answer commands from stdin until ``quit``."""
    print(TAG + json.dumps(ready), flush=True)
    for line in sys.stdin:
        command, _, rest = line.strip().partition(" ")
        if command in ("", "quit"):
            break
        args = json.loads(rest) if rest else {}
        try:
            out = handlers[command](args)
        except Exception as e:  # report, keep the protocol in step
            out = {"peer_error": f"{type(e).__name__}: {e}"}
        print(TAG + json.dumps(out), flush=True)


def rows_or_error(
    benchmark: str, python: str | Path, install: str, measure: Callable[[], list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    """``measure()``'s rows, or one error row for ``run_all.py`` (with the command that builds
    the peer venv) when the venv's interpreter is missing or the peer process fails."""
    if not Path(python).exists():
        return [
            {"benchmark": benchmark, "error": f"peer venv missing ({python}); build it: {install}"}
        ]
    try:
        return measure()
    except PeerError as e:
        return [{"benchmark": benchmark, "error": f"{e}; (re)build the peer venv: {install}"}]
