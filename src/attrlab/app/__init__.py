"""Applications on top of the library: they run attributions and evaluations and
hand the results to the views (``attrlab demo`` is :mod:`attrlab.app.demo`).

Example:
    >>> from attrlab.app.demo import SECTIONS
    >>> "heads" in SECTIONS
    True
"""
