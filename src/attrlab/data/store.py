"""The on-disk feature store: memory-mapped ``.npy`` shards and a JSON manifest.

Layout of a store directory::

    manifest.json              config (model id, checkpoint hash, projection, dtype,
                               output function, dataset ids hash, shard size) + shard list
    shards/00000000-00004096.q.npy   out-to-loss weights [n]     (written first)
    shards/00000000-00004096.npy     features [n, k]             (written last: marks the shard done)
    gram.npy                   Phi^T Phi [k, k] (float64), written by finalize

Every file is written to a temporary name, flushed, fsynced and atomically
renamed, so a process killed at any instant leaves only complete shards
behind, and a resumed run recomputes exactly the missing ones. The manifest is
rewritten the same way under a file lock (several writers may share a store,
e.g. ranks of a distributed job). Readers only read complete files and never
see a partial one, so any number of concurrent readers is safe.

Opening a store with a different checkpoint, projection, output function or
dataset raises :class:`attrlab.errors.StoreMismatchError`.

Example:
    >>> import tempfile, numpy as np
    >>> from attrlab.data.store import FeatureStore
    >>> d = tempfile.mkdtemp()
    >>> s = FeatureStore.create(d, {"checkpoint": "abc", "projection": {"dim": 2}, "n": 3,
    ...                             "dim": 2, "dtype": "float32", "shard_size": 2})
    >>> s.write_shard(0, np.ones((2, 2), np.float32), np.ones(2, np.float32))
    >>> s.write_shard(2, np.zeros((1, 2), np.float32), np.ones(1, np.float32))
    >>> s.finalize().shape
    (2, 2)
    >>> FeatureStore.open(d, expect={"checkpoint": "abc"}).features().shape
    (3, 2)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FileFormatError, InputError, StoreMismatchError

FORMAT = "attrlab.feature_store"
VERSION = 1
_SHARD = re.compile(r"^(\d{9})-(\d{9})\.npy$")
#: config keys that must agree between a store and whoever opens or resumes it
CHECKED = (
    "checkpoint",
    "projection",
    "output",
    "params",
    "ids_hash",
    "n",
    "dim",
    "dtype",
    "shard_size",
    "batch_size",
    "example_shapes",
)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    """``np.save`` to ``path`` atomically."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, np.ascontiguousarray(arr))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _describe(key: str, want: Any, got: Any) -> str:
    what = {
        "checkpoint": "model parameters (checkpoint hash)",
        "projection": "projection (kind/dim/seed)",
        "ids_hash": "dataset (example ids)",
        "output": "model output function",
        "params": "parameter selection",
    }.get(key, key)
    return f"{what}: store has {got!r}, caller has {want!r}"


