"""Evaluation shared by every unit kind: LDS, deletion/insertion curves,
comprehensiveness/sufficiency, agreement with exact patching, circuits,
randomization sanity checks. Every module in this folder is imported and its
``__all__`` re-exported here (``al.evaluate.lds`` …).

Example:
    >>> import attrlab as al
    >>> hasattr(al, "evaluate")
    True
"""

import importlib
import pkgutil

__all__: list[str] = []
for _m in pkgutil.iter_modules(__path__):
    _mod = importlib.import_module(f"{__name__}.{_m.name}")
    for _name in getattr(_mod, "__all__", []):
        globals()[_name] = getattr(_mod, _name)
        __all__.append(_name)
