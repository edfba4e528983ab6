"""Adversarial on-disk corruptions of a feature store.

Every case damages a copy of a clean store and asserts its classification:
either scoring raises a specific typed error whose message says what to do,
or scoring gives the clean store's scores bit for bit; and, where the damage
is to recomputable data, ``featurize`` with the same arguments repairs the
store to the clean features, bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import attrlab.data as ad
from attrlab.errors import FileFormatError, InputError, StoreCorruptError

N, SHARD, BATCH, DIM = 24, 8, 4, 8
S0, S1 = "shards/000000000-000000008.npy", "shards/000000008-000000016.npy"
Q0 = "shards/000000000-000000008.q.npy"


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def _data() -> ad.Examples:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N, 4, generator=g), torch.randint(0, 3, (N,), generator=g)
    return ad.Examples((x, y), ids=[f"ex{i}" for i in range(N)], texts=[f"t{i}" for i in range(N)])


def _featurize(model: nn.Module, path: Path, **kw) -> ad.FeatureStore:
    return ad.featurize(
        model, _data(), path, proj_dim=DIM, shard_size=SHARD, batch_size=BATCH, **kw
    )


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A clean store, a store of another model, the query and the clean scores."""
    tmp = tmp_path_factory.mktemp("adv_store")
    model = _model(0)
    ref = _featurize(model, tmp / "ref")
    other = _featurize(_model(1), tmp / "other")
    queries = (torch.randn(3, 4), torch.tensor([0, 1, 2]))
    scores = ad.TRAK(ref.path).attribute(model, queries)
    return {"tmp": tmp, "model": model, "ref": ref, "other": other, "q": queries, "r": scores}


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _write_manifest(path: Path, man) -> None:
    (path / "manifest.json").write_text(json.dumps(man))


def _edit_manifest(fn: Callable[[dict], None]) -> Callable[[Path, dict], None]:
    def go(path: Path, ctx: dict) -> None:
        man = _manifest(path)
        fn(man)
        _write_manifest(path, man)

    return go


def _flip(rel: str, offset: int = -3) -> Callable[[Path, dict], None]:
    def go(path: Path, ctx: dict) -> None:
        b = bytearray((path / rel).read_bytes())
        b[offset] ^= 0x10
        (path / rel).write_bytes(bytes(b))

    return go


def _truncate(path: Path, ctx: dict) -> None:
    b = (path / S0).read_bytes()
    (path / S0).write_bytes(b[: len(b) // 2])


def _zero_length(path: Path, ctx: dict) -> None:
    (path / S1).write_bytes(b"")


def _nan(path: Path, ctx: dict) -> None:
    a = np.load(path / S0)
    a[2, 3] = np.nan
    np.save(path / S0, a)  # same size, new bytes


def _nan_forged(path: Path, ctx: dict) -> None:
    """NaN with the manifest's size and checksum forged to match: caught by the finiteness check."""
    from attrlab.data.store import file_digest, npy_bytes

    a = np.load(path / S0)
    a[0, 0] = np.inf
    data = npy_bytes(a)
    (path / S0).write_bytes(data)
    man = _manifest(path)
    man["files"][S0]["blake2b"] = file_digest(man["store_id"], S0, data)
    _write_manifest(path, man)


def _from_other_store(path: Path, ctx: dict) -> None:
    shutil.copyfile(ctx["other"].path / S1, path / S1)


def _swap(path: Path, ctx: dict) -> None:
    a, b = (path / S0).read_bytes(), (path / S1).read_bytes()
    (path / S0).write_bytes(b)
    (path / S1).write_bytes(a)


def _stale_gram(path: Path, ctx: dict) -> None:
    shutil.copyfile(ctx["other"].path / "gram.npy", path / "gram.npy")


def _gram_other_inputs(path: Path, ctx: dict) -> None:
    """gram.npy recorded for other shards (its inputs digest differs): recomputed."""
    g = np.load(path / "gram.npy") * 2.0
    from attrlab.data.store import file_digest, npy_bytes

    data = npy_bytes(g)
    (path / "gram.npy").write_bytes(data)
    man = _manifest(path)
    e = man["files"]["gram.npy"]
    e.update(
        size=len(data), blake2b=file_digest(man["store_id"], "gram.npy", data), inputs="0" * 64
    )
    _write_manifest(path, man)


def _gram_deleted(path: Path, ctx: dict) -> None:
    (path / "gram.npy").unlink()


def _bad_json(path: Path, ctx: dict) -> None:
    (path / "manifest.json").write_text('{"format": "attrlab.feature_store", "files": {')


def _manifest_not_object(path: Path, ctx: dict) -> None:
    _write_manifest(path, [1, 2, 3])


def _missing_file(path: Path, ctx: dict) -> None:
    (path / S1).unlink()


def _extra_shard(path: Path, ctx: dict) -> None:
    """A stray shard-named file for a range the store does not plan, and a foreign one."""
    np.save(path / "shards" / "000000000-000000005.npy", np.ones((5, DIM), np.float32))
    np.save(path / "shards" / "000000024-000000032.npy", np.ones((8, DIM), np.float32))
    (path / "notes.txt").write_text("not part of the store")


def _legacy(path: Path, ctx: dict) -> None:
    """A version-1 store (no checksums), as written by attrlab before them."""
    man = _manifest(path)
    for k in ("store_id", "files"):
        del man[k]
    man["version"] = 1
    man["shards"] = ["000000000-000000008", "000000008-000000016", "000000016-000000024"]
    _write_manifest(path, man)


def _newer(path: Path, ctx: dict) -> None:
    _edit_manifest(lambda m: m.update(version=99))(path, ctx)


def _ids_tampered(path: Path, ctx: dict) -> None:
    ids = json.loads((path / "ids.json").read_text())
    ids[0], ids[1] = ids[1], ids[0]
    (path / "ids.json").write_text(json.dumps(ids))


def _dead_claim(path: Path, ctx: dict) -> None:
    """A claim on a missing shard left by a process that is dead (reaped) on this host."""
    (path / S1).unlink()
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    claim = {"pid": p.pid, "host": os.uname().nodename, "start": None, "token": "x"}
    (path / "shards" / "000000008-000000016.claim").write_text(json.dumps(claim))


def _old_live_claim(path: Path, ctx: dict) -> None:
    """A claim of a live process (this one) untouched for longer than the timeout."""
    (path / S0).unlink()
    cp = path / "shards" / "000000000-000000008.claim"
    cp.write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "token": "y"}))
    old = time.time() - 10_000
    os.utime(cp, (old, old))


