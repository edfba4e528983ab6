"""Per-layer transcoder sets: al.dictionaries.train_transcoders, the ``attrlab
transcoders`` command, and the transcoders bundled with the zoo models."""

from __future__ import annotations

import json

import pytest
import torch

import attrlab as al
from attrlab.cli import main
from attrlab.dictionaries.bundled import TRANSCODERS_DIR
from attrlab.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread")

TASKS = ["ioi", "induction", "facts", "context_qa"]


# ------------------------------------------------------------------ bundled sets
@pytest.mark.parametrize("task", TASKS)
def test_bundled_transcoders_load_cover_every_layer_and_reach_their_fve(task):
    lm = al.zoo.load(task)
    tcs = al.dictionaries.zoo_transcoders(task)
    L = lm.cfg.n_layers
    assert [(d.in_site, d.out_site) for d in tcs] == [
        (f"blocks.{la}.mlp.in", f"blocks.{la}.mlp.out") for la in range(L)
    ]
    for d in tcs:
        for t in (d.W_enc, d.b_enc, d.W_dec, d.b_dec, d.threshold):
            assert t is not None and t.dtype == torch.float32
        assert d.d_in == d.d_out == lm.cfg.d_model and d.activation == "jumprelu"
    stated = al.dictionaries.zoo_transcoders_summary(task)
    assert stated["dtype"] == "float16" and [r["layer"] for r in stated["layers"]] == list(range(L))
    # other held-out texts than the summary's (seed 1): the stated FVE carries over
    texts = al.dictionaries.heldout_texts(task, 96, seed=7)
    for d, row in zip(tcs, stated["layers"]):
        ev = al.dictionaries.evaluate(lm, d, texts)
        assert ev["fve"] >= 0.9 and ev["fve"] >= row["fve"] - 0.02, (task, d.in_site, ev, row)
        assert ev["l0"] <= 1.5 * row["l0"] + 2 and ev["kl"] <= 3 * row["kl"] + 0.01, (ev, row)


def test_bundled_transcoders_are_small_float16_files():
    total = 0
    for task in TASKS:
        files = list((TRANSCODERS_DIR / task).glob("layer_*/sae_weights.safetensors"))
        assert files, task
        for f in files:
            d = al.dictionaries.load_saelens(f.parent)
            assert d.W_enc.dtype == torch.float16
            total += f.stat().st_size
    assert total < 2_500_000, total  # docs/dictionaries.md states the size


def test_zoo_transcoders_errors():
    with pytest.raises(InputError, match="no zoo task"):
        al.dictionaries.zoo_transcoders("nope")


# ------------------------------------------------------------------ library and command
def test_train_transcoders_is_seeded_and_checks_its_input():
    lm = al.zoo.load("ioi")
    texts = al.dictionaries.heldout_texts("ioi", 16, seed=5)
    kw = dict(kind="topk", width=32, steps=4, k=4, progress=False)
    a = al.dictionaries.train_transcoders(lm, texts, **kw)
    b = al.dictionaries.train_transcoders(lm, texts, **kw)
    assert len(a) == lm.cfg.n_layers
    assert all(torch.equal(x.W_dec, y.W_dec) for x, y in zip(a, b))
    c = al.dictionaries.train_transcoders(lm, texts, **{**kw, "seed": 1})
    assert not torch.equal(a[0].W_dec, c[0].W_dec)
    with pytest.raises(InputError, match="layers"):
        al.dictionaries.train_transcoders(lm, texts, layers=[5], **kw)
    with pytest.raises(InputError, match="unknown option"):
        al.dictionaries.train_transcoders(lm, texts, l2=1.0, **kw)
    with pytest.raises(InputError, match="kind"):
        al.dictionaries.train_transcoders(lm, texts, kind="gelu")


