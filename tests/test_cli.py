"""The ``attrlab`` command: explain == the Python API, show, demo (+ its report
in Chromium), --help everywhere, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import attrlab as al
from attrlab.cli import main, parse_option
from attrlab.methods.base import _REGISTRY, Method, register
from attrlab.model.wrapper import Batch
from attrlab.viz.demo import available
from test_report import browse, needs_chromium, scan

PROMPT = "When Mary and John went to the store, John gave a drink to"
CF = "When Mary and John went to the store, Mary gave a drink to"


class _Occlusion(Method):
    """Test-only method: replace each token by ``fill`` and measure the target's drop."""

    def __init__(self, fill: int = 0):
        self.fill = fill

    def attribute(self, lm, inputs, target, units, counterfactual=None):  # noqa: ANN001
        b = target.prepare(lm, lm.tokenize(inputs))
        n = b.input_ids.shape[1]
        ids = b.input_ids.repeat(n + 1, 1)
        ids[torch.arange(1, n + 1), torch.arange(n)] = self.fill
        big = Batch(ids, b.attention_mask.repeat(n + 1, 1), b.position_ids.repeat(n + 1, 1))
        with torch.no_grad():
            logits, _ = lm.run(big)
        v = target(logits, big)  # [n + 1] or [n + 1, n_continuation]
        scores = v[0] - v[1:]
        return al.Attribution(
            scores if scores.dim() == 1 else scores.T,
            {"position": list(range(n)), "token": lm.to_str_tokens(b.input_ids[0])},
            "tokens",
            "cli-test-occlusion",
            target.describe(),
            params=self.params(),
            model_id=lm.name,
        )


@pytest.fixture(scope="module")
def occlusion():
    register("cli-test-occlusion", units=("tokens",))(_Occlusion)
    yield "cli-test-occlusion"
    for key in [k for k, v in _REGISTRY.items() if v is _Occlusion]:
        del _REGISTRY[key]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_gpt2")
    hf, tok = al.testing.tiny_model("gpt2")
    hf.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# ------------------------------------------------------------------ explain == Python API

CONTEXT = "Document 1: the meeting is on Monday. Document 2: Paris is a city in France. Question: where is Paris? Answer:"
IOI = {"prompt": PROMPT, "target": (" Mary", " John")}

# (method, units, method options, unit options, prompt/target/counterfactual); real
# methods only when registered in this install, plus a test-only method that always is
CASES = [
    ("cli-test-occlusion", "tokens", {"fill": 3}, {}, IOI),
    ("ig", "tokens", {"steps": 8}, {}, IOI),
    ("occlusion", "tokens", {}, {}, IOI),
    ("dla", "heads", {}, {}, IOI),
    ("dla", "layers", {}, {}, IOI),
    ("patch", "heads", {}, {"layers": [1]}, {**IOI, "counterfactual": CF}),
    ("atp*", "heads", {}, {}, {**IOI, "counterfactual": CF}),
    ("eap", "edges", {}, {}, {**IOI, "counterfactual": CF}),
    (
        "contextcite",
        "sources",
        {"n_ablations": 8, "seed": 1},
        {},
        {"prompt": CONTEXT, "target": " France"},
    ),
    (
        "trak",
        "train",
        {},
        {"store": "{store}"},
        {"prompt": "The capital of France is", "target": " Paris"},
    ),
]
CASES = [c for c in CASES if c[0] == "cli-test-occlusion" or available(c[0], c[1])]


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory, model_dir):
    if not available("trak", "train"):
        return ""
    import attrlab.data as ad

    lm = al.load(model_dir)
    texts = ["The capital of France is Paris.", "Rome is in Italy.", "A cat sat on the mat."]
    d = tmp_path_factory.mktemp("store")
    ad.featurize(lm, ad.Examples.from_texts(lm, texts, ids=[0, 1, 2]), d, proj_dim=16)
    return str(d)


@pytest.mark.parametrize(
    "method,units,opts,uopts,case", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES]
)
def test_explain_equals_python_api(
    capsys, tmp_path, model_dir, store_dir, occlusion, method, units, opts, uopts, case
):
    uopts = {k: (store_dir if v == "{store}" else v) for k, v in uopts.items()}
    out = tmp_path / "r.attr"
    argv = [
        "explain",
        "--model",
        model_dir,
        "--prompt",
        case["prompt"],
        "--units",
        units,
        "--method",
        method,
        "--out",
        str(out),
        "--quiet",
    ]
    t = case["target"]
    argv += ["--contrast", *t] if isinstance(t, tuple) else ["--target", t]
    for k, v in opts.items():
        argv += ["--option", f"{k}={json.dumps(v)}"]
    for k, v in uopts.items():
        argv += ["-u", f"{k}={json.dumps(v)}"]
    if "counterfactual" in case:
        argv += ["--counterfactual", case["counterfactual"]]
    rc, stdout, err = run(capsys, *argv)
    assert rc == 0, err
    cli = al.Attribution.load(out)
    unit_obj = al.units.resolve(units)
    if uopts:
        unit_obj = type(unit_obj)(**uopts)
    api = al.attribute(
        al.load(model_dir),
        case["prompt"],
        target=t,
        units=unit_obj,
        method=method,
        counterfactual=case.get("counterfactual"),
        **opts,
    )
    torch.testing.assert_close(cli.scores, api.scores, rtol=1e-6, atol=1e-7)
    assert cli.units == api.units and cli.target == api.target and cli.method == api.method
    assert method in stdout  # the terminal table


