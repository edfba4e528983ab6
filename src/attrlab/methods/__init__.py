"""Attribution methods, by family. Importing this package registers them all:
every module in this folder is imported, and registers its methods with
:func:`attrlab.methods.base.register`.

Example:
    >>> import attrlab as al
    >>> isinstance(al.methods.all_methods(), dict)
    True
"""

import importlib
import pkgutil

from .base import Method, all_methods, find_method, methods_for, register

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["Method", "register", "find_method", "methods_for", "all_methods"]
