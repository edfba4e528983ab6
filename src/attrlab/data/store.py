"""The on-disk feature store: checksummed ``.npy`` shards and a JSON manifest.

Layout of a store directory::

    manifest.json              config (model id, checkpoint hash, projection, dtype,
                               output function, dataset ids hash, shard size), the
                               store's identity and the size + checksum of every file
    shards/000000000-000004096.q.npy   out-to-loss weights [n]     (written first)
    shards/000000000-000004096.npy     features [n, k]             (written second)
    shards/000000000-000004096.claim   while a writer computes the shard (pid, host)
    gram.npy                   Phi^T Phi [k, k] (float64), written by finalize
    ids.json, texts.json       example ids and texts (unit labels)

Integrity. Every file is written to a temporary name, flushed, fsynced and
atomically renamed; then its size and BLAKE2b-256 checksum are recorded in the
manifest (itself rewritten atomically under a file lock). The checksum covers
the store's identity (``store_id``, random at creation) and the file's path
inside the store, then its bytes, so a file is valid only in the store and the
place it was written for. A shard counts as done only when both of its files
are recorded *and* match: opening checks sizes (``verify=True``: full
checksums), every read checks the checksum and that the numbers are finite
(a store object hashes a file once: read again with the same inode, size,
modification and change times and recorded checksum, it is not re-hashed).
A shard that fails is treated as not done, so :func:`attrlab.data.featurize`
recomputes it; reading it raises :class:`~attrlab.errors.StoreCorruptError`.
``gram.npy`` records the checksums of the shards it was computed from and is
recomputed when they differ (or when it is missing or damaged). Files the
manifest does not record (stray copies, temporaries) are ignored.

Writers. A process killed at any instant leaves only complete, recorded shards
(a shard written but not yet recorded is recomputed), and a resumed run
computes exactly the missing ones. Several writers may share a store: each
claims a shard by creating ``<shard>.claim`` exclusively (``O_CREAT|O_EXCL``)
with its pid and host, so every shard is computed once. A claim whose process
is dead (same host), or whose file was not touched for ``claim_timeout``
seconds (any host; writers touch it after every batch), is taken over.
Readers only read complete files, so any number of concurrent readers is safe.

Opening a store with a different checkpoint, projection, output function or
dataset raises :class:`attrlab.errors.StoreMismatchError`; a damaged manifest, or
a store written by an attrlab without checksums (format version 1), raises
:class:`attrlab.errors.FileFormatError` saying what to do.

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
    >>> FeatureStore.open(d, expect={"checkpoint": "abc"}, verify=True).features().shape
    (3, 2)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from ..errors import FileFormatError, InputError, StoreCorruptError, StoreMismatchError

FORMAT = "attrlab.feature_store"
VERSION = 2
#: seconds after which a claim whose file was not touched may be taken over
CLAIM_TIMEOUT = 600.0
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
DTYPES = ("float32", "float16")
_HEX = re.compile(r"^[0-9a-f]{64}$")
_ID = re.compile(r"^[0-9a-f]{32}$")
_RESERVED = ("format", "version", "store_id", "files", "finalized", "shards")
_REPAIR = (
    "re-run attrlab.data.featurize(...) on this store with the same model, data and "
    "arguments: it verifies every shard and recomputes the broken ones"
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


def npy_bytes(arr: np.ndarray) -> bytes:
    """The bytes ``np.save`` writes for ``arr``."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr))
    return buf.getvalue()


def atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    """``np.save`` to ``path`` atomically."""
    atomic_write_bytes(path, npy_bytes(arr))


def file_digest(store_id: str, rel: str, data: bytes) -> str:
    """BLAKE2b-256 of ``"<store_id>\\n<rel>\\n"`` followed by ``data`` (hex).

    Example:
        >>> len(file_digest("0" * 32, "gram.npy", b""))
        64
    """
    h = hashlib.blake2b(digest_size=32)
    h.update(f"{store_id}\n{rel}\n".encode())
    h.update(data)
    return h.hexdigest()


