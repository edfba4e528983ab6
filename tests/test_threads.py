"""Several threads on one model: calls take turns, and a call's hooks never act on
another thread's forward (issue 14, item 9)."""

from __future__ import annotations

import threading

import pytest
import torch

import attrlab as al
from attrlab.model.interventions import Intervention

PROMPT = "When Mary and John went to the store, John gave a drink to"
CF = "When Mary and John went to the store, Mary gave a drink to"


@pytest.fixture(scope="module")
def lm():
    return al.wrap(*al.testing.tiny_model("gpt2"))


def _patch(lm):
    return al.attribute(
        lm, PROMPT, target=(" Mary", " John"), units="heads", method="patch", counterfactual=CF
    ).scores


def _ig(lm):
    return al.attribute(lm, PROMPT, target=" Mary", method="ig", steps=8).scores


def _in_threads(jobs, n=5):
    """Run each job ``n`` times in its own thread; return (results per job, errors)."""
    out: list[list[torch.Tensor]] = [[] for _ in jobs]
    errors: list[BaseException] = []
    start = threading.Barrier(len(jobs))

    def loop(k):
        start.wait()
        for _ in range(n):
            try:
                out[k].append(jobs[k]())
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

    threads = [threading.Thread(target=loop, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    return out, errors


def test_patch_and_ig_in_two_threads_equal_single_threaded_runs(lm):
    """The issue's reproducer: head patching in one thread, IG over tokens in another,
    five times each; every result is bit-for-bit the single-threaded one."""
    ref_patch, ref_ig = _patch(lm), _ig(lm)
    (patches, igs), errors = _in_threads([lambda: _patch(lm), lambda: _ig(lm)])
    assert errors == []
    assert len(patches) == len(igs) == 5
    for s in patches:
        assert torch.equal(s, ref_patch)
    for s in igs:
        assert torch.equal(s, ref_ig)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in lm.model.modules())


def test_two_wrappers_of_one_model_share_the_lock(lm):
    """Two wrappers of one Hugging Face model take turns too (the lock is keyed on
    the nn.Module); logit lens and evaluation calls are among them."""
    from attrlab.model.lock import lock_of, model_lock

    other = al.wrap(lm.model, lm.tokenizer)
    assert other.lock is lm.lock is model_lock(lm.model) is lock_of(lm)
    ref_lens = al.logit_lens(lm, PROMPT, target=" Mary").scores
    ref_patch = _patch(lm)
    (lens, patches), errors = _in_threads(
        [lambda: al.logit_lens(other, PROMPT, target=" Mary").scores, lambda: _patch(lm)], n=3
    )
    assert errors == []
    assert all(torch.equal(s, ref_lens) for s in lens)
    assert all(torch.equal(s, ref_patch) for s in patches)


def _blocking_run(lm, inside: threading.Event, release: threading.Event, calls: list):
    """A run whose intervention (zeroing every head of layer 0) waits inside the hook."""
    owner = threading.get_ident()

    def value(x: torch.Tensor) -> torch.Tensor:
        calls.append(threading.get_ident())
        if threading.get_ident() == owner:
            inside.set()
            release.wait(timeout=2.0)
        return torch.zeros_like(x)

    return lm.run(PROMPT, interventions=[Intervention("blocks.0.attn.z", value)])


@pytest.mark.parametrize("how", ["lm.run", "raw forward"])
def test_hooks_of_one_call_never_act_on_another_threads_forward(lm, how):
    """While one thread's run sits inside its intervention hook, a forward of the
    same model from another thread (attrlab's ``lm.run``, or the Hugging Face
    model called directly) is the clean forward: the hook never runs for it."""
    batch = lm.tokenize(PROMPT)
    with torch.no_grad():
        clean = lm.model(input_ids=batch.input_ids).logits
    inside, release = threading.Event(), threading.Event()
    calls: list[int] = []
    got: dict[str, torch.Tensor] = {}

    def other() -> None:
        if how == "lm.run":
            got["logits"] = lm.run(PROMPT)[0]
        else:
            with torch.no_grad():
                got["logits"] = lm.model(input_ids=batch.input_ids).logits
        release.set()

    a = threading.Thread(
        target=lambda: got.__setitem__("a", _blocking_run(lm, inside, release, calls)[0])
    )
    a.start()
    assert inside.wait(timeout=10)
    b = threading.Thread(target=other)
    b.start()
    b.join(timeout=0.5)
    release.set()  # lm.run in b waits for a's call to end
    a.join(timeout=30)
    b.join(timeout=30)
    assert not a.is_alive() and not b.is_alive()
    assert set(calls) == {a.ident}  # the intervention ran only in its own thread
    torch.testing.assert_close(got["logits"], clean, atol=0, rtol=0)
    assert not torch.equal(got["a"], clean)  # the intervention did act on its own run


def test_holds_model_lock_finds_the_model_argument():
    """The decorator locks the model named ``lm`` (by keyword or position) and runs
    unlocked when there is no model."""
    from attrlab.model.lock import holds_model_lock, model_lock

    m = torch.nn.Linear(2, 2)
    seen = []

    @holds_model_lock
    def f(x, lm=None):
        seen.append(model_lock(m)._is_owned())  # type: ignore[attr-defined]

    f(1, lm=m)
    f(1, m)
    f(1)
    assert seen == [True, True, False]
