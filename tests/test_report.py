"""The HTML report and the notebook view: panels per unit kind, escaping of
every string (checked by parsing and in headless Chromium), the SVG sanitizer,
and plots."""

from __future__ import annotations

import html.parser
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from attrlab.report import Report, build_report
from attrlab.result import Attribution
from attrlab.viz.html import edge_list, esc, render_attribution, render_circuit, sanitize_svg

PAYLOADS = [
    "<script>document.title='PWNED'</script>",
    '"><img src=x onerror="document.title=\'PWNED\'">',
    "'><svg onload=\"document.title='PWNED'\"></svg>",
    "</textarea></style></title><script>document.body.setAttribute('data-pwned','1')</script>",
    "<iframe srcdoc='<script>parent.document.title=1</script>'></iframe>",
]
X = " ".join(PAYLOADS)

TOKENS = [
    "When",
    " Mary",
    " and",
    " John",
    " went",
    " to",
    " the",
    " store",
    ",",
    " John",
    " gave",
    " a",
    " drink",
    " to",
]


def synthetic_results(payload: str = "") -> list[tuple[str, Attribution]]:
    """One result of every shape the report supports; ``payload`` goes into every string."""
    g = torch.Generator().manual_seed(0)
    p = payload
    toks = [t + p if i == 3 else t for i, t in enumerate(TOKENS)]
    n = len(toks)
    gen = [" Mary", ".", p or " The"]
    s2 = torch.randn(3, n + 3, generator=g)
    for i in range(3):
        s2[i, n + i :] = float("nan")  # a generated token cannot depend on later ones
    heads = Attribution(
        torch.randn(12, generator=g),
        {
            "layer": [l for l in range(3) for _ in range(4)],
            "head": [h for _ in range(3) for h in range(4)],
        },
        "heads",
        "atp*" + p,
        "logit_diff" + p,
        params={"qk_fix": True, "note" + p: p},
        model_id="model" + p,
        diagnostics={"agreement_with_patch": {"pearson": 0.95, "spearman": 0.9}, "bound" + p: p},
    )
    return [
        (
            "tokens",
            Attribution(
                torch.randn(n, generator=g),
                {"position": list(range(n)), "token": toks},
                "tokens",
                "ig",
                "logit(' Mary')" + p,
                params={"steps": 16},
                diagnostics={"completeness_error": 1e-4},
            ),
        ),
        (
            "tokens-2d",
            Attribution(
                s2, {"token": toks + gen}, "tokens", "ig", "continuation" + p, rows={"token": gen}
            ),
        ),
        ("heads", heads),
        (
            "layers",
            Attribution(
                torch.randn(5, generator=g),
                {"component": ["embed", "attn0", "mlp0", "attn1" + p, "mlp1"]},
                "layers",
                "dla",
                "logit_diff",
            ),
        ),
        (
            "resid",
            Attribution(
                torch.randn(2 * 4, generator=g),
                {
                    "layer": [0] * 4 + [1] * 4,
                    "position": list(range(4)) * 2,
                    "token": ["a", "b" + p, "c", "d"] * 2,
                },
                "resid",
                "patch",
                "ld",
            ),
        ),
        (
            "sources",
            Attribution(
                torch.tensor([0.1, 2.5, -0.3]),
                {"source": [0, 1, 2], "text": ["Doc A: Monday.", "Doc B: " + p, "Doc C."]},
                "sources",
                "contextcite",
                "logprob",
                params={"samples": 32},
            ),
        ),
        (
            "train",
            Attribution(
                torch.tensor([3.0, -1.0, 0.5]),
                {"id": [7, 3, 11], "text": ["The capital of Velor is Quam." + p, "x", "y"]},
                "train",
                "trak",
                "loss",
            ),
        ),
        (
            "edges",
            Attribution(
                torch.tensor([2.0, -1.0, 0.5, 0.2]),
                {
                    "src": ["embed", "a0.1" + p, "a0.1", "m0"],
                    "dst": ["a0.1", "logits", "m0", "logits"],
                },
                "edges",
                "eap-ig",
                "ld",
            ),
        ),
    ]


def build_page(payload: str = "", csp: bool = True) -> str:
    rep = Report(
        "attrlab test" + payload, info={"prompt": "When Mary" + payload, "model": "m" + payload}
    )
    for name, r in synthetic_results(payload):
        rep.add(r, title=name + payload, note="note" + payload)
    rep.missing("missing" + payload, "not available" + payload)
    rep.add_table("lens" + payload, {"layer": [0, 1], "top tokens": ["a" + payload, "b"]})
    return rep.to_html(csp=csp)