def _empty_claim(path: Path, ctx: dict) -> None:
    """A claim file its writer never filled (it died between create and write)."""
    (path / S1).unlink()
    (path / "shards" / "000000008-000000016.claim").write_bytes(b"")


# name, corruption, error raised by scoring (None: clean scores), message fragment, repairable
CASES: list[tuple[str, Callable[[Path, dict], None], type[Exception] | None, str, bool]] = [
    ("truncated-shard", _truncate, StoreCorruptError, "featurize", True),
    ("flipped-byte-shard", _flip(S0), StoreCorruptError, "checksum", True),
    ("flipped-byte-header", _flip(S1, 20), StoreCorruptError, "checksum", True),
    ("flipped-byte-out-to-loss", _flip(Q0), StoreCorruptError, "checksum", True),
    ("nan-in-shard", _nan, StoreCorruptError, "featurize", True),
    ("nan-forged-checksum", _nan_forged, StoreCorruptError, "non-finite", True),
    ("zero-length-shard", _zero_length, StoreCorruptError, "0 bytes", True),
    ("shard-from-other-store", _from_other_store, StoreCorruptError, "another store", True),
    ("swapped-shards", _swap, StoreCorruptError, "checksum", True),
    ("manifest-missing-file", _missing_file, InputError, "incomplete", True),
    ("stale-gram-other-store", _stale_gram, None, "", True),
    ("stale-gram-other-inputs", _gram_other_inputs, None, "", True),
    ("gram-deleted", _gram_deleted, None, "", True),
    ("extra-unknown-files", _extra_shard, None, "", True),
    ("ids-tampered", _ids_tampered, StoreCorruptError, "ids.json", True),
    (
        "manifest-wrong-digest",
        _edit_manifest(lambda m: m["files"][S1].update(blake2b="ab" * 32)),
        StoreCorruptError,
        "checksum",
        True,
    ),
    (
        "manifest-size-lies",
        _edit_manifest(lambda m: m["files"][S0].update(size=12)),
        StoreCorruptError,
        "12",
        True,
    ),
    ("manifest-bad-json", _bad_json, FileFormatError, "manifest.json is damaged", False),
    ("manifest-not-object", _manifest_not_object, FileFormatError, "damaged", False),
    ("manifest-missing-n", _edit_manifest(lambda m: m.pop("n")), FileFormatError, "'n'", False),
    (
        "manifest-n-wrong-type",
        _edit_manifest(lambda m: m.update(n="24")),
        FileFormatError,
        "'n' must be an integer",
        False,
    ),
    (
        "manifest-files-wrong-type",
        _edit_manifest(lambda m: m.update(files=[])),
        FileFormatError,
        "'files' must be an object",
        False,
    ),
    (
        "manifest-entry-size-wrong-type",
        _edit_manifest(lambda m: m["files"][S0].update(size="big")),
        FileFormatError,
        "size must be a non-negative integer",
        False,
    ),
    (
        "manifest-bad-store-id",
        _edit_manifest(lambda m: m.update(store_id=None)),
        FileFormatError,
        "store_id",
        False,
    ),
    (
        "manifest-bad-dtype",
        _edit_manifest(lambda m: m.update(dtype="int8")),
        FileFormatError,
        "dtype",
        False,
    ),
    (
        "manifest-other-format",
        _edit_manifest(lambda m: m.update(format="something.else")),
        FileFormatError,
        "not an attrlab feature store",
        False,
    ),
    ("manifest-newer-version", _newer, FileFormatError, "newer attrlab", False),
    ("legacy-store-without-checksums", _legacy, FileFormatError, "featurize", True),
    ("claim-left-by-dead-pid", _dead_claim, InputError, "incomplete", True),
    ("claim-older-than-timeout", _old_live_claim, InputError, "incomplete", True),
    ("claim-empty-file", _empty_claim, InputError, "incomplete", True),
]


