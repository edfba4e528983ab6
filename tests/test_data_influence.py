"""K-FAC / EK-FAC influence functions against a brute-force float64 oracle.

The oracle builds every module's curvature block explicitly (``S ⊗ A`` for
K-FAC; ``Q diag(Λ) Q^T`` with ``Q = Q_S ⊗ Q_A`` for EK-FAC) from per-example
pre-activation gradients written out by hand for a two-layer tanh MLP, and
solves the damped system with ``torch.linalg.solve``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import attrlab as al
import attrlab.data as ad
from attrlab.data.influence import covariances_of
from attrlab.errors import InputError, NonFiniteError, StoreMismatchError

N, D_IN, HID, C = 30, 4, 5, 3


def make_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, HID), nn.Tanh(), nn.Linear(HID, C)).double()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    net = make_mlp()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, D_IN, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=g)
    xq = torch.randn(4, D_IN, generator=g, dtype=torch.float64)
    yq = torch.randint(0, C, (4,), generator=g)
    path = tmp_path_factory.mktemp("inf")
    store = ad.fit_factors(net, (x, y), path, fisher="empirical", shard_size=7, batch_size=3)
    return net, x, y, xq, yq, store


def manual(net: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Per-example inputs (with bias column) and pre-activation loss gradients of both layers."""
    w1, b1, w2, b2 = (p.detach() for p in net.parameters())
    z1 = x @ w1.T + b1
    h = torch.tanh(z1)
    z2 = h @ w2.T + b2
    g2 = torch.softmax(z2, -1) - nn.functional.one_hot(y, C).double()  # dCE/dz2
    g1 = (g2 @ w2) * (1 - h**2)
    ones = torch.ones(x.shape[0], 1, dtype=torch.float64)
    return [(torch.cat([x, ones], 1), g1), (torch.cat([h, ones], 1), g2)]


