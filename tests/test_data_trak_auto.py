"""TRAK scoring's automatic choices: query batch sizes from the memory model, one
projection per distinct spec, the Cholesky kernel, and the store's read-once checksums."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

import attrlab.data as ad
from attrlab.data.digits import DigitsMLP, load_digits_data, train_mlp
from attrlab.data.featurize import GradientFeaturizer
from attrlab.data.outputs import ClassificationMargin
from attrlab.data.project import Projector, block_seed
from attrlab.errors import InputError, StoreCorruptError
from attrlab.model.budget import example_grad_bytes, grad_batch_size


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    xtr, ytr, xte, yte = load_digits_data()
    xtr, ytr = xtr[:150], ytr[:150]
    models = [train_mlp(xtr, ytr, hidden=8, epochs=3, seed=s) for s in range(2)]
    tmp = tmp_path_factory.mktemp("trak_auto")
    stores = [
        ad.featurize(m, (xtr, ytr), tmp / f"m{i}", proj_dim=32, shard_size=64)
        for i, m in enumerate(models)
    ]
    return models, stores, xte[:23], yte[:23]


def test_auto_batch_equals_forced_batch(setup):
    models, stores, xq, yq = setup
    auto = ad.TRAK(stores).scores(models, (xq, yq))
    feat = GradientFeaturizer(models[0], ClassificationMargin(), Projector(32))
    chosen = feat.batch_size(ad.Examples((xq, yq)))
    assert chosen == len(yq)  # a small model: every query in one batch
    forced_same = ad.TRAK(stores).scores(models, (xq, yq), batch_size=chosen)
    assert torch.equal(auto, forced_same)
    forced_small = ad.TRAK(stores).scores(models, (xq, yq), batch_size=5)
    torch.testing.assert_close(auto, forced_small, rtol=1e-5, atol=1e-6)


def test_forced_batch_size_is_respected(setup, monkeypatch):
    models, stores, xq, yq = setup
    seen: list[int] = []
    call = GradientFeaturizer.__call__

    def spy(self, *batch):
        seen.append(int(batch[0].shape[0]))
        return call(self, *batch)

    monkeypatch.setattr(GradientFeaturizer, "__call__", spy)
    ad.TRAK(stores).scores(models, (xq, yq), batch_size=5)
    assert seen == [5, 5, 5, 5, 3] * 2
    seen.clear()
    ad.TRAK(stores).scores(models, (xq, yq))
    assert seen == [23, 23]
    with pytest.raises(InputError, match="batch_size"):
        ad.TRAK(stores).scores(models, (xq, yq), batch_size=0)


def test_grad_batch_size_follows_model_size_and_budget():
    n = 500
    small = grad_batch_size(example_grad_bytes(10_000), n, memory_budget="64MB")
    wide = grad_batch_size(example_grad_bytes(1_000_000), n, memory_budget="64MB")
    assert small == n  # fits: one batch
    assert 1 < wide < small  # a wide model: fewer examples per batch
    assert wide == (64 * 2**20) // example_grad_bytes(1_000_000)
    assert grad_batch_size(example_grad_bytes(1_000_000), n, memory_budget="1GB") > wide
    assert grad_batch_size(example_grad_bytes(10**9), n, memory_budget="64MB") == 1
    assert grad_batch_size(example_grad_bytes(10_000), n, batch_size=17) == 17
    assert grad_batch_size(example_grad_bytes(10_000), 3, memory_budget="1GB") == 3


def test_example_bytes_grow_with_width():
    x, y = torch.randn(64), torch.tensor(3)
    narrow = GradientFeaturizer(DigitsMLP(8), ClassificationMargin(), Projector(16))
    wide = GradientFeaturizer(DigitsMLP(512), ClassificationMargin(), Projector(16))
    b_narrow, b_wide = narrow.example_bytes(x, y), wide.example_bytes(x, y)
    n_wide = sum(p.numel() for p in wide.model.parameters())
    assert b_wide > b_narrow
    assert b_wide >= example_grad_bytes(n_wide)  # gradients plus the measured activations
    data = ad.Examples((torch.randn(5000, 64), torch.zeros(5000, dtype=torch.long)))
    assert wide.batch_size(data, memory_budget="32MB") < narrow.batch_size(
        data, memory_budget="32MB"
    )


def test_checkpoints_share_one_projection(setup, monkeypatch):
    models, stores, xq, yq = setup
    made: list[tuple[int, int]] = []
    randint = torch.randint

    def counting(*a, **kw):
        made.append(tuple(a[2]))
        return randint(*a, **kw)

    monkeypatch.setattr(torch, "randint", counting)
    t = ad.TRAK(stores)
    t.scores(models, (xq, yq))
    n_blocks = len(made)
    assert n_blocks == len(stores[0].manifest["params"])  # once, not once per checkpoint
    assert len(t._projectors) == 1
    t.scores(models, (xq, yq))
    assert len(made) == n_blocks  # kept between calls of one TRAK


def test_rademacher_blocks_unchanged():
    """Stores written by earlier versions keep matching: same seed, same entries."""
    p = Projector(dim=24, seed=7)
    g = torch.Generator().manual_seed(block_seed(7, 1, 0))
    old = torch.randint(0, 2, (10, 24), generator=g, dtype=torch.int8).to(torch.float32)
    old.mul_(2.0).sub_(1.0).mul_(1.0 / math.sqrt(24))
    assert torch.equal(p.block(1, 0, 10), old)
    assert torch.equal(Projector.from_spec(p.spec()).block(1, 0, 10), old)


def test_cholesky_kernel_equals_explicit_inverse(setup):
    models, stores, xq, yq = setup
    t = ad.TRAK(stores, reg=0.1)
    g = stores[0].gram()
    lam = 0.1 * float(np.diag(g).mean())
    inv = np.linalg.inv(g + lam * np.eye(g.shape[0]))
    phi = torch.randn(4, g.shape[0])
    np.testing.assert_allclose(t.apply_kernel(0, phi).numpy(), phi.double().numpy() @ inv,
                               rtol=1e-4, atol=1e-6 * np.abs(inv).max())  # fmt: skip
    np.testing.assert_allclose(t.kernel(0).numpy(), inv, rtol=1e-4, atol=1e-6 * np.abs(inv).max())


def test_singular_gram_without_ridge_uses_pseudo_inverse(tmp_path):
    x, y = torch.randn(6, 64), torch.randint(0, 10, (6,))
    model = DigitsMLP(8)
    store = ad.featurize(model, (x, y), tmp_path / "s", proj_dim=32)  # 6 examples, k=32: rank 6
    t = ad.TRAK(store, lambda_=0.0)
    assert t._solver(0)[0] == "pinv"
    s = t.scores(model, (x, y))
    assert s.isfinite().all()
    want = np.linalg.pinv(store.gram(), hermitian=True)
    phi = torch.randn(2, 32)
    np.testing.assert_allclose(t.apply_kernel(0, phi).numpy(), phi.double().numpy() @ want,
                               rtol=1e-3, atol=1e-6 * np.abs(want).max())  # fmt: skip


def test_projector_must_match_the_store(setup):
    from attrlab.data.featurize import query_features

    models, stores, xq, yq = setup
    with pytest.raises(InputError, match="projection"):
        query_features(models[0], (xq, yq), stores[0], projector=Projector(32, seed=1))
    same = Projector.from_spec(stores[0].manifest["projection"])
    a = query_features(models[0], (xq, yq), stores[0], projector=same)[0]
    assert torch.equal(a, query_features(models[0], (xq, yq), stores[0])[0])


def test_a_file_changed_after_a_verified_read_is_caught(tmp_path):
    x, y = torch.randn(20, 64), torch.randint(0, 10, (20,))
    store = ad.featurize(DigitsMLP(8), (x, y), tmp_path / "s", proj_dim=8, shard_size=10)
    store.features()  # hashed and remembered
    store.features()  # read again: not re-hashed, same values
    rel = "shards/000000000-000000010.npy"
    # file times tick every few ms: a same-size rewrite within one tick of the
    # previous write would keep (inode, size, mtime, ctime), the cache's key
    time.sleep(0.05)
    raw = bytearray((store.path / rel).read_bytes())
    raw[-3] ^= 0x10  # same size, one flipped byte
    (store.path / rel).write_bytes(bytes(raw))
    with pytest.raises(StoreCorruptError, match="checksum"):
        store.features()