class _Scan(html.parser.HTMLParser):
    """Collects tags and attributes of a page (what a browser would build)."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []
        self.panels: list[str] = []

    def handle_starttag(self, tag, attrs):  # noqa: ANN001
        self.tags.append(tag)
        self.attrs += attrs
        d = dict(attrs)
        if "data-panel" in d:
            self.panels.append(d["data-panel"] or "")


def scan(page: str) -> _Scan:
    s = _Scan()
    s.feed(page)
    return s


# characters that draw nothing or reorder their neighbours: right-to-left override and
# embedding, isolates, pop, zero-width space / joiner, byte-order mark, a tag letter, ESC
HIDDEN = "\u202e\u202b\u2066\u2069\u202c\u200b\u200d\ufeff\U000e0041\x1b"


# ----------------------------------------------------------------- structure


def test_every_kind_gets_its_view_and_metadata():
    page = build_page()
    s = scan(page)
    assert s.panels == [
        "tokens",
        "tokens",
        "heads",
        "layers",
        "resid",
        "sources",
        "train",
        "edges",
        "table",
    ]
    # heads: a 3 x 4 layer x head grid
    heads_html = render_attribution(synthetic_results()[2][1])
    assert heads_html.count('class="al-cell"') == 12
    assert ">L2<" in heads_html and ">H3<" in heads_html
    # 2-D tokens: 3 generated rows x 17 columns, the future cells hatched
    tok2 = render_attribution(synthetic_results()[1][1])
    assert tok2.count('class="al-cell"') + tok2.count("al-cell al-na") == 3 * 17
    assert tok2.count("al-cell al-na") == 3 + 2 + 1
    # text kinds show their text, edges draw a graph
    assert "Doc B:" in page and "The capital of Velor is Quam." in page
    assert "<svg" in page and "<line" in page
    # method, parameters and diagnostics on every result panel
    assert page.count('class="al-meta"') == 8
    assert "steps=16" in page and "completeness_error=0.0001" in page
    assert "agreement_with_patch.pearson=0.95" in page
    assert "not available" in page
    assert "<script" not in page.lower() and "http://" not in page.replace(
        'xmlns="http://www.w3.org/2000/svg"', ""
    )


def test_scores_reach_the_page():
    r = synthetic_results()[2][1]
    page = render_attribution(r)
    top = r.top(1)
    assert f"{top['score'][0]:.2g}" in page  # the largest head's value is printed in its cell


def test_every_string_is_escaped():
    page = build_page(X, csp=False)
    s = scan(page)
    assert "script" not in s.tags and "img" not in s.tags and "iframe" not in s.tags
    assert not any(k.startswith("on") for k, _ in s.attrs)
    assert s.tags.count("svg") == 1  # only the circuit drawing
    assert "srcdoc" not in [k for k, _ in s.attrs]
    assert esc(PAYLOADS[0]) in page


def test_notebook_repr_uses_the_panel_renderer():
    r = synthetic_results(X)[0][1]
    out = r._repr_html_()
    assert 'data-panel="tokens"' in out and "<style>" in out
    assert "<script" not in out.lower()


def test_edges_from_label_styles():
    a = Attribution(
        torch.tensor([1.0, -2.0]), {"edge": ["a0.1->m1", "m1 -> logits"]}, "edges", "eap"
    )
    assert edge_list(a) == [("a0.1", "m1", 1.0), ("m1", "logits", -2.0)]
    svg = render_circuit(edge_list(a))
    assert svg.count("<rect") == 3 and svg.count("<line") == 2


def test_sanitize_svg_keeps_drawing_drops_active_content():
    svg = (
        '<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
        'width="100" height="50" onload="alert(1)"><script>alert(2)</script>'
        '<a xlink:href="javascript:alert(3)"><text x="1" y="2">in link</text></a>'
        '<g><rect x="1" y="2" width="3" height="4" fill="url(http://evil/x)" stroke="#000"/>'
        '<text x="5" y="6" style="x">L0H1 &lt;b&gt;</text>'
        "<foreignObject><div>html</div></foreignObject>"
        '<use href="#r"/><image href="http://evil/x.png"/></g></svg>'
    )
    out = sanitize_svg(svg)
    s = scan(out)
    assert set(s.tags) == {"svg", "g", "rect", "text"}
    assert not any(k.startswith("on") or "href" in k or k == "style" for k, _ in s.attrs)
    assert "evil" not in out and "alert" not in out and "javascript" not in out
    assert "L0H1 &lt;b&gt;" in out and 'stroke="#000"' in out
    assert "could not be read" in sanitize_svg("<svg><unclosed></svg")


def test_svg_from_a_result_is_sanitized_in_the_report():
    r = Attribution(
        torch.tensor([1.0]),
        {"src": ["a"], "dst": ["b"]},
        "edges",
        "eap",
        meta={"svg": '<svg onload="alert(1)"><script>alert(1)</script><rect width="1"/></svg>'},
    )
    page = Report("t").add(r).to_html()
    assert "alert" not in page and "<rect" in page


def test_build_report_and_report_type_checks():
    r = synthetic_results()[0][1]
    assert build_report([r]).count('class="al-panel"') == 1
    with pytest.raises(TypeError):
        Report().add("not a result")  # type: ignore[arg-type]


def test_plot_common_views():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = dict(synthetic_results())
    ax = res["heads"].plot()
    img = ax.images[0].get_array()
    assert img.shape == (3, 4)  # layer x head heatmap
    assert float(img[1, 2]) == pytest.approx(float(res["heads"].scores[1 * 4 + 2]))
    ax = res["tokens-2d"].plot()
    assert ax.images[0].get_array().shape == (3, 17)
    ax = res["tokens"].plot()
    assert len(ax.patches) == len(TOKENS)  # one bar per token, in text order
    ax = res["sources"].plot(k=2)
    assert len(ax.patches) == 2
    plt.close("all")


# ----------------------------------------------------------------- in the browser


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


needs_chromium = pytest.mark.skipif(
    chromium() is None, reason="Chromium is not installed (apt-get install chromium; .ci/run does)"
)


def browse(page_path: Path) -> tuple[str, list[str]]:
    """Open ``page_path`` in headless Chromium: the DOM after scripts ran, and console lines."""
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [
                chromium(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--enable-logging=stderr",
                "--v=0",
                "--virtual-time-budget=2000",
                "--dump-dom",
                page_path.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=90,
            env={**os.environ, "LANG": "C.UTF-8"},
        )
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return proc.stdout, console


@needs_chromium
def test_browser_check_detects_script_execution(tmp_path):
    """Control: the same payloads, deliberately NOT escaped, do run in this browser check."""
    bad = tmp_path / "bad.html"
    bad.write_text(
        f"<html><head><title>clean</title></head><body>{X}"
        "<script>console.error('control')</script></body></html>"
    )
    dom, console = browse(bad)
    assert "PWNED" in dom or 'data-pwned="1"' in dom
    assert any("control" in c for c in console)


@needs_chromium
def test_report_payloads_do_not_run_in_browser(tmp_path):
    for csp in (False, True):  # escaping alone must suffice; the CSP is a second wall
        path = tmp_path / f"xss_{csp}.html"
        path.write_text(build_page(X, csp=csp), encoding="utf-8")
        dom, console = browse(path)
        assert "<title>attrlab test" in dom
        assert "<title>PWNED" not in dom and "<title>1" not in dom
        assert 'data-pwned="1"' not in dom
        s = scan(dom)
        assert not {"script", "img", "iframe"} & set(s.tags)
        assert not any(k.startswith("on") for k, _ in s.attrs)
        assert s.panels.count("tokens") == 2
        assert console == [], console


@needs_chromium
def test_report_renders_in_browser_with_all_panels(tmp_path):
    path = tmp_path / "report.html"
    path.write_text(build_page(), encoding="utf-8")
    dom, console = browse(path)
    s = scan(dom)
    assert s.panels == [
        "tokens",
        "tokens",
        "heads",
        "layers",
        "resid",
        "sources",
        "train",
        "edges",
        "table",
    ]
    assert console == [], console


def test_logit_lens_panel_same_from_file(tmp_path):
    import re

    import attrlab as al

    lm = al.wrap(*al.testing.tiny_model("gpt2"))
    r = al.logit_lens(lm, "When Mary and John went", target=" Mary")
    r2 = al.Attribution.load(r.save(tmp_path / "lens.attr"))

    def strip(h: str) -> str:
        return re.sub(r'<dl class="al-meta">.*?</dl>', "", h)

    a = render_attribution(r)
    assert strip(a) == strip(render_attribution(r2))
    assert "<th>rank</th>" in a and "top tokens (prob)" in a
    ranks = r.extra["rank"].flatten().tolist()
    assert all(f'<td class="al-num">{int(x)}</td>' in a for x in ranks)


def test_per_position_grids():
    # heads x positions: one row per head, one column per position
    n_l, n_h, n_p = 2, 3, 4
    units = {
        "layer": [l for l in range(n_l) for _ in range(n_h) for _ in range(n_p)],
        "head": [h for _ in range(n_l) for h in range(n_h) for _ in range(n_p)],
        "position": [p for _ in range(n_l * n_h) for p in range(n_p)],
    }
    scores = torch.arange(n_l * n_h * n_p, dtype=torch.float32)
    out = render_attribution(Attribution(scores, units, "heads", "patch"))
    assert out.count('class="al-cell"') == n_l * n_h * n_p
    assert ">L1H2<" in out and 'title="L1H2 / 3: 23"' in out  # last head, last position
    # two sites per layer x position: two grids, not one sum
    units = {
        "layer": [0, 0, 1, 1] * 2,
        "position": [0, 1, 0, 1] * 2,
        "site": ["attn.out"] * 4 + ["mlp.out"] * 4,
    }
    out = render_attribution(Attribution(torch.arange(8.0), units, "attn", "atp"))
    assert out.count('<table class="al-hm">') == 2 and 'title="L1 / 1: 7"' in out


def test_plot_logit_lens():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import attrlab as al

    lm = al.wrap(*al.testing.tiny_model("gpt2"))
    r = al.logit_lens(lm, "When Mary and John went", target=" Mary")
    line = r.plot().lines[0]
    assert list(line.get_ydata()) == pytest.approx(r.scores.tolist())
    plt.close("all")


def test_saved_circuit_draws_only_its_edges():
    edges = {
        "upstream": ["embed", "embed", "a0.h0", "a0.h1"],
        "downstream": ["a0.h0", "a0.h1", "logits", "logits"],
    }
    r = Attribution(
        torch.tensor([3.0, 1.0, 2.0, 0.5]),
        edges,
        "edges",
        "circuit",
        extra={"mask": torch.tensor([1, 0, 1, 0], dtype=torch.uint8)},
    )
    out = render_attribution(r)
    svg = out[out.index("<svg") : out.index("</svg>")]
    assert svg.count("<line") == 2 and "a0.h1" not in svg
    assert "circuit: 2 of 4 edges" in out


@pytest.mark.parametrize(
    "name",
    [
        "attrlab.viz.html",
        "attrlab.viz.summary",
        "attrlab.report",
        "attrlab.cli",
        "attrlab.app",
        "attrlab.app.demo",
        "attrlab.viz.plots",
    ],
)
def test_doctests(name):
    import doctest
    import importlib

    res = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert res.failed == 0


def test_bidi_and_invisible_characters_are_shown_not_obeyed(tmp_path):
    """A token with U+202E would visually reverse the rest of the heatmap / prompt line,
    and zero-width characters hide: every string shows them escaped, and each token is
    its own bidirectional island."""
    payload = "exe." + HIDDEN + "txt"
    page = build_page(payload)
    for c in HIDDEN:
        assert c not in page, f"raw U+{ord(c):04X} in the page"
    shown = "exe.\\u202e\\u202b\\u2066\\u2069\\u202c\\u200b\\u200d\\ufeff\\U000e0041\\x1btxt"
    assert shown in page and page.count(shown) >= 10  # tokens, labels, prompt, titles ...
    assert "unicode-bidi:isolate" in page
    # the token heatmap: every token its own <bdi>, the hostile one escaped inside it
    tokens_html = render_attribution(synthetic_results(payload)[0][1])
    assert tokens_html.count('<bdi class="al-tok"') == len(TOKENS)
    assert f">{esc(' John')}{shown}</bdi>" in tokens_html
    # the prompt line and table cells are isolated too
    assert f"<dd><bdi>When Mary{shown}</bdi></dd>" in page
    assert f'<td class="al-long"><bdi>a{shown}</bdi></td>' in page
    # a saved result shown by the CLI: the page and the terminal table
    from attrlab.cli import main, summary_lines

    r = synthetic_results(payload)[0][1]
    f = r.save(tmp_path / "bidi.attr")
    assert main(["show", str(f), "--html", str(tmp_path / "b.html"), "-q"]) == 0
    saved = (tmp_path / "b.html").read_text()
    assert shown in saved and not any(c in saved for c in HIDDEN)
    table = "\n".join(summary_lines(r, 20))
    assert not any(c in table for c in HIDDEN) and "\\u202e" in table


def test_demo_agreement_aligns_units_by_label():
    """The demo's "agreement with exact patching" is al.evaluate.agreement: two
    results over the same heads in different orders compare unit by unit (a
    positional comparison of the score vectors would not give 1)."""
    from attrlab.app.demo import _agreement

    layer, head = [0, 0, 1, 1, 2], [0, 1, 0, 1, 0]
    exact = Attribution(
        torch.tensor([3.0, 1.0, -2.0, 0.5, -0.1]), {"layer": layer, "head": head}, "heads", "patch"
    )
    perm = [2, 0, 4, 3, 1]
    r = Attribution(
        2 * exact.scores[perm],
        {"layer": [layer[i] for i in perm], "head": [head[i] for i in perm]},
        "heads",
        "atp",
    )
    assert _agreement(r, exact, k=2) == {"pearson": 1.0, "spearman": 1.0, "top2_recall": 1.0}
    other = Attribution(torch.zeros(5), {"layer": layer, "neuron": head}, "neurons", "dla")
    assert "unavailable" in _agreement(other, exact)
