"""Featurization across processes: a real ``kill -9`` and resume, and 2 ranks under torch.distributed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import attrlab.data as ad
from attrlab.data.digits import load_digits_data, tiled_examples, train_mlp

N, DIM, SHARD, BATCH = 12000, 32, 200, 100


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A trained tiny MLP saved to disk, and the reference features of an uninterrupted 1-thread run."""
    tmp = tmp_path_factory.mktemp("proc")
    xtr, ytr, _, _ = load_digits_data()
    model = train_mlp(xtr[:200], ytr[:200], hidden=8, epochs=2, seed=0)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "mlp.safetensors")
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = ad.featurize(
            model,
            tiled_examples(xtr, ytr, N),
            tmp / "ref",
            proj_dim=DIM,
            shard_size=SHARD,
            batch_size=BATCH,
            model_id="digits-mlp",
        )
    finally:
        torch.set_num_threads(threads)
    return tmp, ref


def _cmd(tmp: Path, out: Path) -> list[str]:
    return [
        "-m", "attrlab.data.distributed", "--model", str(tmp / "mlp.safetensors"), "--hidden", "8",
        "--out", str(out), "--examples", str(N), "--dim", str(DIM), "--shard-size", str(SHARD),
        "--batch-size", str(BATCH), "--threads", "1",
    ]  # fmt: skip