def test_explain_options_targets_and_outputs(capsys, tmp_path, model_dir, occlusion):
    base = ["explain", "--model", model_dir, "--prompt", PROMPT, "--method", occlusion, "-q"]
    rc, out, _ = run(capsys, *base, "--target", " Mary", "--json")
    assert rc == 0
    j = json.loads(out)
    assert j["target"] == "logit(' Mary')" and j["params"] == {"fill": 0}
    api = al.attribute(al.load(model_dir), PROMPT, target=" Mary", method=occlusion)
    assert j["scores"] == pytest.approx(api.scores.tolist(), rel=1e-6, abs=1e-7)
    # an option reaches the method and changes the scores
    rc, out2, _ = run(capsys, *base, "--target", " Mary", "--json", "-o", "fill=5")
    assert json.loads(out2)["params"] == {"fill": 5} and json.loads(out2)["scores"] != j["scores"]
    # continuation target: the log-probability of a given continuation
    html = tmp_path / "r.html"
    rc, out, err = run(capsys, *base, "--continuation", " Mary.", "--html", str(html), "--top", "3")
    assert rc == 0, err
    assert "continuation_logprob" in out and len(out.strip().splitlines()) == 2 + 1 + 3
    assert 'data-panel="tokens"' in html.read_text()


def test_show_prints_and_renders(capsys, tmp_path):
    r = al.Attribution(
        torch.tensor([0.5, -2.0, 1.0]),
        {"layer": [0, 0, 1], "head": [0, 1, 0]},
        "heads",
        "dla",
        "logit(' Mary')",
        params={"x": 1},
        model_id="m",
    )
    f = r.save(tmp_path / "h.attr")
    rc, out, _ = run(capsys, "show", str(f), "--top", "2")
    assert rc == 0
    lines = out.strip().splitlines()
    assert lines[0].startswith("dla over heads (3 units)")
    assert lines[-2].split() == ["0", "1", "-2.0"] and lines[-1].split() == ["1", "0", "1.0"]
    html = tmp_path / "h.html"
    rc, _, _ = run(capsys, "show", str(f), "--html", str(html), "-q")
    assert rc == 0 and html.read_text().count('class="al-cell"') == 3
    rc, out, _ = run(capsys, "show", str(f), "--json")
    assert json.loads(out)["scores"] == [0.5, -2.0, 1.0]


def test_parse_option():
    assert parse_option("steps=16") == ("steps", 16)
    assert parse_option('sources=["a", "b"]') == ("sources", ["a", "b"])
    assert parse_option("n-samples=1.5") == ("n_samples", 1.5)
    assert parse_option("baseline=pad") == ("baseline", "pad")


# ------------------------------------------------------------------ errors


def _one_line_error(rc: int, err: str) -> str:
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("attrlab") and "error" in lines[0] and "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    "argv,expect",
    [
        (["explain", "--model", "/no/such/model", "--prompt", "hi"], "does not exist"),
        (
            ["explain", "--model", "{d}", "--prompt", PROMPT, "--method", "no-such-method"],
            "unknown method",
        ),
        (["explain", "--model", "{d}", "--prompt", PROMPT, "--units", "nope"], "unknown units"),
        (
            [
                "explain",
                "--model",
                "{d}",
                "--prompt",
                PROMPT,
                "--method",
                "cli-test-occlusion",
                "--target",
                " Mary and John",
            ],
            "token",
        ),
        (
            [
                "explain",
                "--model",
                "{d}",
                "--prompt",
                PROMPT,
                "--method",
                "cli-test-occlusion",
                "-o",
                "fill",
            ],
            "KEY=VALUE",
        ),
        (
            [
                "explain",
                "--model",
                "{d}",
                "--prompt",
                PROMPT,
                "--method",
                "cli-test-occlusion",
                "-o",
                "nope=1",
            ],
            "bad options",
        ),
        (["explain", "--model", "{d}", "--prompt", "", "--method", "cli-test-occlusion"], "empty"),
        (
            ["explain", "--model", "{d}", "--prompt", "x", "--target", "a", "--contrast", "a", "b"],
            "not allowed",
        ),
        (["explain", "--prompt", "x"], "--model"),
        (["show", "/no/such.attr"], "no such file"),
        (["show", "{d}/config.json"], "not a readable attrlab file"),
        (["frobnicate"], "invalid choice"),
        (["show", "x.attr", "--top", "many"], "invalid int"),
        (["demo", "--only", "nope"], "unknown demo section"),
    ],
)
def test_bad_input_one_line_exit_2(capsys, model_dir, occlusion, argv, expect):
    rc, _, err = run(capsys, *[a.replace("{d}", model_dir) for a in argv], "--quiet")
    line = _one_line_error(rc, err)
    assert expect.lower() in line.lower(), line