def _describe(key: str, want: Any, got: Any) -> str:
    what = {
        "checkpoint": "model parameters (checkpoint hash)",
        "projection": "projection (kind/dim/seed)",
        "ids_hash": "dataset (example ids)",
        "output": "model output function",
        "params": "parameter selection",
    }.get(key, key)
    return f"{what}: store has {got!r}, caller has {want!r}"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_config(man: Mapping[str, Any], fail: Any) -> None:
    """Call ``fail(message)`` for the first missing or ill-typed layout key."""
    for key, low in (("n", 0), ("dim", 1), ("shard_size", 1)):
        if key not in man:
            fail(f"missing key {key!r}")
        if not _is_int(man[key]) or man[key] < low:
            fail(f"{key!r} must be an integer >= {low}, got {man[key]!r}")
    if man.get("dtype") not in DTYPES:
        fail(f"'dtype' must be one of {DTYPES}, got {man.get('dtype')!r}")


def _load_manifest(path: Path) -> dict[str, Any]:
    """The validated manifest at ``path`` (any supported version).

    Raises:
        FileFormatError: no manifest, not a store, a newer format, or a damaged manifest.
    """
    man_path = path / "manifest.json"
    if not man_path.is_file():
        raise FileFormatError(f"no feature store at {path} (no manifest.json); featurize first")

    def fail(what: str) -> NoReturn:
        raise FileFormatError(
            f"{man_path} is damaged ({what}). Delete {man_path} and re-run "
            "attrlab.data.featurize(...) on the directory (it recomputes every shard), "
            "or featurize into a new directory."
        )

    try:
        man = json.loads(man_path.read_bytes())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        fail(f"unreadable JSON: {e}")
    if not isinstance(man, dict):
        fail(f"a JSON {type(man).__name__}, not an object")
    if man.get("format") != FORMAT:
        raise FileFormatError(
            f"{path} is not an attrlab feature store (format {man.get('format')!r}); "
            "featurize into an empty directory"
        )
    version = man.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        fail(f"'version' must be a positive integer, got {version!r}")
    if version > VERSION:
        raise FileFormatError(
            f"{path} was written by a newer attrlab (feature store version {version}, this "
            f"one reads up to {VERSION}); upgrade attrlab, or featurize into a new directory"
        )
    _check_config(man, fail)
    if version == 1:
        return man
    if not isinstance(man.get("store_id"), str) or not _ID.match(man["store_id"]):
        fail(f"'store_id' must be 32 hex digits, got {man.get('store_id')!r}")
    if not isinstance(man.get("finalized"), bool):
        fail(f"'finalized' must be true or false, got {man.get('finalized')!r}")
    files = man.get("files")
    if not isinstance(files, dict):
        fail(f"'files' must be an object, got {type(files).__name__}")
    for rel, ent in files.items():
        if not isinstance(ent, dict):
            fail(f"files[{rel!r}] must be an object")
        if not _is_int(ent.get("size")) or ent["size"] < 0:
            fail(f"files[{rel!r}].size must be a non-negative integer, got {ent.get('size')!r}")
        if not isinstance(ent.get("blake2b"), str) or not _HEX.match(ent["blake2b"]):
            fail(f"files[{rel!r}].blake2b must be 64 hex digits")
        bad_inputs = not isinstance(ent.get("inputs"), str) or not _HEX.match(ent["inputs"])
        if "inputs" in ent and bad_inputs:
            fail(f"files[{rel!r}].inputs must be 64 hex digits")
    return man


def _legacy_error(path: Path) -> FileFormatError:
    return FileFormatError(
        f"{path} was written by an older attrlab (feature store version 1) that recorded no "
        "checksums, so its files cannot be verified. Re-run attrlab.data.featurize(...) on it "
        "with the same model, data and arguments (it recomputes and checksums every shard, "
        "bit-identical to the old ones if nothing was damaged), or featurize into a new directory."
    )


def _proc_state(pid: int) -> tuple[str, str] | None:
    """``(state, start time)`` of a process from ``/proc`` (Linux), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = stat.rsplit(")", 1)[-1].split()
    return (rest[0], rest[19]) if len(rest) > 19 else None


def _alive(pid: int, start: Any) -> bool:
    """Whether process ``pid`` of this host still runs (and is the one that started at ``start``)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except OSError:
        return False
    st = _proc_state(pid)
    if st is not None and (st[0] in ("Z", "X") or (start is not None and st[1] != start)):
        return False  # a zombie, or the pid was reused by another process
    return True


_HOST = socket.gethostname()