def _env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(ad.__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_kill_9_then_resume_gives_identical_features(setup):
    tmp, ref = setup
    out = tmp / "killed"
    proc = subprocess.Popen([sys.executable, *_cmd(tmp, out)], env=_env(), stderr=subprocess.PIPE)
    deadline = time.time() + 120
    shards = out / "shards"
    reads = 0
    while time.time() < deadline and proc.poll() is None:
        if (out / "manifest.json").exists():  # a concurrent reader sees only complete shards
            live = ad.FeatureStore.open(out)
            for a, b in live.done_ranges():
                assert np.load(live.shard_path(a, b)).shape == (b - a, DIM)
                reads += 1
        if shards.exists() and len(list(shards.glob("*-*.npy"))) >= 4:  # some done, most to go
            break
        time.sleep(0.005)
    assert reads > 0
    assert proc.poll() is None, (
        f"featurization ended before it could be killed: {proc.stderr.read()[-2000:]}"
    )
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    store = ad.FeatureStore.open(out)
    assert 0 < len(store.done_ranges()) < len(ref.done_ranges()) and not store.complete
    for (
        a,
        b,
    ) in store.done_ranges():  # concurrent/crashed-writer safety: only complete shards are visible
        assert np.load(store.shard_path(a, b), mmap_mode="r").shape == (b - a, DIM)
    done = subprocess.run(
        [sys.executable, *_cmd(tmp, out)], env=_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = ad.FeatureStore.open(out, expect=ref.manifest)
    assert resumed.complete and resumed.manifest["finalized"]
    assert np.array_equal(resumed.features(), ref.features())
    assert np.array_equal(resumed.out_to_loss(), ref.out_to_loss())
    np.testing.assert_allclose(resumed.gram(), ref.gram(), rtol=1e-12)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_under_torchrun_equal_single_process(setup):
    tmp, ref = setup
    out = tmp / "dist"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *_cmd(tmp, out),
    ]  # fmt: skip
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    store = ad.FeatureStore.open(out, expect=ref.manifest)
    assert store.complete and store.manifest["finalized"]
    assert np.array_equal(store.features(), ref.features())
    assert np.array_equal(store.out_to_loss(), ref.out_to_loss())
    np.testing.assert_allclose(store.gram(), ref.gram(), rtol=1e-10)  # all-reduced partial Grams


_WRITER = r"""
import os, sys, time
import torch
import attrlab.data as ad

path, log, ready, weights, data = sys.argv[1:6]
shard = int(sys.argv[6])
torch.set_num_threads(1)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
model.load_state_dict(torch.load(weights))
x, y = torch.load(data)


def fetch(a, b):
    if b - a == shard:  # one batch per shard: log every shard computation
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {a} {b}\n")
        time.sleep(0.05)
    return x[a:b], y[a:b]


open(os.path.join(ready, str(os.getpid())), "w").close()
while len(os.listdir(ready)) < 2:  # start together
    time.sleep(0.01)
ad.featurize(model, ad.Examples(fetch=fetch, n=len(y)), path, proj_dim=16, shard_size=shard,
             batch_size=shard)
"""


def test_two_concurrent_featurize_processes_compute_each_shard_once(tmp_path):
    n, shard = 32, 4
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(n, 4), torch.randint(0, 3, (n,))
    torch.save(model.state_dict(), tmp_path / "w.pt")
    torch.save((x, y), tmp_path / "d.pt")
    (tmp_path / "ready").mkdir()
    log, out = tmp_path / "log.txt", tmp_path / "shared"
    args = [str(out), str(log), str(tmp_path / "ready"), str(tmp_path / "w.pt")]
    args += [str(tmp_path / "d.pt"), str(shard)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, *args], env=_env(), stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    rows = [line.split() for line in log.read_text().splitlines()]
    computed = sorted((int(a), int(b)) for _, a, b in rows)
    assert computed == [(a, a + shard) for a in range(0, n, shard)]  # every shard exactly once
    assert len({pid for pid, _, _ in rows}) == 2  # and the two processes shared the work
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = ad.featurize(
            model, (x, y), tmp_path / "single", proj_dim=16, shard_size=shard, batch_size=shard
        )
    finally:
        torch.set_num_threads(threads)
    shared = ad.FeatureStore.open(out, expect=ref.manifest, verify=True)
    assert shared.verify() == {} and shared.manifest["finalized"]
    assert np.array_equal(shared.features(), ref.features())
    assert np.array_equal(shared.out_to_loss(), ref.out_to_loss())
    assert np.array_equal(shared.gram(), ref.gram())
    assert not list((out / "shards").glob("*.claim"))


NF, SHARD_F, BATCH_F = 1200, 200, 64  # 6 shards: 3 per rank


def _factor_files(store: ad.FeatureStore) -> dict[str, np.ndarray]:
    return {
        rel: store.read_array(rel)
        for rel in sorted(store.manifest["files"])
        if rel.startswith("factors/") and rel.endswith(".npy")
    }


@pytest.fixture(scope="module")
def factor_ref(setup):
    """A single-process (1 thread) EK-FAC fit of the tiled digits set, true Fisher."""
    tmp, _ = setup
    from safetensors.torch import load_file

    from attrlab.data.digits import DigitsMLP

    model = DigitsMLP(8)
    model.load_state_dict(load_file(str(tmp / "mlp.safetensors")))
    xtr, ytr, xte, yte = load_digits_data()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = ad.fit_factors(
            model,
            tiled_examples(xtr, ytr, NF),
            tmp / "factors-ref",
            shard_size=SHARD_F,
            batch_size=BATCH_F,
            model_id="digits-mlp",
        )
        want = ad.Influence(ref).scores(model, (xte[:5], yte[:5]))
    finally:
        torch.set_num_threads(threads)
    return model, ref, want, (xte[:5], yte[:5])


def _factor_cmd(tmp: Path, out: Path) -> list[str]:
    return [
        "-m", "attrlab.data.distributed", "--model", str(tmp / "mlp.safetensors"), "--hidden", "8",
        "--out", str(out), "--examples", str(NF), "--shard-size", str(SHARD_F),
        "--batch-size", str(BATCH_F), "--threads", "1", "--factors", "ekfac",
    ]  # fmt: skip


def _assert_same_fit(store: ad.FeatureStore, factor_ref) -> None:
    model, ref, want, queries = factor_ref
    assert store.complete
    files, ref_files = _factor_files(store), _factor_files(ref)
    assert sorted(files) == sorted(ref_files) and len(files) == 2 * (NF // SHARD_F) + 1
    for rel, arr in ref_files.items():  # covariance sums, eigenbasis, corrections
        assert np.array_equal(files[rel], arr), rel
    assert store.read_file("factors/index.json") == ref.read_file("factors/index.json")
    assert np.array_equal(store.features(), ref.features())
    assert torch.equal(ad.Influence(store).scores(model, queries), want)


def test_fit_factors_two_ranks_under_torchrun_equal_single_process(setup, factor_ref):
    tmp, _ = setup
    out = tmp / "factors-dist"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *_factor_cmd(tmp, out),
    ]  # fmt: skip
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_fit(ad.FeatureStore.open(out), factor_ref)


def test_fit_factors_two_ranks_without_process_group_equal_single_process(setup, factor_ref):
    """``rank``/``world_size`` given, no torch.distributed: the ranks wait for each other
    through the store."""
    tmp, _ = setup
    out = tmp / "factors-ranks"
    procs = [
        subprocess.Popen(
            [sys.executable, *_factor_cmd(tmp, out), "--rank", str(r), "--world-size", "2"],
            env=_env(),
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (1, 0)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    _assert_same_fit(ad.FeatureStore.open(out), factor_ref)
