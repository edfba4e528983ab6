"""Every module's docstring examples run, and public entry points have examples."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import attrlab as al


def _modules() -> list[str]:
    """Every module of the package (its docstring examples are its documentation)."""
    names = ["attrlab"]
    for info in pkgutil.walk_packages(al.__path__, "attrlab."):
        names.append(info.name)
    return sorted(names)


@pytest.mark.parametrize("name", _modules())
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
