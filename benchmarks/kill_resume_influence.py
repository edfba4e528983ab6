"""Kill -9 EK-FAC factor fitting and scoring repeatedly, resume, and compare with an uninterrupted run.

A child process fits EK-FAC factors (true Fisher: sampled labels) of the
digits MLP into a store (small shards, so that kills land inside every stage:
gradients, covariances, eigendecomposition, eigenvalue corrections), and is
killed with SIGKILL at a random moment, ``--kills`` times; then it runs to the
end. Then the same for scoring with ``cache=True`` (each training shard's score
block recorded). The factor files must be byte-identical to those of an
uninterrupted run in another directory, and the scores identical (``==``).

    python benchmarks/kill_resume_influence.py --kills 10
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
N_TRAIN, N_QUERY, SHARD, BATCH = 1497, 200, 32, 16


def child(stage: str, path: str) -> None:
    import numpy as np
    import torch

    import attrlab.data as ad
    from attrlab.data.digits import load_digits_data, train_mlp

    torch.set_num_threads(1)
    xtr, ytr, xte, yte = load_digits_data()
    model = train_mlp(xtr, ytr, hidden=64, epochs=5, seed=0)  # deterministic
    print("ready", flush=True)
    if stage == "fit":
        ad.fit_factors(model, (xtr, ytr), path, shard_size=SHARD, batch_size=BATCH)
    else:
        s = ad.Influence(path).scores(model, (xte[:N_QUERY], yte[:N_QUERY]), cache=True)
        np.save(Path(path) / f"scores-{os.getpid()}.npy", s.numpy())
    print("done", flush=True)


def run(stage: str, path: str, kill_after_files: int | None) -> tuple[bool, float]:
    """Run the child; SIGKILL it once ``kill_after_files`` more files are recorded in
    the store's manifest (i.e. mid-work, at a random file boundary plus the polling
    delay). Returns (finished, seconds of work after it was ready)."""
    p = subprocess.Popen(
        [sys.executable, __file__, "--child", stage, path],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "ready"
    t0 = time.perf_counter()
    if kill_after_files is None:
        p.wait()
        return p.returncode == 0, time.perf_counter() - t0
    start = progress(Path(path))
    while p.poll() is None and progress(Path(path)) < start + kill_after_files:
        time.sleep(0.003)
    if p.poll() is not None:
        return p.returncode == 0, time.perf_counter() - t0
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    return False, time.perf_counter() - t0


def factor_files(path: Path) -> dict[str, str]:
    man = json.loads((path / "manifest.json").read_text())
    return {
        rel: e["size"] and __import__("hashlib").sha256((path / rel).read_bytes()).hexdigest()
        for rel, e in sorted(man["files"].items())
        if rel.startswith(("factors/", "shards/")) and rel.endswith(".npy")
    }


def progress(path: Path) -> int:
    try:
        return len(json.loads((path / "manifest.json").read_text())["files"])
    except (OSError, ValueError):
        return 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=2, default=None)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.child:
        child(*a.child)
        return
    import numpy as np

    rng = random.Random(a.seed)
    root = Path(tempfile.mkdtemp(prefix="kill-influence-"))
    ref, cut = root / "ref", root / "cut"
    ok, t_fit = run("fit", str(ref), None)
    assert ok
    ok, t_score = run("score", str(ref), None)
    assert ok
    print(f"uninterrupted: fit {t_fit:.2f}s, score {t_score:.2f}s (after start-up)")
    report = {}
    files = {"fit": progress(ref), "score": N_TRAIN // SHARD + 1}
    for stage in ("fit", "score"):
        kills, finished_early, trail = 0, 0, []
        while kills < a.kills:
            before = progress(cut)
            mid = files[stage] // (a.kills + 5)  # spread the kills over every stage (+ overshoot)
            step = rng.randint(max(1, mid - mid // 3), max(1, mid + mid // 3))
            if run(stage, str(cut), step)[0]:
                finished_early += 1
                break
            kills += 1
            trail.append(progress(cut) - before)
        if kills < a.kills:
            print(f"{stage}: finished after {kills} kills (the stage is too short for more)")
        assert run(stage, str(cut), None)[0]
        report[stage] = {"kills": kills, "files_recorded_between_kills": trail}
        print(f"{stage}: {kills} SIGKILLs, files recorded between kills {trail}", flush=True)
    same_files = factor_files(ref) == factor_files(cut)
    s_ref = [np.load(p) for p in ref.glob("scores-*.npy")][0]
    s_cut = [np.load(p) for p in cut.glob("scores-*.npy")][-1]
    same_scores = bool(np.array_equal(s_ref, s_cut))
    print(
        f"factor and gradient files byte-identical: {same_files}; scores identical: {same_scores} "
        f"(shape {s_ref.shape}, max |diff| {float(np.abs(s_ref - s_cut).max()):.1e})"
    )
    report.update(same_files=same_files, same_scores=same_scores)
    print(json.dumps(report))
    assert same_files and same_scores


if __name__ == "__main__":
    main()