def test_transcoders_command_writes_a_loadable_set_and_summary(tmp_path, capsys):
    out = tmp_path / "tc"
    argv = ["transcoders", "zoo:ioi", "--out", str(out), "--steps", "30", "--width", "64",
            "--kind", "topk", "--k", "4", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["command"].startswith("attrlab transcoders zoo:ioi --width 64 --kind topk")
    assert [r["layer"] for r in summary["layers"]] == [0, 1]
    ds = al.dictionaries.load(out)
    assert [d.out_site for d in ds] == ["blocks.0.mlp.out", "blocks.1.mlp.out"]
    lm = al.zoo.load("ioi")
    texts = al.dictionaries.heldout_texts("ioi")  # the summary's texts: the same numbers
    ev = al.dictionaries.evaluate(lm, ds[1], texts)
    assert abs(ev["fve"] - summary["layers"][1]["fve"]) < 1e-4 and ev["l0"] <= 4


@pytest.mark.parametrize(
    "extra, message",
    [
        (["zoo:nope"], "give one of zoo:ioi"),
        (["gpt2"], "give one of zoo:ioi"),
        (["zoo:ioi", "--k", "4"], "--k is for --kind topk"),
        (["zoo:ioi", "--width", "0"], "positive whole number"),
    ],
)
def test_transcoders_command_bad_input(extra, message, capsys):
    assert main(["transcoders", *extra, "--quiet"]) == 2
    assert message in capsys.readouterr().err


def test_transcoders_command_out_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["transcoders", "zoo:ioi", "--out", str(f), "--quiet"]) == 2
    assert "is a file" in capsys.readouterr().err


# ------------------------------------------------------------------ cross-layer transcoders
def test_clt_decode_is_the_sum_over_earlier_layers():
    from attrlab.dictionaries.clt import CrossLayerTranscoder

    c = CrossLayerTranscoder.random(6, 10, n_layers=3, activation="jumprelu", seed=2)
    c.b_dec = torch.randn(3, 6)
    f = c.encode(torch.randn(4, 3, 6))
    y = c.decode(f)
    for j in range(3):
        hand = c.b_dec[j] + sum(f[:, la] @ c.W_dec[la][:, j - la] for la in range(j + 1))
        assert torch.allclose(y[:, j], hand, atol=1e-6)
    with pytest.raises(InputError, match="W_dec"):
        CrossLayerTranscoder(c.W_enc, c.b_enc, [c.W_dec[0]] * 3, c.b_dec)


def test_clt_of_per_layer_transcoders_evaluates_like_them():
    """A CLT with only same-layer decoders is the per-layer set: evaluate_clt's
    per-layer FVE equals evaluate's."""
    from attrlab.dictionaries.clt import CrossLayerTranscoder, evaluate_clt

    lm = al.zoo.load("ioi")
    tcs = al.dictionaries.zoo_transcoders("ioi")
    L = len(tcs)
    W_dec = []
    for la, d in enumerate(tcs):
        W = torch.zeros(d.width, L - la, d.d_out)
        W[:, 0] = d.W_dec
        W_dec.append(W)
    c = CrossLayerTranscoder(torch.stack([d.W_enc for d in tcs]), torch.stack([d.b_enc for d in tcs]),
                             W_dec, torch.stack([d.b_dec for d in tcs]), activation="jumprelu",
                             threshold=torch.stack([d.threshold for d in tcs]))  # fmt: skip
    texts = al.dictionaries.heldout_texts("ioi", 32, seed=4)
    ev = evaluate_clt(lm, c, texts)
    for la, d in enumerate(tcs):
        one = al.dictionaries.evaluate(lm, d, texts)
        assert (
            abs(ev["fve_per_layer"][la] - one["fve"]) < 1e-5
            and abs(ev["l0"][la] - one["l0"]) < 1e-6
        )


def test_train_a_clt_on_the_zoo_ioi_model():
    from attrlab.dictionaries.clt import evaluate_clt, train_clt

    lm = al.zoo.load("ioi")
    c = train_clt(lm, width=256, steps=300, progress=False)
    ev = evaluate_clt(lm, c, al.dictionaries.heldout_texts("ioi", 64, seed=3))
    # measured: fve 0.991 / 0.987, l0 42 + 23 (300 steps; 1,500 steps at width 512: 25 + 8)
    assert min(ev["fve_per_layer"]) >= 0.9 and ev["l0_total"] <= 80 and ev["kl"] < 0.05, ev
    assert c.threshold is not None and float(c.threshold.min()) > 5e-3  # learned, not left at 1e-3
    assert float(c.W_dec[0][:, 1].norm()) > 0.01 * float(c.W_dec[0][:, 0].norm())  # writes ahead
    with pytest.raises(InputError, match="layers"):
        train_clt(lm, layers=[7], steps=1, progress=False)
