"""Attribution: tables, top-k, save/load round trip, tamper detection, escaping."""

from __future__ import annotations

import json
import struct

import pytest
import torch

import attrlab as al
from attrlab.result import Attribution


def _result(two_d: bool = False) -> Attribution:
    scores = (
        torch.tensor([[0.5, -2.0, 1.0], [0.1, 0.2, -0.3]])
        if two_d
        else torch.tensor([0.5, -2.0, 1.0])
    )
    return Attribution(
        scores,
        units={
            "layer": [0, 0, 1],
            "head": [0, 1, 0],
            "token": ["<script>", " Mary", '"><img onerror=x>'],
        },
        unit_kind="heads",
        method="dla",
        target="logit(' Mary')",
        params={"steps": 32, "rule": "gauss-legendre"},
        model_id="tiny",
        diagnostics={"completeness_error": 1e-7, "nan": float("nan")},
        rows={"token": ["a", "b"]} if two_d else None,
        meta={"prompt": "When <b>Mary</b>"},
        extra={"rank": torch.tensor([1, 2, 3])},
    )


def test_top_and_pandas():
    r = _result()
    assert r.top(2)["head"].tolist() == [1, 0]
    assert r.top(1, by="pos")["layer"].tolist() == [1]
    assert r.top(1, by="neg")["score"].tolist() == [-2.0]
    df = r.to_pandas()
    assert list(df.columns) == ["layer", "head", "token", "score"]
    assert df["score"].tolist() == [0.5, -2.0, 1.0]
    assert r.to_numpy().dtype.name == "float64"
    with pytest.raises(al.errors.InputError):
        r.top(3, by="bogus")


def test_two_d_scores():
    r = _result(two_d=True)
    long = r.to_pandas()
    assert len(long) == 6 and "row" in long.columns
    assert r.to_pandas(row=1)["score"].tolist() == pytest.approx([0.1, 0.2, -0.3])
    assert r.top(1, row=0)["head"].tolist() == [1]


def test_label_length_checked():
    with pytest.raises(al.errors.InputError, match="entries"):
        Attribution(torch.zeros(3), units={"layer": [0, 1]}, unit_kind="heads", method="x")


@pytest.mark.parametrize("two_d", [False, True])
def test_save_load_round_trip(tmp_path, two_d):
    r = _result(two_d)
    path = r.save(tmp_path / "r.attr")
    back = Attribution.load(path)
    assert torch.equal(back.scores, r.scores)
    assert list(back.units) == ["layer", "head", "token"]  # column order survives
    assert list(back.to_pandas().columns) == list(r.to_pandas().columns)
    assert back.units == r.units and back.params == r.params and back.meta == r.meta
    assert back.rows == r.rows
    assert torch.equal(back.extra["rank"], r.extra["rank"])
    assert back.diagnostics["completeness_error"] == 1e-7
    assert back.equals(Attribution.load(path))
    # no pickle: the file is a safetensors file with a JSON header
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    assert json.loads(header["__metadata__"]["attrlab"])["method"] == "dla"


