"""Presentation: HTML rendering (escaped), plots and the report.

Results import no view: importing this package registers the HTML and plot
views of :class:`attrlab.Attribution` (``_repr_html_``, ``to_html``, ``plot``)
with :func:`attrlab.result.register_view`; ``import attrlab`` imports it.

Example:
    >>> import torch, attrlab as al
    >>> r = al.Attribution(torch.tensor([1.0]), {"position": [0]}, "tokens", "ig")
    >>> r.to_html().startswith('<div class="al-root">')
    True
"""

from ..result import register_view
from .html import render_attribution
from .plots import plot

register_view("html", render_attribution)
register_view("plot", plot)