def test_debug_shows_the_traceback(model_dir):
    with pytest.raises(al.errors.UnknownMethodError):
        main(
            [
                "explain",
                "--model",
                model_dir,
                "--prompt",
                PROMPT,
                "--method",
                "nope",
                "--debug",
                "-q",
            ]
        )


def test_help_on_every_command(capsys):
    for argv in ([], ["demo"], ["explain"], ["show"]):
        rc, out, _ = run(capsys, *argv, "--help")
        assert rc == 0 and out.startswith("usage: attrlab")


def test_entry_point_subprocess(tmp_path):
    """The installed command, as a user runs it: one stderr line, exit 2."""
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "attrlab.cli",
            "explain",
            "--model",
            str(tmp_path / "x"),
            "--prompt",
            "hi",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    _one_line_error(p.returncode, p.stderr)


# ------------------------------------------------------------------ demo


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo") / "attrlab-report.html"
    import io
    from contextlib import redirect_stderr, redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(io.StringIO()):
        rc = main(["demo", "--out", str(path), "--quiet"])
    assert rc == 0
    return path, out.getvalue()


def test_demo_writes_report_and_summary(demo_report):
    path, out = demo_report
    assert path.exists()
    assert out.strip().splitlines()[-1].startswith(f"report: {path.resolve()}")
    page = path.read_text()
    s = scan(page)
    # every section is either a panel or a one-line note, never a crash
    for title in (
        "Tokens",
        "Heads",
        "Layers",
        "Logit lens",
        "Circuit",
        "Context sources",
        "Training examples",
    ):
        assert title in page
    assert "failed:" not in out, out
    n_missing = page.count('class="al-missing"')
    assert len(s.panels) + n_missing >= 8


@needs_chromium
def test_demo_report_in_chromium(demo_report):
    path, _ = demo_report
    dom, console = browse(path)
    assert console == [], console
    page_panels = scan(path.read_text()).panels
    dom_panels = scan(dom).panels
    assert dom_panels == page_panels
    assert "attrlab demo" in dom
    # every method family registered in this install has its panel in the rendered page
    from attrlab import zoo

    bundled = set(zoo.tasks())
    expected = {"summary"}
    expected |= (
        {"tokens"} if available("ig", "tokens") or available("occlusion", "tokens") else set()
    )
    expected |= {"heads"} if available("dla", "heads") or available("patch", "heads") else set()
    expected |= {"layers"} if available("dla", "layers") or hasattr(al, "logit_lens") else set()
    expected |= {"edges"} if available("eap-ig", "edges") or available("eap", "edges") else set()
    expected |= (
        {"sources"} if available("contextcite", "sources") and "context_qa" in bundled else set()
    )
    expected |= {"train"} if available("trak", "train") and "facts" in bundled else set()
    assert expected <= set(dom_panels), (expected, dom_panels)


@needs_chromium
def test_demo_with_payload_prompt_runs_no_script(capsys, tmp_path):
    """End to end: a hostile prompt through the CLI and real methods into the browser."""
    payload = (
        "<script>document.title='PWNED'</script>\"><img src=x onerror=\"document.title='PWNED'\">"
    )
    out = tmp_path / "xss.html"
    rc, stdout, err = run(
        capsys,
        "demo",
        "--tiny",
        "--quiet",
        "--out",
        str(out),
        "--prompt",
        "When Mary" + payload + " and John went to",
        "--only",
        "tokens",
        "heads",
        "lens",
    )
    assert rc == 0, err
    assert "needs a counterfactual" in stdout  # patching sections say why they are absent
    dom, console = browse(out)
    s = scan(dom)
    assert "<title>attrlab demo" in dom and "<title>PWNED" not in dom
    assert not {"script", "img"} & set(s.tags) and not any(k.startswith("on") for k, _ in s.attrs)
    assert "tokens" in s.panels and console == []
