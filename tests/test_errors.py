"""Every bad input at the API boundary raises its typed, actionable error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attrlab as al
from attrlab import Intervention
from attrlab.errors import (
    AttrlabError,
    ContextTooLongError,
    CounterfactualLengthError,
    EmptyPromptError,
    IndexRangeError,
    SiteNotExposedError,
    TokenOutOfVocabError,
    UnknownMethodError,
    UnknownSiteError,
    UnknownUnitsError,
    UnsupportedArchitectureError,
)


@pytest.fixture(scope="module")
def lm():
    return al.wrap(*al.testing.tiny_model("gpt2"))


def test_unknown_site(lm):
    with pytest.raises(UnknownSiteError, match="blocks"):
        lm.run("a b", cache=["blocks.0.attn.zz"])
    with pytest.raises(UnknownSiteError):
        lm.run("a b", cache=["nonsense"])


def test_layer_and_head_out_of_range(lm):
    with pytest.raises(IndexRangeError, match="layers"):
        lm.run("a b", cache=["blocks.7.attn.z"])
    with pytest.raises(IndexRangeError, match="head"):
        lm.run("a b", interventions=[Intervention("blocks.0.attn.z", 0.0, heads=[9])])
    with pytest.raises(IndexRangeError):
        lm.run("a b", start_layer=5, start_resid=torch.zeros(1, 2, lm.cfg.d_model))
    with pytest.raises(IndexRangeError):
        al.units.Heads(layers=[3]).layer_list(lm.cfg.n_layers)
    assert lm.site("blocks.-1.mlp.out").layer == lm.cfg.n_layers - 1


def test_read_only_site(lm):
    with pytest.raises(SiteNotExposedError, match="read"):
        lm.run("a b", interventions=[Intervention("final_norm.scale", 1.0)])


def test_empty_prompt(lm):
    with pytest.raises(EmptyPromptError):
        lm.run("")
    with pytest.raises(EmptyPromptError):
        lm.run(["a b", ""])
    with pytest.raises(EmptyPromptError):
        lm.run([])
    with pytest.raises(EmptyPromptError):
        al.attribute(lm, "", target=" a", units="heads", method="anything")


def test_token_ids_out_of_vocab(lm):
    with pytest.raises(TokenOutOfVocabError, match="vocabulary"):
        lm.run(torch.tensor([[1, 2, 10**6]]))
    with pytest.raises(TokenOutOfVocabError):
        lm.run(torch.tensor([[-1, 2]]))


def test_context_too_long(lm):
    with pytest.raises(ContextTooLongError, match="128"):
        lm.run(torch.ones(1, 200, dtype=torch.long))


def test_counterfactual_length_shows_both_tokenizations(lm):
    a = lm.tokenize("When Mary and John went")
    b = lm.tokenize("When Mary and Johnathan Smith went")
    with pytest.raises(CounterfactualLengthError) as e:
        lm.check_counterfactual(a, b)
    msg = str(e.value)
    assert "prompt 0" in msg and "counterfactual 0" in msg and "' Mary'" in msg
    lm.check_counterfactual(a, lm.tokenize("When John and Mary went"))  # same length: fine


def test_unsupported_architecture():
    class Toy(nn.Module):
        config = type("C", (), {"model_type": "toy"})()

    with pytest.raises(UnsupportedArchitectureError, match="Supported: .*gpt2.*docs/adapters.md"):
        al.wrap(Toy())


def test_unknown_method_and_units(lm):
    with pytest.raises(UnknownMethodError, match="unknown method"):
        al.attribute(lm, "a b", target=" a", units="heads", method="no-such-method")
    with pytest.raises(UnknownUnitsError, match="unknown units"):
        al.attribute(lm, "a b", target=" a", units="galaxies", method="dla")
    with pytest.raises(al.errors.InputError):
        al.attribute("not a model", "a b")


def test_each_method_has_one_name_and_spelled_out_names_get_a_hint(lm):
    from attrlab.methods.base import _REGISTRY

    # one canonical name per method class and unit kind: no aliases
    for cls in set(_REGISTRY.values()):
        names = {n for (n, _), c in _REGISTRY.items() if c is cls}
        assert names == {cls.name}, (cls, names)
        assert cls.name == cls.name.lower() and "_" not in cls.name
    for typed, canonical in [
        ("integrated_gradients", "ig"),
        ("loo", "occlusion"),
        ("input_x_gradient", "input-x-gradient"),
    ]:
        with pytest.raises(UnknownMethodError, match=f"Did you mean '{canonical}'"):
            al.attribute(lm, "a b", target=" a", method=typed)


def test_errors_are_catchable_as_base_and_builtin():
    assert issubclass(UnknownSiteError, AttrlabError) and issubclass(UnknownSiteError, KeyError)
    assert issubclass(IndexRangeError, IndexError)
    assert issubclass(EmptyPromptError, ValueError)
    assert str(UnknownSiteError("msg")) == "msg"


def test_load_missing_path():
    with pytest.raises(al.errors.InputError, match="does not exist"):
        al.load("./no/such/model/dir")
