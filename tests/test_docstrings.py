"""Docstring examples of the foundation run, and public entry points have examples."""

from __future__ import annotations

import doctest
import importlib

import pytest

import attrlab as al

FOUNDATION = [
    "attrlab.errors",
    "attrlab.model.sites",
    "attrlab.model.interventions",
    "attrlab.model.hooks",
    "attrlab.model.wrapper",
    "attrlab.model.loading",
    "attrlab.model.adapters",
    "attrlab.model.adapters.base",
    "attrlab.targets",
    "attrlab.result",
    "attrlab.units.base",
    "attrlab.methods.base",
    "attrlab.attribute",
    "attrlab.viz.html",
]


@pytest.mark.parametrize("name", FOUNDATION)
def test_doctests(name):
    mod = importlib.import_module(name)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} doctest failures in {name}"


def test_public_api_has_examples():
    missing = []
    for name in al.__all__:
        obj = getattr(al, name)
        if callable(obj) and not isinstance(obj, type(al)):
            doc = obj.__doc__ or ""
            if "Example" not in doc and "Example" not in (
                importlib.import_module(obj.__module__).__doc__ or ""
            ):
                missing.append(name)
    assert not missing, f"public entry points without an example: {missing}"
