"""Attribution methods, by family. Importing this package registers them all.

Example:
    >>> import attrlab as al
    >>> isinstance(al.methods.all_methods(), dict)
    True
"""

from .base import Method, all_methods, find_method, methods_for, register

__all__ = ["Method", "register", "find_method", "methods_for", "all_methods"]
