"""Print pip constraints pinning every runtime dependency to its declared floor.

`.ci/run` installs attrlab with these constraints in a second venv and runs the
model/method core of the test suite there, so a floor in pyproject.toml that is
too low fails CI. The pins are derived, never written by hand: change a floor in
pyproject.toml and the floors job tests the new one.

Example:
    python .ci/floors.py > /tmp/floors.txt   # e.g. "transformers==4.45.0"
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path


def floors(pyproject: Path) -> list[str]:
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    pins = []
    for dep in deps:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][^,;\s]*)\s*(,.*)?", dep)
        if m is None:
            sys.exit(f"floors.py: dependency {dep!r} declares no '>=' floor; give it one")
        pins.append(f"{m.group(1)}=={m.group(2)}")
    return pins


if __name__ == "__main__":
    print("\n".join(floors(Path(__file__).resolve().parent.parent / "pyproject.toml")))