@dataclass
class ShardClaim:
    """This writer's claim on one shard (see :meth:`FeatureStore.try_claim`).

    Example:
        >>> ShardClaim.__name__
        'ShardClaim'
    """

    store: FeatureStore
    path: Path
    token: str

    def touch(self) -> None:
        """Heartbeat: refresh the claim file's time, so it does not time out."""
        with contextlib.suppress(OSError):
            os.utime(self.path)

    def release(self) -> None:
        """Remove the claim file (if it is still this writer's)."""
        with self.store._locked():
            with contextlib.suppress(OSError, ValueError):
                if json.loads(self.path.read_text()).get("token") == self.token:
                    os.unlink(self.path)


class FeatureStore:
    """A directory of projected per-example features; see the module docstring.

    Use :meth:`create` (or :func:`attrlab.data.featurize`) to write one and
    :meth:`open` to read one.
    """

    def __init__(self, path: str | Path, manifest: Mapping[str, Any]):
        self.path = Path(path)
        self.manifest = dict(manifest)
        # files found damaged by a full check, by (path, inode, size, mtime): a
        # rewritten file has another key and is checked afresh
        self._bad: dict[tuple[str, int, int, int], str] = {}
        # files that matched their recorded checksum, by (path, inode, size, mtime,
        # ctime, checksum): read again unchanged, they are not hashed again
        self._good: set[tuple[str, int, int, int, int, str]] = set()

    # ----------------------------------------------------------- creation
    @classmethod
    def create(
        cls, path: str | Path, config: Mapping[str, Any], resume: bool = True
    ) -> FeatureStore:
        """Create a store for ``config``, or (``resume=True``) reopen an existing one with the same config.

        Several processes may call this at once: exactly one creates the
        manifest, the others validate it. A store written by an attrlab
        without checksums (version 1) with the same config is upgraded: its
        manifest then records no file, so every shard is recomputed.

        Raises:
            InputError: ``config`` lacks ``n``, ``dim``, ``dtype`` or ``shard_size``.
            StoreMismatchError: the directory holds a store with a different config.
            FileFormatError: the directory holds something that is not a store.
        """

        def bad_config(what: str) -> NoReturn:
            raise InputError(f"feature store config: {what}")

        _check_config(config, bad_config)
        path = Path(path)
        (path / "shards").mkdir(parents=True, exist_ok=True)
        man_path = path / "manifest.json"
        manifest = {
            **{k: v for k, v in config.items() if k not in _RESERVED},
            "format": FORMAT,
            "version": VERSION,
            "store_id": uuid.uuid4().hex,
            "files": {},
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
        old = _load_manifest(path)
        if old["version"] < VERSION:
            cls(path, old).check(config)
            with cls(path, old)._locked():
                old = _load_manifest(path)
                if old["version"] < VERSION:
                    up = {k: v for k, v in old.items() if k not in _RESERVED}
                    up.update({k: manifest[k] for k in _RESERVED if k in manifest})
                    atomic_write_bytes(man_path, json.dumps(up, indent=1, sort_keys=True).encode())
        store = cls.open(path, expect=config)
        if not resume and store.done_ranges():
            raise StoreMismatchError(
                f"{path} already holds features; pass resume=True or use a new directory"
            )
        return store

    @classmethod
    def open(
        cls, path: str | Path, expect: Mapping[str, Any] | None = None, verify: bool = False
    ) -> FeatureStore:
        """Open a store for reading (or resuming), checking it against ``expect``.

        Args:
            path: the store directory.
            expect: config keys (checkpoint, projection, …) the store must have.
            verify: hash every recorded file now (default: sizes only; every read
                still checks the checksum of what it reads). Files that fail
                count as not written: :meth:`verify` lists them, reading them
                raises :class:`StoreCorruptError` and ``featurize`` recomputes them.

        Raises:
            FileFormatError: no store at ``path``, a damaged manifest, or a store
                without checksums (written by an older attrlab: re-featurize it).
            StoreMismatchError: a key of ``expect`` (checkpoint, projection, …) differs.

        Example:
            >>> import tempfile
            >>> FeatureStore.create(tempfile.mkdtemp(), {"n": 1, "dim": 1, "dtype": "float32",
            ...                                          "shard_size": 1}).missing()
            [(0, 1)]
        """
        path = Path(path)
        manifest = _load_manifest(path)
        if manifest["version"] < VERSION:
            raise _legacy_error(path)
        store = cls(path, manifest)
        if expect:
            store.check(expect)
        if verify:
            store.verify()
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

    # ------------------------------------------------------- the manifest
    def _reload(self) -> dict[str, Any]:
        man = _load_manifest(self.path)
        if man["version"] < VERSION:
            raise _legacy_error(self.path)
        self.manifest = man
        return man

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.path / ".lock", "a+") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _record(self, entries: Mapping[str, dict[str, Any]], finalized: bool | None = None) -> None:
        """Record ``entries`` (path -> size, checksum, ...) in the manifest, atomically."""
        with self._locked():
            man = self._reload()
            man["files"].update(entries)
            if finalized is not None:
                man["finalized"] = finalized
            atomic_write_bytes(
                self.path / "manifest.json", json.dumps(man, indent=1, sort_keys=True).encode()
            )

    def _entry(self, rel: str, data: bytes, **extra: Any) -> dict[str, Any]:
        return {
            "size": len(data),
            "blake2b": file_digest(self.manifest["store_id"], rel, data),
            **extra,
        }

    def _stat_key(self, rel: str) -> tuple[str, int, int, int] | None:
        try:
            st = os.stat(self.path / rel)
        except OSError:
            return None
        return (rel, st.st_ino, st.st_size, st.st_mtime_ns)

    def _problem(self, rel: str) -> tuple[str, str] | None:
        """``("missing" | "corrupt", why)`` if ``rel`` is not a recorded, sound file (fast: sizes)."""
        e = self.manifest["files"].get(rel)
        if e is None:
            return ("missing", "not written")
        key = self._stat_key(rel)
        if key is None:
            return ("missing", "recorded in manifest.json but the file is missing")
        if key[2] != e["size"]:
            return ("corrupt", f"{key[2]} bytes, manifest.json records {e['size']}")
        if key in self._bad:
            return ("corrupt", self._bad[key])
        return None

    def _mark_bad(self, rel: str, why: str) -> StoreCorruptError:
        key = self._stat_key(rel)
        if key is not None:
            self._bad[key] = why
        return StoreCorruptError(f"{self.path / rel} {why}; {_REPAIR}")

    def _read(self, rel: str) -> bytes:
        """The bytes of recorded file ``rel``, checked against its size and checksum."""
        e = self.manifest["files"].get(rel)
        if e is None:
            raise InputError(f"{self.path / rel} is not part of the store; {_REPAIR}")
        try:
            with open(self.path / rel, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:
            raise InputError(
                f"{self.path / rel} is recorded in manifest.json but missing; {_REPAIR}"
            ) from None
        if len(data) != e["size"]:
            raise self._mark_bad(rel, f"has {len(data)} bytes, manifest.json records {e['size']}")
        good = (rel, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, e["blake2b"])
        if good in self._good:  # this very file already matched this checksum
            return data
        if file_digest(self.manifest["store_id"], rel, data) != e["blake2b"]:
            raise self._mark_bad(
                rel,
                "does not match its checksum in manifest.json (damaged, or copied from "
                "another store or shard)",
            )
        self._good.add(good)
        return data

    def _read_npy(self, rel: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """A recorded ``.npy`` file, checked (checksum, shape, finite)."""
        data = self._read(rel)
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, EOFError, OSError) as e:
            raise self._mark_bad(rel, f"is not a readable .npy file ({e})") from None
        if shape is not None and arr.shape != shape:
            raise self._mark_bad(rel, f"has shape {arr.shape}, expected {shape}")
        if not np.isfinite(arr).all():
            raise self._mark_bad(rel, f"holds {int((~np.isfinite(arr)).sum())} non-finite values")
        return arr

    def verify(self, full: bool = True) -> dict[str, str]:
        """Check every file the manifest records; return ``{path: problem}`` (empty: sound).

        ``full=True`` reads and hashes every file (and checks ``.npy`` files hold
        finite numbers of the right shape); ``full=False`` checks sizes. Files
        that fail count as not written from then on (``featurize`` recomputes them).

        Example:
            >>> import tempfile, numpy as np
            >>> s = FeatureStore.create(tempfile.mkdtemp(), {"n": 1, "dim": 1, "dtype": "float32",
            ...                                              "shard_size": 1})
            >>> s.write_shard(0, np.ones((1, 1), np.float32), np.ones(1, np.float32))
            >>> s.verify()
            {}
        """
        man = self._reload()
        out: dict[str, str] = {}
        for rel in sorted(man["files"]):
            p = self._problem(rel)
            if p is not None:
                out[rel] = p[1]
                continue
            if not full:
                continue
            try:
                if rel.endswith(".npy"):
                    self._read_npy(rel)
                else:
                    self._read(rel)
            except (StoreCorruptError, InputError) as e:
                out[rel] = str(e)
        return out

    # ------------------------------------------------------------ writing
    def shard_path(self, start: int, stop: int) -> Path:
        return self.path / "shards" / f"{start:09d}-{stop:09d}.npy"

    @staticmethod
    def _rels(start: int, stop: int) -> tuple[str, str]:
        name = f"shards/{start:09d}-{stop:09d}"
        return f"{name}.npy", f"{name}.q.npy"

    def planned(self) -> list[tuple[int, int]]:
        """Every shard range ``(start, stop)`` of the store, in order."""
        n, s = self.n, int(self.manifest["shard_size"])
        return [(a, min(n, a + s)) for a in range(0, n, s)]

    def write_shard(self, start: int, features: np.ndarray, out_to_loss: np.ndarray) -> None:
        """Write the features ``[n, k]`` and out-to-loss weights ``[n]`` of rows ``start:start+n``.

        Raises:
            InputError: wrong shapes, a range that is not one of the store's
                shards, or non-finite values (after conversion to the store's dtype).
        """
        n, k = features.shape
        if k != self.manifest["dim"] or out_to_loss.shape != (n,):
            raise InputError(
                f"shard of shape {features.shape} / {out_to_loss.shape} for a store of dim {self.manifest['dim']}"
            )
        stop = start + n
        if (start, stop) not in self.planned():
            raise InputError(
                f"rows {start}:{stop} are not a shard of this store (shard_size "
                f"{self.manifest['shard_size']}, n {self.n})"
            )
        with np.errstate(over="ignore"):  # an overflow to inf is refused just below
            feats = np.ascontiguousarray(features.astype(self.manifest["dtype"]))
        q = np.ascontiguousarray(out_to_loss.astype(np.float32))
        if not (np.isfinite(feats).all() and np.isfinite(q).all()):
            raise InputError(
                f"non-finite features or out-to-loss weights for rows {start}:{stop}: the model's "
                "output or its gradient is NaN/inf on these examples"
                + (
                    " (or exceeds the float16 range: use dtype='float32')"
                    if self.manifest["dtype"] == "float16"
                    else ""
                )
                + ". Nothing was written."
            )
        frel, qrel = self._rels(start, stop)
        qb, fb = npy_bytes(q), npy_bytes(feats)
        atomic_write_bytes(self.path / qrel, qb)
        atomic_write_bytes(self.path / frel, fb)
        self._record({qrel: self._entry(qrel, qb), frel: self._entry(frel, fb)}, finalized=False)

    def write_file(self, name: str, data: bytes) -> None:
        """Write a file beside the features (e.g. ``ids.json``) atomically and record its checksum.

        Example:
            >>> import tempfile
            >>> s = FeatureStore.create(tempfile.mkdtemp(), {"n": 1, "dim": 1, "dtype": "float32",
            ...                                              "shard_size": 1})
            >>> s.write_file("notes.txt", b"hello")
            >>> s.read_file("notes.txt")
            b'hello'
        """
        atomic_write_bytes(self.path / name, data)
        self._record({name: self._entry(name, data)})

    def write_array(self, name: str, arr: np.ndarray) -> None:
        """Write an array beside the features (e.g. Kronecker factors) as a checksummed ``.npy``.

        Any dtype numpy saves without pickle (float64 factors stay float64).
        Refuses non-finite values.

        Raises:
            InputError: ``arr`` holds NaN or inf, or ``name`` does not end in ``.npy``.

        Example:
            >>> import tempfile, numpy as np
            >>> s = FeatureStore.create(tempfile.mkdtemp(), {"n": 1, "dim": 1, "dtype": "float32",
            ...                                              "shard_size": 1})
            >>> s.write_array("factors/x.npy", np.eye(2))
            >>> s.read_array("factors/x.npy").dtype
            dtype('float64')
        """
        if not name.endswith(".npy"):
            raise InputError(f"array files end in .npy, got {name!r}")
        arr = np.asarray(arr)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise InputError(f"refusing to write {name}: it holds non-finite values")
        (self.path / name).parent.mkdir(parents=True, exist_ok=True)
        self.write_file(name, npy_bytes(arr))

    def read_array(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray | None:
        """An array written with :meth:`write_array` (checksum, shape and finiteness
        checked), or None if the store records no sound file ``name`` (missing or
        wrong size: recompute it).

        Raises:
            StoreCorruptError: the file does not match its recorded checksum or shape.
        """
        if not self.has_file(name):
            return None
        return self._read_npy(name, shape)

    def read_file(self, name: str) -> bytes | None:
        """The bytes of a file written with :meth:`write_file`, or None if the store records none.

        Raises:
            StoreCorruptError: the file does not match its recorded size or checksum.
        """
        self._reload()
        if name not in self.manifest["files"]:
            return None
        return self._read(name)

    def has_file(self, name: str) -> bool:
        """Whether ``name`` is recorded and its size matches (fast check)."""
        self._reload()
        return self._problem(name) is None

    # ------------------------------------------------------------ claims
    def _claim_path(self, start: int, stop: int) -> Path:
        return self.path / "shards" / f"{start:09d}-{stop:09d}.claim"

    def _claim_stale(self, cp: Path, timeout: float) -> bool:
        try:
            age = time.time() - cp.stat().st_mtime
            info = json.loads(cp.read_text())
        except FileNotFoundError:
            return True
        except (OSError, ValueError):
            return True  # claims are written under the lock: a partial one's writer died
        if not isinstance(info, dict) or age > timeout:
            return True
        pid = info.get("pid")
        if info.get("host") == _HOST:
            return not isinstance(pid, int) or not _alive(pid, info.get("start"))
        return False

    def try_claim(self, start: int, stop: int, timeout: float = CLAIM_TIMEOUT) -> ShardClaim | None:
        """Claim shard ``start:stop`` for this process, or None (done, or claimed by a live writer).

        The claim file is created exclusively (``O_CREAT|O_EXCL``) and holds
        this process's pid, host and start time. A claim whose process died
        (on this host) or whose file is older than ``timeout`` seconds is taken over.

        Example:
            >>> import tempfile
            >>> s = FeatureStore.create(tempfile.mkdtemp(), {"n": 2, "dim": 1, "dtype": "float32",
            ...                                              "shard_size": 2})
            >>> c = s.try_claim(0, 2)
            >>> s.try_claim(0, 2) is None
            True
            >>> c.release()
        """
        cp = self._claim_path(start, stop)
        with self._locked():
            self._reload()
            if all(self._problem(r) is None for r in self._rels(start, stop)):
                return None
            if cp.exists():
                if not self._claim_stale(cp, timeout):
                    return None
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(cp)
            try:
                fd = os.open(cp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return None
            token = uuid.uuid4().hex
            st = _proc_state(os.getpid())
            info = {
                "pid": os.getpid(),
                "host": _HOST,
                "start": st[1] if st else None,
                "token": token,
                "time": time.time(),
            }
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
                f.flush()
                os.fsync(f.fileno())
        return ShardClaim(self, cp, token)

    # ------------------------------------------------------------ status
    def done_ranges(self) -> list[tuple[int, int]]:
        """Row ranges ``(start, stop)`` of complete shards (recorded, sizes match), sorted."""
        self._reload()
        return [
            rng for rng in self.planned() if all(self._problem(r) is None for r in self._rels(*rng))
        ]

    def missing(self) -> list[tuple[int, int]]:
        """Planned shard ranges not yet written, or whose files fail their checks."""
        done = set(self.done_ranges())
        return [rng for rng in self.planned() if rng not in done]

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
        self._reload()
        missing: list[tuple[str, str]] = []
        corrupt: list[tuple[str, str]] = []
        for rng in self.planned():
            for r in self._rels(*rng):
                p = self._problem(r)
                if p is not None:
                    (corrupt if p[0] == "corrupt" else missing).append((r, p[1]))
        if corrupt:
            r, why = corrupt[0]
            raise StoreCorruptError(
                f"the feature store at {self.path} has {len(corrupt)} damaged file(s), "
                f"first {r}: {why}; {_REPAIR}"
            )
        if missing:
            r, why = missing[0]
            raise InputError(
                f"the feature store at {self.path} is incomplete ({len(missing)} shard files "
                f"missing, first {r}: {why}); resume featurize() before scoring"
            )

    def iter_blocks(
        self, with_q: bool = False
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
        """Yield ``(start, features [n_shard, k], out_to_loss [n_shard] or None)`` shard by shard.

        Each shard is read, checked against its checksum and for finite
        values, and held in memory only while it is yielded.

        Raises:
            InputError: the store is incomplete.
            StoreCorruptError: a shard fails its checks.
        """
        self._require_complete()
        for a, b in self.planned():
            frel, qrel = self._rels(a, b)
            feats = self._read_npy(frel, (b - a, self.dim))
            q = self._read_npy(qrel, (b - a,)) if with_q else None
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

    def _inputs_digest(self) -> str:
        """A digest of the feature shards' recorded checksums (what ``gram.npy`` depends on)."""
        h = hashlib.blake2b(digest_size=32)
        files = self.manifest["files"]
        for rng in self.planned():
            rel = self._rels(*rng)[0]
            h.update(f"{rel} {files.get(rel, {}).get('blake2b')}\n".encode())
        return h.hexdigest()

    def _fresh_gram(self) -> np.ndarray | None:
        """The recorded ``gram.npy`` if it is sound and was computed from the current shards."""
        e = self.manifest["files"].get("gram.npy")
        if e is None or e.get("inputs") != self._inputs_digest():
            return None
        try:
            return self._read_npy("gram.npy", (self.dim, self.dim)).astype(np.float64)
        except (StoreCorruptError, InputError):
            return None

    def gram(self) -> np.ndarray:
        """``Phi^T Phi`` ``[k, k]`` (float64), (re)computing and saving it if missing, damaged or stale.

        Raises:
            InputError: the store is incomplete.
            StoreCorruptError: a shard fails its checks.
        """
        self._require_complete()
        g = self._fresh_gram()
        if g is not None:
            return g
        g = self.partial_gram()
        try:
            self.finalize(g)
        except PermissionError:  # a read-only store: use the Gram matrix without saving it
            pass
        return g

    def partial_gram(self, ranges: list[tuple[int, int]] | None = None) -> np.ndarray:
        """``sum Phi_s^T Phi_s`` over the shards with these ranges (default: all)."""
        self._require_complete()
        g = torch.zeros((self.dim, self.dim), dtype=torch.float64)
        for a, b in ranges if ranges is not None else self.planned():
            x = torch.from_numpy(
                self._read_npy(self._rels(a, b)[0], (b - a, self.dim)).astype(np.float64)
            )
            g.addmm_(x.T, x)  # float64 GEMM (torch's BLAS: several times numpy's here)
            del x
        return g.numpy()

    def finalize(self, gram: np.ndarray | None = None) -> np.ndarray:
        """Write ``gram.npy`` (given, or computed from all shards) and mark the store finalized.

        Without ``gram``, a recorded ``gram.npy`` computed from the current
        shards is kept as it is.
        """
        if gram is None:
            self._require_complete()
            g = self._fresh_gram()
            if g is not None:
                if not self.manifest["finalized"]:
                    self._record({}, finalized=True)
                return g
            g = self.partial_gram()
        else:
            g = np.asarray(gram, np.float64)
            self._reload()
        if g.shape != (self.dim, self.dim) or not np.isfinite(g).all():
            raise InputError(f"a Gram matrix must be finite and [{self.dim}, {self.dim}]")
        inputs = self._inputs_digest()
        data = npy_bytes(g)
        atomic_write_bytes(self.path / "gram.npy", data)
        self._record({"gram.npy": self._entry("gram.npy", data, inputs=inputs)}, finalized=True)
        return g

    def __repr__(self) -> str:
        return (
            f"FeatureStore({str(self.path)!r}, n={self.manifest.get('n')}, dim={self.manifest.get('dim')}, "
            f"files={len(self.manifest.get('files', {}))}, model={self.manifest.get('model_id')!r})"
        )


def _norm(v: Any) -> Any:
    """JSON round trip, so tuples and lists compare equal."""
    return json.loads(json.dumps(v, sort_keys=True))
