"""Adversarial cases for the ``attrlab`` command and the ``.attr`` files it reads.

Each case is a command line (some on hostile files: truncated, bit-flipped,
or authentic — valid checksum — but malformed) and its classification: a clean
error (exit code 2, the message names the problem, no traceback) or a correct
answer checked against the Python API.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import attrlab as al
from attrlab.cli import main
from attrlab.result import _digest

PROMPT = "When Mary and John went to the store, John gave a drink to"


def _forge(path: Path, metadata: object, tensors: dict[str, torch.Tensor]) -> None:
    """A file with a valid checksum over whatever metadata (a buggy or hostile writer)."""
    body = metadata if isinstance(metadata, str) else json.dumps(metadata)
    save_file(tensors, str(path), metadata={"attrlab": body, "sha256": _digest(body, tensors)})


def _good() -> al.Attribution:
    return al.Attribution(
        torch.tensor([0.5, -2.0, 1.0]),
        {"layer": [0, 0, 1], "head": [0, 1, 0]},
        "heads",
        "dla",
        "logit(' Mary')",
        model_id="m",
    )


def _edited(**changes: object) -> dict:
    m = _good()._metadata()
    for k, v in changes.items():
        if v is None:
            m.pop(k)
        else:
            m[k] = v
    return m


@pytest.fixture()
def files(tmp_path: Path) -> Path:
    """A directory of good, broken and hostile files (see the case table)."""
    d = tmp_path
    good = _good().save(d / "good.attr")
    raw = good.read_bytes()
    (d / "plain.txt").write_text("not a result\n")
    (d / "empty.attr").write_bytes(b"")
    (d / "truncated.attr").write_bytes(raw[: len(raw) // 2])
    flipped = bytearray(raw)
    flipped[-1] ^= 0x01
    (d / "flipped.attr").write_bytes(bytes(flipped))
    n = struct.unpack("<Q", raw[:8])[0]
    (d / "header-len.attr").write_bytes(struct.pack("<Q", n * 1000) + raw[8:])
    save_file({"w": torch.zeros(2)}, str(d / "weights.attr"))
    s = _good().scores
    _forge(d / "not-json.attr", "{this is not json", {"scores": s})
    _forge(d / "deep.attr", "[" * 100000 + "]" * 100000, {"scores": s})
    _forge(d / "list.attr", [1, 2, 3], {"scores": s})
    _forge(d / "no-method.attr", _edited(method=None), {"scores": s})
    _forge(d / "future.attr", _edited(version=99), {"scores": s})
    _forge(d / "short-column.attr", _edited(units=[["layer", [0, 1]]]), {"scores": s})
    _forge(d / "nan.attr", _edited(), {"scores": torch.tensor([0.5, float("nan"), 1.0])})
    _forge(d / "3d.attr", _edited(), {"scores": torch.zeros(1, 1, 3)})
    _forge(d / "params-list.attr", _edited(params=[1, 2]), {"scores": s})
    (d / "afile").write_text("x")
    (d / "atp_notes.attr").write_text("x")
    return d


# (argv with {d} for the files directory, expected exit code, expected text in stderr)
EXPLAIN = ["explain", "--model", "tiny:gpt2", "--prompt", PROMPT, "--method", "occlusion"]
CASES = [
    # output paths: checked before the model is loaded
    ("out-under-file", [*EXPLAIN, "--out", "{d}/afile/r.attr"], 2, "is a file, not a directory"),
    ("out-is-dir", [*EXPLAIN, "--out", "{d}"], 2, "is a directory"),
    ("html-under-file", [*EXPLAIN, "--html", "{d}/afile/r.html"], 2, "is a file"),
    ("html-is-dir", [*EXPLAIN, "--html", "{d}"], 2, "is a directory"),
    ("out-equals-html", [*EXPLAIN, "--out", "{d}/x", "--html", "{d}/x"], 2, "same file"),
    ("top-negative", [*EXPLAIN, "--top", "-3"], 2, "not a positive whole number"),
    ("top-text", ["show", "{d}/good.attr", "--top", "many"], 2, "invalid int"),
    # names and values
    ("empty-prompt", [*EXPLAIN[:4], "", "--method", "occlusion"], 2, "--prompt is empty"),
    ("unknown-units", [*EXPLAIN, "--units", "tokns"], 2, "unknown units"),
    ("unknown-method", [*EXPLAIN[:5], "--method", "intgrad"], 2, "unknown method"),
    (
        "glob-expanded-method",
        [*EXPLAIN[:5], "--units", "heads", "--method", "{d}/atp_notes.attr"],
        2,
        "quote it: --method 'atp*'",
    ),
    ("glob-two-files", [*EXPLAIN, "{d}/atp_notes.attr"], 2, "must be quoted"),
    ("option-no-equals", [*EXPLAIN, "-o", "steps"], 2, "KEY=VALUE"),
    ("model-missing", ["explain", "--model", "{d}/nope", "--prompt", "x"], 2, "does not exist"),
    ("model-plain-file", ["explain", "--model", "{d}/plain.txt", "--prompt", "x"], 2, "model"),
    ("demo-bad-section", ["demo", "--tiny", "--only", "heads", "nope"], 2, "unknown demo section"),
    ("demo-out-is-dir", ["demo", "--tiny", "--out", "{d}"], 2, "is a directory"),
    ("show-html-onto-input", ["show", "{d}/good.attr", "--html", "{d}/good.attr"], 2, "overwrite"),
    # files that are not results, or broken ones
    ("show-missing", ["show", "{d}/missing.attr"], 2, "no such file"),
    ("show-directory", ["show", "{d}"], 2, "is a directory"),
    ("show-text-file", ["show", "{d}/plain.txt"], 2, "not a readable attrlab file"),
    ("show-empty-file", ["show", "{d}/empty.attr"], 2, "not a readable attrlab file"),
    ("show-truncated", ["show", "{d}/truncated.attr"], 2, "not a readable attrlab file"),
    ("show-bad-header-length", ["show", "{d}/header-len.attr"], 2, "not a readable attrlab"),
    ("show-flipped-byte", ["show", "{d}/flipped.attr"], 2, "checksum"),
    ("show-weights-file", ["show", "{d}/weights.attr"], 2, "not an attrlab result"),
    # authentic (valid checksum) but malformed
    ("show-metadata-not-json", ["show", "{d}/not-json.attr"], 2, "bad metadata JSON"),
    ("show-metadata-deep", ["show", "{d}/deep.attr"], 2, "bad metadata JSON"),
    ("show-metadata-list", ["show", "{d}/list.attr"], 2, "not an object"),
    ("show-no-method", ["show", "{d}/no-method.attr"], 2, "missing key method"),
    ("show-future-version", ["show", "{d}/future.attr"], 2, "upgrade attrlab"),
    ("show-short-column", ["show", "{d}/short-column.attr"], 2, "2 entries for 3 units"),
    ("show-nan-scores", ["show", "{d}/nan.attr"], 2, "NaN or infinite"),
    ("show-3d-scores", ["show", "{d}/3d.attr"], 2, "[n_units] or [n_rows, n_units]"),
    ("show-params-list", ["show", "{d}/params-list.attr"], 2, "'params' must be an object"),
]


@pytest.mark.parametrize("argv,code,expect", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_a_clean_error(capsys, files, argv, code, expect):
    rc = main([a.replace("{d}", str(files)) for a in argv] + ["-q"])
    out, err = capsys.readouterr()
    assert rc == code, err
    assert "Traceback" not in err and err.startswith("attrlab"), err
    assert expect in err, err
    if "--out" in argv or "--html" in argv:
        assert out == ""  # rejected before anything was computed or printed


def test_good_file_shows_the_python_answer(capsys, files):
    """Control case: the good file of the same directory gives the API's table and JSON."""
    r = al.Attribution.load(files / "good.attr")
    assert main(["show", str(files / "good.attr"), "--json"]) == 0
    assert json.loads(capsys.readouterr()[0])["scores"] == r.scores.tolist()
    assert main(["show", str(files / "good.attr"), "--top", "1"]) == 0
    last = capsys.readouterr()[0].strip().splitlines()[-1].split()
    top = r.top(1)
    assert last == [str(top["layer"][0]), str(top["head"][0]), str(top["score"][0])]


def test_explain_into_a_missing_directory_writes_the_api_result(capsys, tmp_path):
    out = tmp_path / "new" / "dir" / "r.attr"
    argv = [*EXPLAIN[:5], "--target", " Mary", "--method", "occlusion", "--out", str(out), "-q"]
    assert main(argv) == 0, capsys.readouterr()[1]
    lm = al.wrap(*al.testing.tiny_model("gpt2"), name="tiny-random-gpt2")
    api = al.attribute(lm, PROMPT, target=" Mary", method="occlusion")
    torch.testing.assert_close(al.Attribution.load(out).scores, api.scores)
