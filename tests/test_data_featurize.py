"""Featurization, projection, the feature store and the scoring methods, against explicit oracles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import attrlab as al
import attrlab.data as ad
from attrlab.data.digits import DigitsMLP, load_digits_data, train_mlp
from attrlab.errors import InputError, StoreMismatchError


@pytest.fixture(scope="module")
def digits():
    xtr, ytr, xte, yte = load_digits_data()
    xtr, ytr = xtr[:120], ytr[:120]
    model = train_mlp(xtr, ytr, hidden=8, epochs=3, seed=0)
    return model, xtr, ytr, xte[:7], yte[:7]


def explicit_grads(model: nn.Module, x, y, loss: bool) -> torch.Tensor:
    """[n, d] per-example gradients by plain autograd, one example at a time."""
    rows = []
    for i in range(x.shape[0]):
        logits = model(x[i : i + 1])[0]
        if loss:
            val = nn.functional.cross_entropy(logits[None], y[i : i + 1])
        else:
            others = torch.cat([logits[: y[i]], logits[y[i] + 1 :]])
            val = logits[y[i]] - torch.logsumexp(others, 0)
        g = torch.autograd.grad(val, list(model.parameters()))
        rows.append(torch.cat([t.reshape(-1) for t in g]))
    return torch.stack(rows).double()


def test_chunked_projection_equals_full_matrix():
    grads = [torch.randn(5, 7, 3), torch.randn(5, 11)]
    p = ad.Projector(dim=6, seed=3, chunk_rows=4, cache_bytes=0)
    full = p.matrix([21, 11])  # [d, k]
    flat = torch.cat([g.reshape(5, -1) for g in grads], 1)
    torch.testing.assert_close(p.project(grads), flat @ full, rtol=1e-5, atol=1e-5)
    cached = ad.Projector(dim=6, seed=3, chunk_rows=4)
    assert torch.equal(cached.project(grads), p.project(grads))
    assert not torch.equal(
        ad.Projector(dim=6, seed=4, chunk_rows=4).project(grads), p.project(grads)
    )
    # Rademacher entries are +-1/sqrt(k)
    assert torch.allclose(full.abs(), torch.full_like(full, 6**-0.5))


def test_projection_preserves_inner_products():
    g = torch.randn(2, 3000)
    p = ad.Projector(dim=2048, seed=0, kind="gaussian").project([g])
    exact = float(g[0] @ g[1]) / float(g[0].norm() * g[1].norm())
    approx = float(p[0] @ p[1]) / float(p[0].norm() * p[1].norm())
    assert abs(exact - approx) < 0.08


def test_vmap_margin_gradients_equal_autograd(digits):
    model, xtr, ytr, _, _ = digits
    f = ad.GradientFeaturizer(model, ad.ClassificationMargin(), ad.Projector(None), mode="vmap")
    feats, q = f(xtr[:10], ytr[:10])
    torch.testing.assert_close(
        feats.double(), explicit_grads(model, xtr[:10], ytr[:10], loss=False), atol=1e-5, rtol=1e-4
    )
    p = torch.softmax(model(xtr[:10]), -1)[torch.arange(10), ytr[:10]]
    torch.testing.assert_close(q, (1 - p).detach(), atol=1e-6, rtol=1e-5)
    loop = ad.GradientFeaturizer(model, ad.ClassificationMargin(), ad.Projector(None), mode="loop")
    torch.testing.assert_close(loop(xtr[:10], ytr[:10])[0], feats, atol=1e-6, rtol=1e-5)


class _OldStyleTanh(torch.autograd.Function):
    """An autograd.Function without setup_context (as BLOOM's GELU): torch.func cannot run it."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class _Net(nn.Module):
    def __init__(self, old_style: bool):
        super().__init__()
        self.a, self.b, self.old_style = nn.Linear(4, 6), nn.Linear(6, 3), old_style

    def forward(self, x):
        h = self.a(x)
        return self.b(_OldStyleTanh.apply(h) if self.old_style else torch.tanh(h))


def test_auto_mode_falls_back_to_autograd_where_torch_func_cannot_run():
    torch.manual_seed(0)
    old, plain = _Net(True), _Net(False)
    plain.load_state_dict(old.state_dict())
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    ref = ad.GradientFeaturizer(plain, ad.ClassificationMargin(), ad.Projector(None), mode="loop")
    f = ad.GradientFeaturizer(old, ad.ClassificationMargin(), ad.Projector(None))
    feats, q = f(x, y)
    assert f.mode == "autograd"
    ref_feats, ref_q = ref(x, y)
    torch.testing.assert_close(feats, ref_feats, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(q, ref_q)
    with pytest.raises(RuntimeError):  # an explicit torch.func mode does not fall back
        ad.GradientFeaturizer(old, ad.ClassificationMargin(), ad.Projector(None), mode="loop")(x, y)


def test_grad_dot_and_cos_equal_explicit_loss_gradients(digits, tmp_path):
    model, xtr, ytr, xq, yq = digits
    store = ad.featurize(
        model, (xtr, ytr), tmp_path / "s", proj_dim=None, shard_size=32, batch_size=16
    )
    gt = explicit_grads(model, xtr, ytr, loss=True)
    gq = explicit_grads(model, xq, yq, loss=True)
    dot = ad.grad_similarity(store, model, (xq, yq), kind="dot")
    np.testing.assert_allclose(dot.to_numpy(), (gq @ gt.T).numpy(), rtol=1e-3, atol=1e-5)
    cos = ad.grad_similarity(store, model, (xq, yq), kind="cos")
    want = (gq / gq.norm(dim=1, keepdim=True)) @ (gt / gt.norm(dim=1, keepdim=True)).T
    np.testing.assert_allclose(cos.to_numpy(), want.numpy(), rtol=1e-3, atol=1e-5)
    tr = ad.tracin([store, store], [model, model], (xq, yq), lrs=[0.5, 0.25])
    np.testing.assert_allclose(tr.to_numpy(), 0.75 * (gq @ gt.T).numpy(), rtol=1e-3, atol=1e-5)
    assert dot.unit_kind == "train" and dot.units["id"][:2] == [0, 1]


def test_trak_identity_projection_equals_numpy(digits, tmp_path):
    model, xtr, ytr, xq, yq = digits
    model2 = train_mlp(xtr, ytr, hidden=8, epochs=3, seed=1)
    lam = 0.1
    want = 0.0
    qs = []
    for m in (model, model2):
        phi = explicit_grads(m, xtr, ytr, loss=False).numpy()
        phq = explicit_grads(m, xq, yq, loss=False).numpy()
        p = torch.softmax(m(xtr), -1)[torch.arange(len(ytr)), ytr].detach().double().numpy()
        qs.append(1 - p)
        want = want + phq @ np.linalg.solve(phi.T @ phi + lam * np.eye(phi.shape[1]), phi.T)
    want = want / 2 * np.mean(qs, 0)[None]
    stores = [
        ad.featurize(m, (xtr, ytr), tmp_path / f"s{i}", proj_dim=None, shard_size=50)
        for i, m in enumerate((model, model2))
    ]
    r = ad.TRAK(stores, lambda_=lam).attribute([model, model2], (xq, yq))
    np.testing.assert_allclose(r.to_numpy(), want, rtol=2e-3, atol=2e-4 * np.abs(want).max())
    top = r.top(3, by="pos", row=0)
    assert list(top["index"]) == list(np.argsort(-want[0], kind="stable")[:3])


def test_trak_projected_close_to_unprojected(digits, tmp_path):
    model, xtr, ytr, xq, yq = digits
    exact = ad.TRAK(
        ad.featurize(model, (xtr, ytr), tmp_path / "e", proj_dim=None), reg=1e-3
    ).scores(model, (xq, yq))
    proj = ad.TRAK(ad.featurize(model, (xtr, ytr), tmp_path / "p", proj_dim=512), reg=1e-3).scores(
        model, (xq, yq)
    )
    corr = np.corrcoef(exact.numpy().ravel(), proj.numpy().ravel())[0, 1]
    assert corr > 0.5


def test_resume_after_lost_shards_is_exact(digits, tmp_path):
    model, xtr, ytr, _, _ = digits
    ref = ad.featurize(
        model, (xtr, ytr), tmp_path / "ref", proj_dim=32, shard_size=20, batch_size=8
    )
    part = ad.featurize(
        model, (xtr, ytr), tmp_path / "part", proj_dim=32, shard_size=20, batch_size=8
    )
    for a, b in part.done_ranges()[1::2]:  # lose every other shard, plus a stray temp file
        part.shard_path(a, b).unlink()
    (part.path / "shards" / ".junk.tmp").write_bytes(b"partial")
    assert not ad.FeatureStore.open(part.path).complete
    with pytest.raises(InputError, match="incomplete"):
        ad.FeatureStore.open(part.path).features()
    again = ad.featurize(
        model, (xtr, ytr), tmp_path / "part", proj_dim=32, shard_size=20, batch_size=8
    )
    assert np.array_equal(again.features(), ref.features())
    assert np.array_equal(again.out_to_loss(), ref.out_to_loss())
    np.testing.assert_allclose(again.gram(), ref.gram())


def test_store_refuses_other_checkpoint_projection_or_data(digits, tmp_path):
    model, xtr, ytr, xq, yq = digits
    store = ad.featurize(model, (xtr, ytr), tmp_path / "s", proj_dim=16)
    other = train_mlp(xtr, ytr, hidden=8, epochs=3, seed=5)
    with pytest.raises(StoreMismatchError, match="checkpoint"):
        ad.featurize(other, (xtr, ytr), tmp_path / "s", proj_dim=16)
    with pytest.raises(StoreMismatchError, match="projection"):
        ad.featurize(model, (xtr, ytr), tmp_path / "s", proj_dim=16, seed=1)
    with pytest.raises(StoreMismatchError, match="dataset"):
        ad.featurize(
            model,
            ad.Examples((xtr, ytr), ids=[f"x{i}" for i in range(len(ytr))]),
            tmp_path / "s",
            proj_dim=16,
        )
    with pytest.raises(StoreMismatchError, match="checkpoint"):
        ad.TRAK(store).scores(other, (xq, yq))
    with pytest.raises(StoreMismatchError):
        ad.FeatureStore.open(store.path, expect={"projection": ad.Projector(32).spec()})


def test_bad_queries_and_datasets(digits, tmp_path):
    model, xtr, ytr, xq, yq = digits
    store = ad.featurize(model, (xtr, ytr), tmp_path / "s", proj_dim=16)
    with pytest.raises(InputError, match="shapes"):
        ad.TRAK(store).scores(model, (xq[:, :63], yq))  # wrong input width
    with pytest.raises(StoreMismatchError):
        ad.TRAK(store).scores(DigitsMLP(8), (xq, yq))  # another model altogether
    with pytest.raises(InputError, match="stable"):
        ad.Examples((xtr[i], ytr[i]) for i in range(3))
    with pytest.raises(InputError, match="unique"):
        ad.Examples((xtr[:3], ytr[:3]), ids=["a", "a", "b"])
    with pytest.raises(InputError, match="generator"):
        ad.Examples((xtr[:3], ytr[:3]), ids=(str(i) for i in range(3)))
    with pytest.raises(InputError, match="lengths"):
        ad.Examples((xtr[:3], ytr[:4]))
    with pytest.raises(InputError, match="dim"):
        ad.TRAK(store).scores_from_features([torch.zeros(2, 5)])
    with pytest.raises(al.errors.FileFormatError):
        ad.FeatureStore.open(tmp_path / "nothing")


def test_ids_and_texts_are_unit_labels(digits, tmp_path):
    model, xtr, ytr, xq, yq = digits
    ids = [f"img-{i}" for i in range(len(ytr))]
    texts = [f"digit {int(c)}" for c in ytr]
    store = ad.featurize(
        model, ad.Examples((xtr, ytr), ids=ids, texts=texts), tmp_path / "s", proj_dim=16
    )
    r = ad.TRAK(store).attribute(model, (xq[:1], yq[:1]))
    assert r.units["id"] == ids and r.units["text"] == texts
    df = r.top(5, by="pos", row=0)
    assert set(df.columns) == {"index", "id", "text", "score"}
    r2 = al.Attribution.load(r.save(tmp_path / "r.attr"))
    assert r2.equals(r)


def test_lm_training_examples_through_attribute(tmp_path):
    lm = al.wrap(*al.testing.tiny_model("gpt2"))
    docs = ["Paris is a city in France.", "Rome is a city in Italy.", "The cat sat on the mat."]
    data = ad.Examples.from_texts(lm, docs, ids=["paris", "rome", "cat"])
    store = ad.featurize(
        lm, data, tmp_path / "lm", proj_dim=None, modules=["lm_head", "transformer.ln_f"],
        output=ad.AnswerLogProb(),
    )  # fmt: skip
    units = al.units.TrainingExamples(store)
    r = al.attribute(
        lm, "The capital of France is", target=" Paris", units=units, method="grad-dot"
    )
    assert (
        r.scores.shape == (3,)
        and r.units["id"] == ["paris", "rome", "cat"]
        and r.units["text"] == docs
    )
    # oracle: explicit autograd of the answer log-prob and of each document's LM loss
    params = [
        p for n, p in lm.model.named_parameters() if n.startswith(("lm_head", "transformer.ln_f"))
    ]

    def g(ids, start):
        logits = lm.model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
        lp = logits.gather(-1, torch.tensor(ids[1:])[:, None])[start - 1 :].sum()
        return torch.cat([t.reshape(-1) for t in torch.autograd.grad(lp, params)])

    prompt = lm._token_rows(["The capital of France is"], None)[0]
    gq = g(prompt + lm.encode(" Paris"), len(prompt))
    want = torch.stack([gq @ g(lm._token_rows([d], None)[0], 1) for d in docs])
    torch.testing.assert_close(r.scores.double(), want.double(), rtol=1e-3, atol=1e-5)
    for m in ("trak", "tracin", "grad-cos"):
        assert al.attribute(lm, "Rome is", target=" a", units=units, method=m).scores.shape == (3,)
    with pytest.raises(InputError, match="target"):
        al.attribute(lm, "Rome is", target=None, units=units, method="trak")
    with pytest.raises(InputError, match="feature stores"):
        al.attribute(lm, "Rome is", target=" a", units="train", method="trak")


def test_manual_rank_split_and_float16_store(digits, tmp_path):
    model, xtr, ytr, _, _ = digits
    ref = ad.featurize(
        model, (xtr, ytr), tmp_path / "ref", proj_dim=16, shard_size=25, batch_size=25
    )
    for rank in (1, 0):  # two independent jobs, then one finalize
        part = ad.featurize(
            model, (xtr, ytr), tmp_path / "split", proj_dim=16, shard_size=25, batch_size=25,
            rank=rank, world_size=2, finalize=False,
        )  # fmt: skip
    assert part.complete and not part.manifest["finalized"]
    part.finalize()
    assert np.array_equal(part.features(), ref.features())
    np.testing.assert_allclose(part.gram(), ref.gram(), rtol=1e-12)
    half = ad.featurize(model, (xtr, ytr), tmp_path / "half", proj_dim=16, dtype="float16")
    np.testing.assert_allclose(
        half.features(), ref.features(), rtol=2e-3, atol=2e-3 * np.abs(ref.features()).max()
    )
    with pytest.raises(InputError, match="rank"):
        ad.featurize(model, (xtr, ytr), tmp_path / "bad", proj_dim=16, rank=2, world_size=2)


def test_lm_answer_margin_gradient_equals_autograd():
    lm = al.wrap(*al.testing.tiny_model("gpt2"))
    data = ad.Examples.from_texts(
        lm, ["The capital of France is", "Rome is"], [" Paris", " a city"]
    )
    f = ad.GradientFeaturizer(
        lm.model, ad.AnswerMargin(), ad.Projector(None), modules=["transformer.h.1.mlp"]
    )
    feats, q = f(*data.batch(0, 2))
    params = [p for n, p in lm.model.named_parameters() if n.startswith("transformer.h.1.mlp")]
    ids, _, ans = data.batch(0, 2)
    for i in range(2):
        n = int(data.batch(i, i + 1)[1].sum())
        logits = lm.model(ids[i : i + 1, :n]).logits[0, :-1]
        tok = ids[i, 1:n]
        correct = logits.gather(-1, tok[:, None])[:, 0]
        others = torch.logsumexp(logits.scatter(-1, tok[:, None], float("-inf")), -1)
        keep = ans[i, 1:n].bool()
        margin = (correct - others)[keep]
        g = torch.autograd.grad(margin.sum(), params)
        torch.testing.assert_close(
            feats[i], torch.cat([t.reshape(-1) for t in g]), rtol=1e-4, atol=1e-5
        )
        torch.testing.assert_close(
            q[i], (1 - torch.sigmoid(margin)).mean().detach(), rtol=1e-4, atol=1e-6
        )
