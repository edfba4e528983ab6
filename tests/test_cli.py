"""The ``attrlab`` command: explain == the Python API, show, demo (+ its report
in Chromium), --help everywhere, and one-line errors with exit code 2."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attrlab as al
from attrlab.app.demo import available
from attrlab.cli import main, parse_option
from attrlab.methods.base import _REGISTRY, Method, register
from attrlab.model.wrapper import Batch
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
        {"samples": 8, "seed": 1},
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


# ------------------------------------------------------------------ output paths, messages

RUNS: list[str] = []


class _Counted(Method):
    """Test-only method: counts its runs; ``fail`` raises an error of that kind instead."""

    def __init__(self, fail: str = ""):
        self.fail = fail

    def attribute(self, lm, inputs, target, units, counterfactual=None):  # noqa: ANN001
        RUNS.append(self.fail)
        if self.fail == "length":
            raise al.errors.CounterfactualLengthError(
                "the counterfactual must tokenize to the same length as the prompt:\n"
                "  prompt 0 (3 tokens): ['a', ' b', ' c']\n"
                "  counterfactual 0 (2 tokens): ['a', ' b']"
            )
        if self.fail == "bug":
            raise RuntimeError("shape mismatch in a test method")
        b = lm.tokenize(inputs)
        n = b.input_ids.shape[1]
        return al.Attribution(
            torch.arange(n, dtype=torch.float32),
            {"position": list(range(n)), "token": lm.to_str_tokens(b.input_ids[0])},
            "tokens",
            "cli-test-counted",
            "t",
            params=self.params(),
        )


@pytest.fixture(scope="module")
def counted():
    register("cli-test-counted", units=("tokens",))(_Counted)
    yield "cli-test-counted"
    for key in [k for k, v in _REGISTRY.items() if v is _Counted]:
        del _REGISTRY[key]


def _explain(capsys, counted, *extra):
    RUNS.clear()
    argv = ["explain", "--model", "tiny:gpt2", "--prompt", "a b c", "--method", counted]
    return run(capsys, *argv, *extra, "-q")


@pytest.mark.parametrize(
    "flag,where,expect",
    [
        ("--out", "{f}/r.attr", "is a file, not a directory"),
        ("--out", "{f}/deeper/r.attr", "is a file, not a directory"),
        ("--out", "{d}", "is a directory"),
        ("--html", "{f}/r.html", "is a file, not a directory"),
        ("--html", "{d}", "is a directory"),
        ("--out", "", "is empty"),
    ],
)
def test_bad_output_path_is_an_error_before_computing(
    capsys, tmp_path, counted, flag, where, expect
):
    (tmp_path / "file").write_text("x")
    path = where.replace("{f}", str(tmp_path / "file")).replace("{d}", str(tmp_path))
    rc, _, err = _explain(capsys, counted, flag, path)
    line = _one_line_error(rc, err)
    assert flag in line and expect in line, line
    assert RUNS == []  # nothing was computed, so nothing was lost


def test_same_path_for_out_and_html_is_an_error(capsys, tmp_path, counted):
    p = str(tmp_path / "r.attr")
    rc, _, err = _explain(capsys, counted, "--out", p, "--html", p)
    assert "same file" in _one_line_error(rc, err) and RUNS == []


def test_missing_output_directories_are_created(capsys, tmp_path, counted):
    out, html = tmp_path / "a" / "b" / "r.attr", tmp_path / "c" / "r.html"
    rc, _, err = _explain(capsys, counted, "--out", str(out), "--html", str(html))
    assert rc == 0, err
    assert al.Attribution.load(out).scores.tolist() == [0.0, 1.0, 2.0]
    assert "<!DOCTYPE html>" in html.read_text()
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["r.attr", "r.html"]


@pytest.mark.parametrize("failing", ["--out", "--html"])
def test_write_failure_after_compute_keeps_the_result(
    capsys, tmp_path, monkeypatch, counted, failing
):
    """The disk refuses the write after the method ran: the result goes to a
    fallback file in the working directory, stderr says where, exit code 1."""
    from attrlab.report import Report

    target = tmp_path / "out" / ("r.attr" if failing == "--out" else "r.html")
    cls = al.Attribution if failing == "--out" else Report
    real = cls.save

    def refuse(self, path, *a, **k):  # noqa: ANN001
        if Path(path) == target:
            raise PermissionError(13, "Permission denied", str(path))
        return real(self, path, *a, **k)

    monkeypatch.setattr(cls, "save", refuse)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    rc, out, err = _explain(capsys, counted, failing, str(target))
    assert rc == 1 and RUNS == [""] and "Traceback" not in err
    assert f"cannot write {failing} {target}" in err and "Permission denied" in err
    kept = sorted(cwd.iterdir())
    assert sorted(p.suffix for p in kept) == (
        [".attr"] if failing == "--out" else [".attr", ".html"]
    )
    assert all(str(p) in err for p in kept)
    attr = next(p for p in kept if p.suffix == ".attr")
    assert al.Attribution.load(attr).scores.tolist() == [0.0, 1.0, 2.0]
    assert "cli-test-counted over tokens" in out  # the table was printed too
    assert not target.exists()


@pytest.mark.parametrize("cmd", ["explain", "show"])
@pytest.mark.parametrize("top", ["-3", "0"])
def test_top_must_be_positive(capsys, tmp_path, counted, cmd, top):
    if cmd == "explain":
        rc, out, err = _explain(capsys, counted, "--top", top)
    else:
        f = al.Attribution(torch.ones(2), {"token": ["a", "b"]}, "tokens", "x").save(
            tmp_path / "r.attr"
        )
        rc, out, err = run(capsys, "show", str(f), "--top", top)
    line = _one_line_error(rc, err)
    assert "--top" in line and "positive" in line and out == ""


def test_the_whole_error_message_is_printed(capsys, counted):
    rc, _, err = _explain(capsys, counted, "-o", "fail=length")
    assert rc == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith("attrlab: error: the counterfactual must tokenize")
    assert "counterfactual 0 (2 tokens): ['a', ' b']" in lines[-1] and len(lines) == 3


def test_an_unexpected_exception_is_not_a_traceback(capsys, counted):
    rc, _, err = _explain(capsys, counted, "-o", "fail=bug")
    assert rc == 1 and "Traceback" not in err
    assert "internal error: RuntimeError: shape mismatch" in err and "--debug" in err
    with pytest.raises(RuntimeError):
        main(
            ["explain", "--model", "tiny:gpt2", "--prompt", "a b", "--method", counted]
            + ["-o", "fail=bug", "--debug", "-q"]
        )


def test_an_expanded_glob_as_method_name_says_to_quote(capsys, tmp_path, monkeypatch, counted):
    monkeypatch.chdir(tmp_path)
    for name in ("atp_notes.txt", "atp_old.attr"):
        (tmp_path / name).write_text("x")
    # `--method atp*` in a directory with one match: the shell passes the file name
    rc, _, err = run(
        capsys,
        "explain",
        "--model",
        "tiny:gpt2",
        "--prompt",
        "a",
        "--units",
        "heads",
        "--method",
        "atp_notes.txt",
        "-q",
    )
    assert rc == 2 and "unknown method" in err and "--method 'atp*'" in err
    # with two matches the second is an extra argument
    rc, _, err = run(
        capsys,
        "explain",
        "--model",
        "tiny:gpt2",
        "--prompt",
        "a",
        "--units",
        "heads",
        "--method",
        "atp_notes.txt",
        "atp_old.attr",
        "-q",
    )
    assert "unrecognized arguments" in _one_line_error(rc, err) and "'atp*'" in err


def test_model_path_that_is_not_a_model_is_a_clean_error(capsys, model_dir, counted):
    rc, _, err = run(
        capsys,
        "explain",
        "--model",
        f"{model_dir}/config.json",
        "--prompt",
        "a",
        "--method",
        counted,
        "-q",
    )
    assert "cannot load model" in _one_line_error(rc, err)


# ------------------------------------------------------------------ docs quote globs

GLOB = re.compile(r"[*?]")


def _unquoted_globs(command: str) -> list[str]:
    """Words of a shell command line with an unquoted ``*`` or ``?`` (which the
    shell would expand into file names)."""
    bad, word, quote, has_glob = [], "", "", False
    for c in command + " ":
        if quote:
            quote = "" if c == quote else quote
            word += c
        elif c in "'\"":
            quote = c
            word += c
        elif c.isspace():
            if has_glob:
                bad.append(word)
            word, has_glob = "", False
        elif c == "#" and not word:
            break
        else:
            has_glob = has_glob or bool(GLOB.match(c))
            word += c
    return bad


def _shell_commands(text: str) -> list[str]:
    """``attrlab ...`` command lines (with their ``\\`` continuations) of a Markdown
    text or a help text: in code blocks, after a ``$`` prompt, or as help examples."""
    out, cur = [], None
    for raw in text.splitlines():
        line = raw.strip().removeprefix("$ ")
        if cur is not None:
            cur += " " + line.rstrip("\\")
            if not line.endswith("\\"):
                out.append(cur)
                cur = None
            continue
        if re.match(r"(attrlab|python -m attrlab\.cli) ", line):
            if line.endswith("\\"):
                cur = line.rstrip("\\")
            else:
                out.append(line)
    return out


def test_glob_scanner_finds_unquoted_stars():
    assert _unquoted_globs("attrlab explain --method atp* --units heads") == ["atp*"]
    assert _unquoted_globs("attrlab explain --method 'atp*' -o x=\"a*\"") == []
    cmds = _shell_commands("```bash\nattrlab explain --model m \\\n    --method atp* \\\n  -q\n```")
    assert cmds and _unquoted_globs(cmds[0]) == ["atp*"]


def test_docs_and_help_quote_method_names_with_a_star():
    root = Path(__file__).resolve().parents[1]
    texts = {p.relative_to(root).as_posix(): p.read_text() for p in root.glob("docs/**/*.md")}
    texts["README.md"] = (root / "README.md").read_text()
    for cmd in ("demo", "explain", "show"):
        texts[f"attrlab {cmd} --help"] = _help(cmd)
    found, bad = 0, []
    for name, text in texts.items():
        for c in _shell_commands(text):
            found += 1
            bad += [f"{name}: {w!r} in {c[:80]}" for w in _unquoted_globs(c)]
    assert found >= 8  # the scanner sees the documented commands
    assert bad == [], bad


def _help(cmd: str) -> str:
    from attrlab.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[cmd].format_help()


def test_explain_routes_and_tuned_lens(capsys, tmp_path, model_dir):
    base = ["explain", "--model", model_dir, "--prompt", PROMPT, "-q"]
    out_json, html = tmp_path / "g.graph.json", tmp_path / "g.html"
    rc, out, err = run(capsys, *base, "--method", "routes", "-o", "tau=0.05", "--out",
                       str(out_json), "--html", str(html))  # fmt: skip
    assert rc == 0, err
    g = al.GraphResult.load(out_json)
    api = al.routes(al.load(model_dir), PROMPT, tau=0.05)
    assert g.edges == api.edges and out.startswith("routes:")
    assert 'data-panel="graph"' in html.read_text() and "<svg" in html.read_text()
    rc, _, err = run(capsys, *base, "--method", "routes", "-o", "alpha=1")
    assert rc == 2 and "tau" in err
    # a saved tuned lens directory
    lm = al.load(model_dir)
    lens_dir = al.lenses.train_tuned_lens(lm, [PROMPT, PROMPT + " Mary"], steps=2,
                                          progress=False).save(tmp_path / "lens")  # fmt: skip
    rc, out, err = run(capsys, *base, "--target", " Mary", "--lens", str(lens_dir), "--json")
    assert rc == 0, err
    j = json.loads(out)
    want = al.logit_lens(lm, PROMPT, target=" Mary", lens=al.lenses.TunedLens.load(lens_dir))
    assert j["method"] == "tuned_lens" and j["scores"] == pytest.approx(want.scores.tolist())
    rc, _, err = run(capsys, *base, "--lens", str(tmp_path / "nope"))
    assert rc == 2 and "tuned lens" in err