@pytest.mark.parametrize("name,corrupt,error,match,repairable", CASES, ids=[c[0] for c in CASES])
def test_store_corruption(clean, tmp_path, name, corrupt, error, match, repairable):
    path = tmp_path / "s"
    shutil.copytree(clean["ref"].path, path)
    corrupt(path, clean)
    if error is None:
        r = ad.TRAK(path).attribute(clean["model"], clean["q"])
        assert r.scores.isfinite().all()
        assert torch.equal(r.scores, clean["r"].scores), name
        assert r.units == clean["r"].units
    else:
        with pytest.raises(error, match=match) as ei:
            ad.TRAK(path).attribute(clean["model"], clean["q"])
        msg = str(ei.value)
        assert "featurize" in msg, msg  # says what to do
    if not repairable:
        with pytest.raises(error, match=match):
            _featurize(clean["model"], path)  # refuses instead of computing into a damaged store
        return
    fixed = _featurize(clean["model"], path)
    ref = clean["ref"]
    assert fixed.verify() == {}
    assert np.array_equal(fixed.features(), ref.features())
    assert np.array_equal(fixed.out_to_loss(), ref.out_to_loss())
    assert np.array_equal(fixed.gram(), ref.gram())
    assert not list((path / "shards").glob("*.claim"))
    r = ad.TRAK(path).attribute(clean["model"], clean["q"])
    assert torch.equal(r.scores, clean["r"].scores) and r.units == clean["r"].units


def test_full_verify_on_open_lists_damage(clean, tmp_path):
    path = tmp_path / "s"
    shutil.copytree(clean["ref"].path, path)
    _flip(S1)(path, clean)
    fast = ad.FeatureStore.open(path)
    assert fast.complete  # same size: the fast check cannot see a flipped byte...
    slow = ad.FeatureStore.open(path, verify=True)
    assert S1 in slow.verify() and not slow.complete  # ...the full one can
    assert slow.missing() == [(8, 16)]


def test_non_finite_features_are_refused_when_written(clean, tmp_path):
    store = ad.FeatureStore.open(clean["ref"].path)
    with pytest.raises(InputError, match="non-finite"):
        store.write_shard(0, np.full((SHARD, DIM), np.nan, np.float32), np.ones(SHARD, np.float32))

    class Exploding(nn.Module):  # float16 overflow: finite in float32, inf when stored
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)
            with torch.no_grad():
                self.lin.weight.mul_(1e5)

        def forward(self, x):
            return self.lin(x) * 1e5

    with pytest.raises(InputError, match="float16"):
        ad.featurize(Exploding(), _data(), tmp_path / "h", proj_dim=None, dtype="float16")


def test_live_fresh_claim_is_respected(clean, tmp_path):
    path = tmp_path / "s"
    shutil.copytree(clean["ref"].path, path)
    (path / S0).unlink()
    store = ad.FeatureStore.open(path)
    mine = store.try_claim(0, 8)
    assert mine is not None and store.try_claim(0, 8) is None  # held by a live writer
    assert store.try_claim(8, 16) is None  # done: nothing to claim
    mine.release()
    again = store.try_claim(0, 8)
    assert again is not None
    again.release()
