"""The tuned lens (al.lenses): training beats the logit lens, save/load,
resumable checkpoints, the tuned-lens package's state layout, logit_lens(lens=)."""

from __future__ import annotations

import pytest
import torch

import attrlab as al
from attrlab.errors import FileFormatError, InputError
from attrlab.lenses import TunedLens, lens_kl, train_tuned_lens
from attrlab.testing import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ioi():
    lm = al.zoo.load("ioi")
    lens = train_tuned_lens(lm, steps=60, progress=False)
    held = [e.prompt + e.answer for e in al.zoo.task("ioi").examples(64, seed=5)]
    return lm, lens, held


def test_tuned_lens_beats_the_logit_lens_at_every_layer(ioi):
    lm, lens, held = ioi
    logit, tuned = lens_kl(lm, held), lens_kl(lm, held, lens)
    assert logit.shape == tuned.shape == (lm.cfg.n_layers,)
    assert bool((tuned < logit).all()), (logit, tuned)


def test_logit_lens_reads_through_the_tuned_lens(ioi):
    lm, lens, _ = ioi
    prompt = "When Irene and Rose ran to the beach, Rose gave a letter to"
    plain = al.logit_lens(lm, prompt, target=" Irene")
    tuned = al.logit_lens(lm, prompt, target=" Irene", lens=lens)
    assert type(tuned) is type(plain) and tuned.method == "tuned_lens"
    # the last row is the model's own output, lens or not
    assert torch.allclose(tuned.scores[-1], plain.scores[-1])
    assert float(tuned.extra["kl_to_final"][-1]) < 1e-6
    assert not torch.allclose(tuned.scores[:-1], plain.scores[:-1])
    # the zero lens is the logit lens
    zero = TunedLens.identity(lm.cfg.n_layers, lm.cfg.d_model)
    assert torch.allclose(
        al.logit_lens(lm, prompt, target=" Irene", lens=zero).scores, plain.scores
    )
    # layer l of the tuned lens: the translated resid_pre read through final norm + unembedding
    _, cache = lm.run(prompt, cache=["blocks.1.resid_pre"])
    h = lens.translate(cache["blocks.1.resid_pre"][0, -1], 1)
    lp = lm.unembed(lm.apply_final_norm(h)).float().log_softmax(-1)
    assert abs(float(lp[lm.token_id(" Irene")]) - float(tuned.scores[1])) < 1e-5


def test_save_load_and_the_tuned_lens_package_layout(ioi, tmp_path):
    lm, lens, _ = ioi
    back = TunedLens.load(lens.save(tmp_path / "lens"))
    assert torch.equal(back.weight, lens.weight) and torch.equal(back.bias, lens.bias)
    assert back.meta["steps"] == 60
    state = lens.to_tuned_lens_state()
    assert set(state) == {f"{i}.{k}" for i in range(lm.cfg.n_layers) for k in ("weight", "bias")}
    again = TunedLens.from_tuned_lens_state(state)
    assert torch.equal(again.weight, lens.weight)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileFormatError):
        TunedLens.load(tmp_path / "empty")
    m, t = tiny_model("gpt2")
    with pytest.raises(InputError, match="layers"):
        al.logit_lens(al.wrap(m, t), "a b", lens=TunedLens.identity(5, 8))


def test_checkpoints_resume_to_the_same_lens(tmp_path):
    m, t = tiny_model("llama")
    lm = al.wrap(m, t)
    texts = ["a b c d e f", "b c d e f g", "c d e f", "d e f g h i j"]
    full = train_tuned_lens(lm, texts, steps=8, batch_size=2, progress=False, lr=1e-2)
    ck = tmp_path / "ck"
    train_tuned_lens(lm, texts, steps=4, batch_size=2, progress=False, lr=1e-2, checkpoint=ck,
                     checkpoint_every=2)  # fmt: skip
    # a second run with the same directory and the full length resumes at step 4
    resumed = train_tuned_lens(lm, texts, steps=8, batch_size=2, progress=False, lr=1e-2,
                               checkpoint=ck, checkpoint_every=2)  # fmt: skip
    assert torch.allclose(resumed.weight, full.weight, atol=1e-6)
    assert torch.allclose(resumed.bias, full.bias, atol=1e-6)


def test_training_input_errors():
    m, t = tiny_model("gpt2")
    lm = al.wrap(m, t)
    with pytest.raises(InputError, match="texts="):
        train_tuned_lens(lm, progress=False)
    with pytest.raises(InputError, match="steps"):
        train_tuned_lens(lm, ["a b c"], steps=0, progress=False)
    with pytest.raises(InputError, match="2 tokens"):
        train_tuned_lens(lm, ["a"], steps=1, progress=False)
