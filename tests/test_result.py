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