def margin_grads(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Per-query margin gradients as module matrices ``[m, out, in+1]`` (plain autograd)."""
    rows: list[list[torch.Tensor]] = [[], []]
    for i in range(x.shape[0]):
        logits = net(x[i : i + 1])[0]
        others = torch.cat([logits[: y[i]], logits[y[i] + 1 :]])
        gw1, gb1, gw2, gb2 = torch.autograd.grad(
            logits[y[i]] - torch.logsumexp(others, 0), list(net.parameters())
        )
        rows[0].append(torch.cat([gw1, gb1[:, None]], 1))
        rows[1].append(torch.cat([gw2, gb2[:, None]], 1))
    return [torch.stack(r) for r in rows]


def oracle(net, x, y, xq, yq, strategy: str, damping: float | None, self_inf: bool = False):
    """Scores [m, N] (or self-influence [N]) from explicit curvature blocks."""
    q = margin_grads(net, xq, yq)
    total = torch.zeros(xq.shape[0], N, dtype=torch.float64)
    selfs = torch.zeros(N, dtype=torch.float64)
    for layer, (a, g) in enumerate(manual(net, x, y)):
        A = a.T @ a / N
        S = g.T @ g / N
        G = torch.einsum("no,ni->noi", g, a).reshape(N, -1)  # loss gradients, row-major vec
        if strategy == "kfac":
            H = torch.kron(S, A)
        else:
            ea, qa = torch.linalg.eigh(A)
            es, qs = torch.linalg.eigh(S)
            Q = torch.kron(qs, qa)
            lam = ((G @ Q) ** 2).mean(0)
            H = Q @ torch.diag(lam) @ Q.T
        evals = torch.linalg.eigvalsh(H)
        d = 0.1 * float(evals.mean()) if damping is None else damping
        Hd = H + d * torch.eye(H.shape[0], dtype=torch.float64)
        train = -G  # grad log p(y|x) = minus the loss gradient
        total += q[layer].reshape(q[layer].shape[0], -1) @ torch.linalg.solve(Hd, train.T)
        selfs += (train * torch.linalg.solve(Hd, train.T).T).sum(1)
    return selfs if self_inf else total


def test_covariance_factors_equal_explicit_ones(setup):
    net, x, y, _, _, store = setup
    inf = ad.Influence(store)
    cov = covariances_of(store, inf.blocks, inf.root)
    for (a, g), (A, S) in zip(manual(net, x, y), cov):
        np.testing.assert_allclose(A, (a.T @ a / N).numpy(), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(S, (g.T @ g / N).numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
@pytest.mark.parametrize("damping", [1e-3, None])
def test_scores_equal_brute_force_solve(setup, strategy, damping):
    net, x, y, xq, yq, store = setup
    got = ad.Influence(store, strategy=strategy, damping=damping).scores(net, (xq, yq))
    want = oracle(net, x, y, xq, yq, strategy, damping)
    # training gradients are stored in float32: agreement to float32 round-off
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


def test_ekfac_differs_from_kfac(setup):
    net, _, _, xq, yq, store = setup
    e = ad.Influence(store, "ekfac", damping=1e-3).scores(net, (xq, yq))
    k = ad.Influence(store, "kfac", damping=1e-3).scores(net, (xq, yq))
    assert float((e - k).abs().max()) > 1e-3 * float(k.abs().max())


@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_self_influence_equals_brute_force(setup, strategy):
    net, x, y, xq, yq, store = setup
    r = ad.self_influence(store, strategy=strategy, damping=1e-3)
    want = oracle(net, x, y, xq, yq, strategy, 1e-3, self_inf=True)
    assert r.unit_kind == "train" and r.scores.shape == (N,)
    torch.testing.assert_close(r.scores.double(), want, rtol=1e-4, atol=1e-6)


def _truncated_scores(inf: ad.Influence, grads: torch.Tensor, rank: int) -> torch.Tensor:
    """Oracle for ``query_rank``: the dense preconditioned query gradients, each module matrix
    replaced by its numpy rank-``rank`` SVD truncation, times the stored training gradients."""
    left = inf.precondition(grads)
    cut = torch.zeros_like(left)
    for m in inf.blocks:
        u, sv, vh = np.linalg.svd(m.matrix(left).numpy(), full_matrices=False)
        k = min(rank, sv.shape[-1])
        m.scatter(torch.from_numpy((u[..., :k] * sv[..., None, :k]) @ vh[..., :k, :]), cut)
    return cut @ torch.from_numpy(inf.store.features().astype(np.float64)).T


@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_low_rank_query_at_full_rank_equals_exact_scores(setup, strategy):
    net, _, _, xq, yq, store = setup
    exact = ad.Influence(store, strategy, damping=1e-3).scores(net, (xq, yq))
    assert [min(m.d_out, m.d_in1) for m in ad.Influence(store).blocks] == [5, 3]
    for rank in (5, 50):  # every module at full rank (truncated SVD of all singular values)
        inf = ad.Influence(store, strategy, damping=1e-3, query_rank=rank)
        got = inf.scores(net, (xq, yq))
        torch.testing.assert_close(got, exact, rtol=1e-10, atol=1e-12 * float(exact.abs().max()))
        assert inf.params()["query_rank"] == rank


def test_low_rank_query_error_shrinks_as_rank_grows(setup):
    net, _, _, xq, yq, store = setup
    exact_inf = ad.Influence(store, damping=1e-3)
    grads = exact_inf.query_gradients(net, (xq, yq))
    exact = exact_inf.scores_from_gradients(grads)
    errs = []
    for rank in (1, 2, 3, 4, 5):  # module matrices [5, 5] and [3, 6]: rank 5 is full
        inf = ad.Influence(store, damping=1e-3, query_rank=rank)
        got = inf.scores_from_gradients(grads)
        want = _truncated_scores(exact_inf, grads, rank)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12 * float(want.abs().max()))
        errs.append(float((got - exact).norm() / exact.norm()))
    assert errs[0] > 1e-2  # rank 1 loses a visible part of the scores
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-12


def test_low_rank_query_scores_in_chunks_and_cached(tmp_path, monkeypatch):
    from attrlab.data import influence

    net = make_mlp(4)
    x, y = torch.randn(24, D_IN, dtype=torch.float64), torch.randint(0, C, (24,))
    xq, yq = torch.randn(7, D_IN, dtype=torch.float64), torch.randint(0, C, (7,))
    store = ad.fit_factors(net, (x, y), tmp_path, fisher="empirical", shard_size=8)
    inf = ad.Influence(store, damping=1e-3, query_rank=2)
    want = inf.scores_from_gradients(inf.query_gradients(net, (xq, yq)))
    monkeypatch.setattr(influence, "QUERY_CHUNK", 3)  # query gradients 3 at a time
    got = inf.scores(net, (xq, yq), cache=True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14 * float(want.abs().max()))
    cached = [r for r in store.manifest["files"] if r.startswith("scores/")]
    assert len(cached) == 3  # one block per training shard
    assert torch.equal(inf.scores(net, (xq, yq), cache=True), got)  # read back from the cache


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "2"])
def test_low_rank_query_typed_error(setup, bad):
    store = setup[-1]
    with pytest.raises(InputError, match="query_rank"):
        ad.Influence(store, query_rank=bad)


def _fit_files(store: ad.FeatureStore) -> dict[str, bytes]:
    man = json.loads((store.path / "manifest.json").read_text())
    return {
        rel: store.read_file(rel) or b""
        for rel in sorted(man["files"])
        if rel.startswith("factors/") and rel.endswith(".npy")
    }


def test_resume_after_interruption_gives_identical_factors_and_scores(tmp_path):
    net = make_mlp(2)
    x = torch.randn(40, D_IN, dtype=torch.float64)
    y = torch.randint(0, C, (40,))
    calls = {"n": 0, "limit": 10**9}

    def fetch(a: int, b: int):
        calls["n"] += 1
        if calls["n"] > calls["limit"]:
            raise KeyboardInterrupt  # the process "dies" here
        return x[a:b], y[a:b]

    data = ad.Examples(fetch=fetch, n=40)
    full = ad.fit_factors(net, data, tmp_path / "full", shard_size=8, batch_size=3)
    want = ad.Influence(full).scores(net, (x[:3], y[:3]))
    kills = 0
    for _ in range(60):  # every run dies after 7 batches: through gradients, covariances, lambdas
        calls.update(n=0, limit=7)
        try:
            cut = ad.fit_factors(net, data, tmp_path / "cut", shard_size=8, batch_size=3)
            break
        except KeyboardInterrupt:
            kills += 1
    assert kills >= 5
    assert _fit_files(cut) == _fit_files(full)  # true-Fisher sampling replays exactly
    assert torch.equal(ad.Influence(cut).scores(net, (x[:3], y[:3])), want)


def test_scoring_resumes_from_cached_blocks(setup, monkeypatch):
    net, _, _, xq, yq, store = setup
    inf = ad.Influence(store, damping=1e-3)
    want = inf.scores(net, (xq, yq))
    real = ad.FeatureStore._read_npy
    seen = {"n": 0}

    def dying(self, rel, shape=None):
        if rel.startswith("shards/") and not rel.endswith(".q.npy"):
            seen["n"] += 1
            if seen["n"] == 3:
                raise KeyboardInterrupt
        return real(self, rel, shape)

    monkeypatch.setattr(ad.FeatureStore, "_read_npy", dying)
    with pytest.raises(KeyboardInterrupt):
        inf.scores(net, (xq, yq), cache=True)
    monkeypatch.setattr(ad.FeatureStore, "_read_npy", real)
    cached = [r for r in store.manifest["files"] if r.startswith("scores/")]
    assert len(cached) == 2  # two blocks were done before the "kill"
    assert torch.equal(ad.Influence(store, damping=1e-3).scores(net, (xq, yq), cache=True), want)


def test_true_fisher_is_seeded(tmp_path):
    net = make_mlp(3)
    x, y = torch.randn(20, D_IN, dtype=torch.float64), torch.randint(0, C, (20,))
    s = [ad.fit_factors(net, (x, y), tmp_path / f"s{i}", seed=sd) for i, sd in enumerate((0, 0, 1))]
    cov = [covariances_of(st, ad.Influence(st).blocks, ad.Influence(st).root) for st in s]
    assert np.array_equal(cov[0][1][1], cov[1][1][1])
    assert not np.allclose(cov[0][1][1], cov[2][1][1])  # S depends on the sampled labels
    np.testing.assert_array_equal(cov[0][0][0], cov[2][0][0])  # A does not


def test_kfac_fit_is_reused_for_ekfac(tmp_path):
    net = make_mlp(4)
    x, y = torch.randn(12, D_IN, dtype=torch.float64), torch.randint(0, C, (12,))
    st = ad.fit_factors(net, (x, y), tmp_path, strategy="kfac")
    ad.Influence(st, "kfac")
    with pytest.raises(InputError, match="K-FAC factors only"):
        ad.Influence(st, "ekfac")
    ad.fit_factors(net, (x, y), tmp_path, strategy="ekfac")
    assert [f["strategy"] for f in ad.Influence(st, "ekfac").fits()] == ["ekfac"]


def test_typed_errors(setup, tmp_path):
    net, x, y, xq, yq, store = setup
    with pytest.raises(InputError, match="strategy"):
        ad.fit_factors(net, (x, y), tmp_path / "a", strategy="lissa")
    with pytest.raises(InputError, match="fisher"):
        ad.fit_factors(net, (x, y), tmp_path / "b", fisher="sampled")
    with pytest.raises(InputError, match="nn.Linear"):
        ad.fit_factors(net, (x, y), tmp_path / "c", modules=["nope"])
    with pytest.raises(InputError, match="damping"):
        ad.Influence(store, damping=-1.0)
    with pytest.raises(InputError, match="strategy"):
        ad.Influence(store, strategy="diag")
    plain = ad.featurize(net, (x, y), tmp_path / "d", proj_dim=8)
    with pytest.raises(InputError, match="fit_factors"):
        ad.Influence(plain)
    with pytest.raises(InputError, match="shapes"):
        ad.Influence(store).scores(net, (torch.randn(2, 7, dtype=torch.float64), yq[:2]))
    with pytest.raises(StoreMismatchError):
        ad.Influence(store).scores(make_mlp(9), (xq, yq))
    with pytest.raises(InputError, match="gradients of shape"):
        ad.Influence(store).precondition(torch.randn(2, 3))
    bad = x.clone()
    bad[3, 0] = float("nan")
    with pytest.raises((InputError, NonFiniteError)):
        ad.fit_factors(net, (bad, y), tmp_path / "e")


def test_causal_lm_factors_and_attribute(tmp_path):
    lm = al.wrap(*al.testing.tiny_model("llama"))
    docs = ["Paris is a city in France.", "Rome is a city in Italy.", "Oslo is in Norway."]
    data = ad.Examples.from_texts(lm, docs, ids=["d0", "d1", "d2"])
    mods = ad.linear_modules(lm, ["model.layers.1.mlp"])
    store = ad.fit_factors(lm, data, tmp_path, modules=mods, batch_size=2, shard_size=2)
    inf = ad.Influence(store)
    mask = data.batch(0, 3)[1]
    cov = covariances_of(store, inf.blocks, inf.root)
    # activations are averaged over attended tokens: the bias-free A has trace E|a|^2 > 0
    assert all(np.isfinite(a).all() and a.shape[0] == a.shape[1] for a, _ in cov)
    assert int(mask.sum()) > 0
    r = al.attribute(
        lm,
        "The capital of France is",
        target=" Paris",
        units=al.units.TrainingExamples(store),
        method="ekfac",
    )
    assert r.units["id"] == ["d0", "d1", "d2"] and r.scores.shape == (3,)
    assert r.method == "ekfac" and torch.isfinite(r.scores).all()
    k = al.attribute(
        lm,
        "The capital of France is",
        target=" Paris",
        units=al.units.TrainingExamples(store),
        method="kfac",
        damping=1e-3,
    )
    assert k.method == "kfac" and k.params["damping"] == 1e-3
    full = al.attribute(  # query_rank through the façade; 10**6 >= every layer's full rank
        lm,
        "The capital of France is",
        target=" Paris",
        units=al.units.TrainingExamples(store),
        method="kfac",
        damping=1e-3,
        query_rank=10**6,
    )
    assert full.params["query_rank"] == 10**6
    torch.testing.assert_close(full.scores, k.scores, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # Conv1D (weight [in, out]) and nn.Linear
def test_lm_lambda_from_hooks_equals_lambda_from_stored_gradients(tmp_path, family):
    """EK-FAC corrections fitted by the hooks (per-example gradients summed over
    attended tokens) equal those recomputed from the stored per-example gradients
    laid out as module matrices: checks the layout, the masking and the bias column."""
    from attrlab.data.influence import eigen_of

    lm = al.wrap(*al.testing.tiny_model(family))
    docs = ["Paris is a city in France.", "Rome is in Italy.", "Oslo is a cold city in Norway."]
    data = ad.Examples.from_texts(lm, docs)
    mods = ad.linear_modules(lm, ["model.layers.1.mlp", "transformer.h.1"])
    store = ad.fit_factors(lm, data, tmp_path, modules=mods, fisher="empirical", batch_size=2)
    inf = ad.Influence(store, damping=0.0)
    feats = torch.from_numpy(store.features()).double()
    for m, (_, qa, _, qs), (_, _, inv) in zip(
        inf.blocks, eigen_of(store, inf.blocks, inf.root), inf._preconditioner()
    ):
        want = ((qs.T @ m.matrix(feats) @ qa) ** 2).mean(0)
        torch.testing.assert_close(1.0 / inv, want, rtol=1e-4, atol=1e-6 * float(want.max()))
    assert any(m.transposed for m in inf.blocks) == (family == "gpt2")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_token_scores_sum_to_document_scores(tmp_path, family):
    lm = al.wrap(*al.testing.tiny_model(family))
    docs = ["Paris is a city in France.", "Rome is in Italy.", "Oslo is a cold city in Norway."]
    data = ad.Examples.from_texts(lm, docs)
    mods = ad.linear_modules(lm, ["model.layers.1.mlp", "transformer.h.1"])
    store = ad.fit_factors(lm, data, tmp_path, modules=mods, batch_size=2)
    inf = ad.Influence(store, damping=1e-3)
    q = ad.Examples.from_texts(lm, ["The capital of France is", "Rome"], [" Paris", " is"])
    tok = inf.token_scores(lm, q, data)  # [2, 3, T]
    doc = inf.scores(lm, q)
    assert tok.shape == (2, 3, data.batch(0, 1)[0].shape[1])
    torch.testing.assert_close(tok.sum(2), doc, rtol=1e-4, atol=1e-5 * float(doc.abs().max()))
    pad = data.batch(0, 3)[1] == 0
    assert float(tok[:, pad].abs().max()) == 0.0  # padding carries nothing
    with pytest.raises(InputError, match="causal-LM"):
        inf.token_scores(lm, q, ad.Examples((torch.zeros(2, 3),)))


def test_a_layer_no_example_reaches_contributes_nothing(tmp_path):
    """A tracked layer the forward never calls (e.g. a vision tower under text)
    has zero curvature: its block is pseudo-inverted, the scores stay finite and
    equal those without it."""

    class WithIdle(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_mlp(5)
            self.idle = nn.Linear(3, 2).double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    m = WithIdle()
    x, y = torch.randn(16, D_IN, dtype=torch.float64), torch.randint(0, C, (16,))
    both = ad.fit_factors(m, (x, y), tmp_path / "a", fisher="empirical")
    only = ad.fit_factors(m, (x, y), tmp_path / "b", fisher="empirical", modules=["net"])
    for damping in (None, 0.0):
        s = ad.Influence(both, damping=damping).scores(m, (x[:2], y[:2]))
        assert torch.isfinite(s).all()
        if damping is None:  # the heuristic is per layer: the idle one changes nothing
            want = ad.Influence(only, damping=damping).scores(m, (x[:2], y[:2]))
            torch.testing.assert_close(s, want)