def test_tampered_header_fails(tmp_path):
    path = _result().save(tmp_path / "r.attr")
    raw = bytearray(path.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    header = raw[8 : 8 + n].decode()
    edited = header.replace('\\"method\\": \\"dla\\"', '\\"method\\": \\"ig!\\"')
    assert edited != header and len(edited) == len(header)
    raw[8 : 8 + n] = edited.encode()
    bad = tmp_path / "tampered.attr"
    bad.write_bytes(bytes(raw))
    with pytest.raises(al.errors.FileFormatError, match="checksum"):
        Attribution.load(bad)
    garbage = tmp_path / "garbage.attr"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(al.errors.FileFormatError):
        Attribution.load(garbage)
    # changed scores are caught too
    raw2 = bytearray(path.read_bytes())
    raw2[-1] ^= 0xFF
    flipped = tmp_path / "flipped.attr"
    flipped.write_bytes(bytes(raw2))
    with pytest.raises(al.errors.FileFormatError):
        Attribution.load(flipped)
    with pytest.raises(al.errors.FileFormatError, match="no such file"):
        Attribution.load(tmp_path / "missing.attr")


def test_html_escapes_everything():
    html = _result()._repr_html_()
    assert "<script>" not in html and "<img" not in html and "<b>Mary" not in html
    assert "&lt;script&gt;" in html


# --------------------------------------------------- authentic but malformed files


def forge(path, metadata, tensors):
    """Write a file whose checksum is valid for any metadata (a buggy or hostile
    writer): the loader must check the schema, not trust the checksum."""
    from safetensors.torch import save_file

    from attrlab.result import _digest

    body = metadata if isinstance(metadata, str) else json.dumps(metadata)
    save_file(tensors, str(path), metadata={"attrlab": body, "sha256": _digest(body, tensors)})
    return path


def _edit(m, key, value):
    m = json.loads(json.dumps(m))
    if value is _DELETE:
        del m[key]
    else:
        m[key] = value
    return m


_DELETE = object()
MALFORMED = [
    ("not an object", lambda m: [1, 2], "not an object"),
    ("version text", lambda m: _edit(m, "version", "one"), "version"),
    ("version missing", lambda m: _edit(m, "version", _DELETE), "version"),
    ("version from the future", lambda m: _edit(m, "version", 99), "upgrade attrlab"),
    ("units missing", lambda m: _edit(m, "units", _DELETE), "missing key units"),
    ("method missing", lambda m: _edit(m, "method", _DELETE), "missing key method"),
    ("units a number", lambda m: _edit(m, "units", 3), "'units' must be a list"),
    ("unit_kind a list", lambda m: _edit(m, "unit_kind", ["heads"]), "'unit_kind' must be"),
    ("params a list", lambda m: _edit(m, "params", [1]), "'params' must be an object"),
    ("meta a string", lambda m: _edit(m, "meta", "x"), "'meta' must be an object"),
    ("column not a pair", lambda m: _edit(m, "units", [["layer", [0, 0, 1], 1]]), "pair"),
    ("column name a number", lambda m: _edit(m, "units", [[1, [0, 0, 1]]]), "pair"),
    ("column too short", lambda m: _edit(m, "units", [["layer", [0, 1]]]), "2 entries for 3"),
    ("column twice", lambda m: _edit(m, "units", [["a", [0, 0, 0]], ["a", [1, 1, 1]]]), "twice"),
    ("label a list", lambda m: _edit(m, "units", [["layer", [[0], 0, 1]]]), "holds [0]"),
    ("column values text", lambda m: _edit(m, "units", [["layer", "abc"]]), "must be a list"),
]


@pytest.mark.parametrize("case,mutate,expect", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_authentic_but_malformed_metadata_is_a_file_format_error(tmp_path, case, mutate, expect):
    r = _result()
    m = mutate(r._metadata())
    path = forge(tmp_path / "m.attr", m, {"scores": r.scores})
    with pytest.raises(al.errors.FileFormatError, match="m.attr") as e:
        Attribution.load(path)
    assert expect in str(e.value)


@pytest.mark.parametrize(
    "scores,expect",
    [
        (torch.tensor([1.0, float("nan"), 2.0]), "NaN or infinite"),
        (torch.tensor([1.0, float("inf"), 2.0]), "NaN or infinite"),
        (torch.zeros(3, 2, 1), "[n_units] or [n_rows, n_units]"),
        (torch.tensor(1.0), "[n_units] or [n_rows, n_units]"),
        (torch.zeros(0, 3), "[n_units] or [n_rows, n_units]"),
        (torch.tensor([True, False, True]), "real numbers"),
        (torch.zeros(2, 3), "rows column 'token' has 1 entries for 2 rows"),
    ],
)
def test_scores_that_do_not_fit_the_metadata(tmp_path, scores, expect):
    r = _result()
    m = r._metadata()
    m["rows"] = [["token", ["only one"]]]
    path = forge(tmp_path / "s.attr", m, {"scores": scores})
    with pytest.raises(al.errors.FileFormatError) as e:
        Attribution.load(path)
    assert expect in str(e.value)


def test_non_finite_scores_are_not_saved(tmp_path):
    r = Attribution(torch.tensor([1.0, float("nan")]), {"token": ["a", "b"]}, "tokens", "x")
    with pytest.raises(al.errors.InputError, match="non-finite"):
        r.save(tmp_path / "nan.attr")
    assert list(tmp_path.iterdir()) == []


def test_save_is_atomic(tmp_path, monkeypatch):
    """A write that fails half-way leaves the old file as it was and no temporary file."""
    import pathlib

    path = _result().save(tmp_path / "r.attr")
    before = path.read_bytes()
    real = pathlib.Path.write_bytes

    def half(self, data):  # noqa: ANN001
        real(self, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_bytes", half)
    other = _result(two_d=True)
    with pytest.raises(OSError, match="No space left") as e:
        other.save(path)
    assert e.value.filename == str(path)  # names the file asked for, not the temporary one
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["r.attr"]


# ------------------------------------------------------------ align and views
def test_align_reorders_by_label_and_keeps_rows():
    a = Attribution(torch.tensor([[1.0, 2.0, 3.0]]), {"layer": [0, 1, 2]}, "mlp", "x")
    b = Attribution(torch.tensor([[30.0, 10.0, 20.0]]), {"layer": [2, 0, 1]}, "mlp", "y")
    x, y = a.align(b)
    assert y.scores.tolist() == [[10.0, 20.0, 30.0]] and y.units == a.units
    assert x is not a and torch.equal(x.scores, a.scores)


@pytest.mark.parametrize(
    "other,match",
    [
        (Attribution(torch.zeros(2), {"layer": [0, 1]}, "attn", "y"), "'mlp' units with 'attn'"),
        (Attribution(torch.zeros(2), {"layer": [0, 1], "position": [0, 0]}, "mlp", "y"), "by"),
        (Attribution(torch.zeros(2), {"layer": [0, 0]}, "mlp", "y"), "name two units"),
        (Attribution(torch.zeros(2), {"layer": [5, 6]}, "mlp", "y"), "share no unit"),
    ],
    ids=["kind", "columns", "duplicates", "disjoint"],
)
def test_align_refuses_units_that_do_not_match(other, match):
    a = Attribution(torch.zeros(2), {"layer": [0, 1]}, "mlp", "x")
    with pytest.raises(al.errors.UnitMismatchError, match=match):
        a.align(other)


def test_align_refuses_the_same_position_with_another_token():
    a = Attribution(torch.zeros(2), {"position": [0, 1], "token": ["a", "b"]}, "tokens", "x")
    b = Attribution(torch.zeros(2), {"position": [1, 0], "token": ["c", "a"]}, "tokens", "y")
    with pytest.raises(al.errors.UnitMismatchError, match="different inputs"):
        a.align(b)


def test_result_imports_no_view_and_views_are_registered():
    """Arrows point down: result.py imports nothing from viz or report (read with
    ast, so lazy imports count); importing attrlab registers the views."""
    import ast
    from pathlib import Path

    import attrlab.result as R

    tree = ast.parse(Path(R.__file__).read_text())
    names = {
        (n.module or "") if isinstance(n, ast.ImportFrom) else a.name
        for n in ast.walk(tree)
        if isinstance(n, (ast.Import, ast.ImportFrom))
        for a in n.names
    }
    assert not [m for m in names if "viz" in m or "report" in m], names
    assert {"html", "plot"} <= set(R._VIEWS)
    r = _result()
    old = R._VIEWS["html"]
    try:
        R.register_view("html", lambda res: f"<i>{res.method}</i>")
        assert r.to_html() == "<i>dla</i>" and r._repr_html_() == "<i>dla</i>"
    finally:
        R.register_view("html", old)
    assert "&lt;script&gt;" in r.to_html()
    with pytest.raises(al.errors.InputError):
        R.register_view("html", "not callable")