class FeatureStore:
    """A directory of projected per-example features; see the module docstring.

    Use :meth:`create` (or :func:`attrlab.data.featurize`) to write one and
    :meth:`open` to read one.
    """

    def __init__(self, path: str | Path, manifest: Mapping[str, Any]):
        self.path = Path(path)
        self.manifest = dict(manifest)

    # ----------------------------------------------------------- creation
    @classmethod
    def create(
        cls, path: str | Path, config: Mapping[str, Any], resume: bool = True
    ) -> FeatureStore:
        """Create a store for ``config``, or (``resume=True``) reopen an existing one with the same config.

        Several processes may call this at once: exactly one creates the
        manifest, the others validate it.

        Raises:
            StoreMismatchError: the directory holds a store with a different config.
            FileFormatError: the directory holds something that is not a store.
        """
        path = Path(path)
        (path / "shards").mkdir(parents=True, exist_ok=True)
        man_path = path / "manifest.json"
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            **dict(config),
            "shards": [],
            "finalized": False,
        }
        if not man_path.exists():
            fd, tmp = tempfile.mkstemp(dir=path, prefix=".manifest.", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(manifest, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, man_path)  # exclusive create: fails if another process won
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
            _fsync_dir(path)
        store = cls.open(path, expect=config)
        if not resume and store.done_ranges():
            raise StoreMismatchError(
                f"{path} already holds features; pass resume=True or use a new directory"
            )
        return store

    @classmethod
    def open(cls, path: str | Path, expect: Mapping[str, Any] | None = None) -> FeatureStore:
        """Open a store for reading (or resuming), checking it against ``expect``.

        Raises:
            FileFormatError: no store at ``path``.
            StoreMismatchError: a key of ``expect`` (checkpoint, projection, …) differs.
        """
        path = Path(path)
        man_path = path / "manifest.json"
        if not man_path.exists():
            raise FileFormatError(f"no feature store at {path} (no manifest.json); featurize first")
        try:
            manifest = json.loads(man_path.read_text())
        except json.JSONDecodeError as e:
            raise FileFormatError(f"{man_path}: unreadable manifest: {e}") from e
        if manifest.get("format") != FORMAT or int(manifest.get("version", 0)) > VERSION:
            raise FileFormatError(
                f"{path} is not an attrlab feature store (format {manifest.get('format')!r})"
            )
        store = cls(path, manifest)
        if expect:
            store.check(expect)
        return store

    def check(self, expect: Mapping[str, Any]) -> None:
        """Raise :class:`StoreMismatchError` if any checked key of ``expect`` differs from the manifest."""
        bad = [
            _describe(k, _norm(expect[k]), _norm(self.manifest.get(k)))
            for k in CHECKED
            if k in expect and _norm(expect[k]) != _norm(self.manifest.get(k))
        ]
        if bad:
            raise StoreMismatchError(
                f"the feature store at {self.path} was written for a different setup — "
                + "; ".join(bad)
                + ". Use the same model/projection/data, or featurize into a new directory."
            )

    # ------------------------------------------------------------ writing
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.path / ".lock", "a+") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def shard_path(self, start: int, stop: int) -> Path:
        return self.path / "shards" / f"{start:09d}-{stop:09d}.npy"

    def write_shard(self, start: int, features: np.ndarray, out_to_loss: np.ndarray) -> None:
        """Write the features ``[n, k]`` and out-to-loss weights ``[n]`` of rows ``start:start+n``."""
        n, k = features.shape
        if k != self.manifest["dim"] or out_to_loss.shape != (n,):
            raise InputError(
                f"shard of shape {features.shape} / {out_to_loss.shape} for a store of dim {self.manifest['dim']}"
            )
        stop = start + n
        p = self.shard_path(start, stop)
        atomic_save_npy(p.with_suffix(".q.npy"), out_to_loss.astype(np.float32))
        atomic_save_npy(
            p, features.astype(self.manifest["dtype"])
        )  # its existence marks the shard done
        self._record()

    def _record(self) -> None:
        with self._locked():
            man = json.loads((self.path / "manifest.json").read_text())
            man["shards"] = [f"{a:09d}-{b:09d}" for a, b in self.done_ranges()]
            self.manifest = man
            atomic_write_bytes(
                self.path / "manifest.json", json.dumps(man, indent=1, sort_keys=True).encode()
            )

    def done_ranges(self) -> list[tuple[int, int]]:
        """Row ranges ``(start, stop)`` of complete shards (from the files on disk), sorted."""
        out = []
        for f in (self.path / "shards").iterdir():
            m = _SHARD.match(f.name)
            if m:
                out.append((int(m.group(1)), int(m.group(2))))
        return sorted(out)

    def missing(self) -> list[tuple[int, int]]:
        """Planned shard ranges not yet on disk."""
        n, s = int(self.manifest["n"]), int(self.manifest["shard_size"])
        done = set(self.done_ranges())
        return [(a, min(n, a + s)) for a in range(0, n, s) if (a, min(n, a + s)) not in done]

    @property
    def complete(self) -> bool:
        return not self.missing()

    # ------------------------------------------------------------ reading
    @property
    def n(self) -> int:
        return int(self.manifest["n"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def _require_complete(self) -> None:
        miss = self.missing()
        if miss:
            raise InputError(
                f"the feature store at {self.path} is incomplete ({len(miss)} shards missing, "
                f"first rows {miss[0]}); resume featurize() before scoring"
            )

    def iter_blocks(
        self, with_q: bool = False
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
        """Yield ``(start, features [n_shard, k], out_to_loss [n_shard] or None)`` shard by shard (memory-mapped)."""
        self._require_complete()
        for a, b in self.done_ranges():
            p = self.shard_path(a, b)
            feats = np.load(p, mmap_mode="r")
            q = np.load(p.with_suffix(".q.npy")) if with_q else None
            yield a, feats, q
            del feats

    def features(self) -> np.ndarray:
        """All features ``[n, k]`` as one in-memory float32 array (small stores and tests)."""
        return np.concatenate(
            [np.asarray(f, dtype=np.float32) for _, f, _ in self.iter_blocks()], 0
        )

    def out_to_loss(self) -> np.ndarray:
        """Out-to-loss weights ``[n]`` (``1 - p(true class)`` for classifiers)."""
        return np.concatenate([q for _, _, q in self.iter_blocks(with_q=True)], 0)  # type: ignore[misc]

    def gram(self) -> np.ndarray:
        """``Phi^T Phi`` ``[k, k]`` (float64), computing and saving it if needed."""
        p = self.path / "gram.npy"
        if p.exists():
            return np.load(p)
        return self.finalize()

    def partial_gram(self, ranges: list[tuple[int, int]] | None = None) -> np.ndarray:
        """``sum Phi_s^T Phi_s`` over the shards with these ranges (default: all)."""
        self._require_complete()
        g = np.zeros((self.dim, self.dim), np.float64)
        for a, b in ranges if ranges is not None else self.done_ranges():
            f = np.load(self.shard_path(a, b), mmap_mode="r")
            x = np.asarray(f, dtype=np.float64)
            g += x.T @ x
            del f, x
        return g

    def finalize(self, gram: np.ndarray | None = None) -> np.ndarray:
        """Write ``gram.npy`` (given, or computed from all shards) and mark the store finalized."""
        g = self.partial_gram() if gram is None else np.asarray(gram, np.float64)
        atomic_save_npy(self.path / "gram.npy", g)
        with self._locked():
            man = json.loads((self.path / "manifest.json").read_text())
            man["shards"] = [f"{a:09d}-{b:09d}" for a, b in self.done_ranges()]
            man["finalized"] = True
            self.manifest = man
            atomic_write_bytes(
                self.path / "manifest.json", json.dumps(man, indent=1, sort_keys=True).encode()
            )
        return g

    def __repr__(self) -> str:
        return (
            f"FeatureStore({str(self.path)!r}, n={self.manifest.get('n')}, dim={self.manifest.get('dim')}, "
            f"shards={len(self.done_ranges())}, model={self.manifest.get('model_id')!r})"
        )


def _norm(v: Any) -> Any:
    """JSON round trip, so tuples and lists compare equal."""
    return json.loads(json.dumps(v, sort_keys=True))
