"""Benchmark: ``attrlab serve`` — a 10,000-node / 100,000-edge graph in the
page, and the live-check round trip on the zoo models.

``graph``: a synthetic attribution-graph-shaped result (ids ``f{l}.{i}@{p}``,
20 layers x 50 positions x 10 features, 100,000 edges with log-normal
|weights|, mixed signs) saved as a ``GraphResult`` file. Measured: the time to
build the JSON the page reads (``ResultStore.json`` from a cold cache: load and
convert; then ``json.dumps``), the payload size (raw and gzip), and — with
Chromium and Playwright — the time to first render in headless Chromium
against a real ``attrlab serve`` on loopback: navigation to the graph drawn
(``data-render-ms``: from the graph view's start to the first frame after
``fit()``, as the page measures it; and the wall time from ``goto`` to that
point, fetch and parse included), and one re-threshold (slider moved, time to
the next frame). ``--max-edges N`` repeats it with the server-side cap
(``/api/results/ID?max_edges=N``).

``live``: a real ``attrlab serve --model zoo:TASK`` on loopback; ``/api/check``
POSTed ``--repeats`` times per kind of check (urllib, one connection each):
median and max round trip, and the server's own time.

Run::

    python benchmarks/bench_serve.py graph
    python benchmarks/bench_serve.py live --repeats 20
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "_out" / "bench_serve"


def big_graph(n_nodes: int = 10_000, n_edges: int = 100_000, seed: int = 0):
    import attrlab as al

    rng = random.Random(seed)
    L, P = 20, 50
    per = n_nodes // (L * P)
    ids, layer, pos, feat, act = [], [], [], [], []
    for lay in range(L):
        for p in range(P):
            for i in range(per):
                ids.append(f"f{lay}.{i}@{p}")
                layer.append(lay)
                pos.append(p)
                feat.append(i)
                act.append(rng.random())
    src, dst, w = [], [], []
    for _ in range(n_edges):
        a, b = rng.randrange(len(ids)), rng.randrange(len(ids))
        if layer[a] == layer[b]:
            b = (b + per * P) % len(ids)
        a, b = (a, b) if layer[a] < layer[b] else (b, a)
        src.append(ids[a])
        dst.append(ids[b])
        w.append(rng.lognormvariate(0, 1.5) * (1 if rng.random() < 0.7 else -1))
    return al.GraphResult(
        {"id": ids, "kind": ["feature"] * len(ids), "layer": layer, "position": pos,
         "feature": feat, "activation": act},
        {"source": src, "target": dst, "weight": w}, method="synthetic", target="bench",
    )  # fmt: skip


def start_server(results: Path, model: str | None = None) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "attrlab.cli", "serve", str(results), "--quiet"]
    if model:
        cmd += ["--model", model]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    m = re.search(r"(http://127\.0\.0\.1:\d+/\?token=\S+)", line)
    if not m:
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r} {proc.stderr.read()}")
    url = m.group(1)
    for _ in range(200):
        try:
            urllib.request.urlopen(url, timeout=2).read()
            break
        except OSError:
            time.sleep(0.05)
    return proc, url


def graph(args: argparse.Namespace) -> dict:
    from attrlab.serve.store import ResultStore

    d = Path(tempfile.mkdtemp())
    t = time.perf_counter()
    g = big_graph()
    g.save(d / "big.json")
    out: dict = {"n_nodes": g.n_nodes, "n_edges": g.n_edges,
                 "build_graph_s": round(time.perf_counter() - t, 2)}  # fmt: skip
    for cap in [None, *args.max_edges]:
        times, size = [], 0
        for _ in range(args.repeats):
            store = ResultStore(d)  # cold cache: load + convert, as on first open
            t = time.perf_counter()
            j = store.json("big.json", max_edges=cap) if cap else store.json("big.json")
            text = json.dumps(j)
            times.append(time.perf_counter() - t)
            size = len(text.encode())
        key = f"json_cap_{cap}" if cap else "json_full"
        out[key] = {"median_s": round(statistics.median(times), 3), "bytes": size,
                    "gzip_bytes": len(gzip.compress(text.encode())),
                    "edges": len(j["edges"]["source"]), "nodes": len(j["nodes"]["id"])}  # fmt: skip
    out["browser"] = browser(d, args) if not args.no_browser else "skipped (--no-browser)"
    return out


# moves the |weight| slider to `to` (0..1000, sqrt scale) and resolves with the
# ms from the input event to the second animation frame after it (Cytoscape
# draws on the first)
RETHRESHOLD_JS = """(to) => new Promise((ok) => {
    const s = document.querySelector('.view-graph input[type=range]');
    const t0 = performance.now();
    s.value = String(to);
    s.dispatchEvent(new Event('input'));
    requestAnimationFrame(() => requestAnimationFrame(() => ok(performance.now() - t0)));
})"""
# name -> the slider's new value from its initial one (the 300 strongest edges)
STEPS = {"rethreshold_ms": lambda v: max(0, v - 150), "show_all_ms": lambda v: 0,
         "back_to_300_ms": lambda v: v}  # fmt: skip


def browser(d: Path, args: argparse.Namespace) -> dict | str:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return "skipped: Playwright is not installed"
    exe = Path("/usr/lib/chromium/chromium")
    if not exe.exists():
        return "skipped: no Chromium at /usr/lib/chromium/chromium"
    proc, url = start_server(d)
    res: dict = {}
    try:
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=str(exe), args=["--no-sandbox", "--disable-gpu"])
            for renderer in args.renderers:
                for cap in [None, *args.max_edges]:
                    runs = []
                    for _ in range(args.browser_repeats):
                        pg = b.new_page(viewport={"width": 1400, "height": 1000})
                        q = f"&result=big.json&renderer={renderer}&max_edges={cap or 0}"
                        t = time.perf_counter()
                        pg.goto(url + q)
                        pg.wait_for_selector(".view-graph[data-render-ms]", timeout=600_000)
                        wall = time.perf_counter() - t
                        ms = float(pg.get_attribute(".view-graph", "data-render-ms"))
                        start = int(
                            pg.evaluate(
                                "document.querySelector('.view-graph input[type=range]').value"
                            )
                        )
                        run = {
                            "wall": wall,
                            "render": ms,
                            "renderer": pg.get_attribute(".view-graph .cy", "data-renderer"),
                        }
                        for name, to in STEPS.items():
                            run[name] = pg.evaluate(RETHRESHOLD_JS, to(start))
                            run[name + "_edges"] = pg.get_attribute(
                                ".view-graph .cy", "data-shown-edges"
                            )
                        runs.append(run)
                        pg.close()
                    key = f"{renderer}_cap_{cap}" if cap else f"{renderer}_full"
                    med = {k: round(statistics.median(r[k] for r in runs))
                           for k in ("render", "rethreshold_ms", "show_all_ms", "back_to_300_ms")}  # fmt: skip
                    res[key] = {"goto_to_render_s": round(statistics.median(r["wall"] for r in runs), 2),
                                "render_ms": med.pop("render"), **med,
                                "renderer": runs[-1]["renderer"],
                                "edges": {k: runs[-1][k + "_edges"] for k in STEPS},
                                "runs": len(runs)}  # fmt: skip
            b.close()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    return res


def post(url: str, body: dict) -> tuple[float, dict]:
    base, token = url.split("/?token=")
    req = urllib.request.Request(f"{base}/api/check", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json",
                                          "x-attrlab-token": token})  # fmt: skip
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=60) as r:
        out = json.loads(r.read())
    return time.perf_counter() - t, out


def live(args: argparse.Namespace) -> dict:
    import attrlab as al

    res: dict = {}
    for task in args.tasks:
        lm = al.zoo.load(task)
        ex = al.zoo.task(task).examples(1, seed=0, split="test")[0]
        tg = (ex.answer, ex.wrong) if getattr(ex, "wrong", None) else ex.answer
        d = Path(tempfile.mkdtemp())
        cf = getattr(ex, "counterfactual", None)
        al.attribute(lm, ex.prompt, target=tg, units="heads", method="dla").save(d / "heads.attr")
        al.routes(lm, ex.prompt).save(d / "routes.json")
        tcs = al.dictionaries.zoo_transcoders(task)
        g = al.attribution_graph(lm, ex.prompt, tcs, target=tg)
        g.save(d / "ag.json")
        feats = [n for n in g.nodes["id"] if n.startswith("f")]
        r = al.GraphResult.load(d / "routes.json")
        checks = {
            "heads: ablate 3 (zero)": {"id": "heads.attr", "select": [0, 1, 2], "ablation": "zero"},
            "route graph: ablate every pinned node": {"id": "routes.json",
                                                      "select": list(r.nodes["id"])},
            "attribution graph: ablate 3 features": {"id": "ag.json", "select": feats[:3]},
            "attribution graph: steer 3 features": {"id": "ag.json", "select": feats[:3],
                                                    "op": "steer", "value": 2.0},
        }  # fmt: skip
        if cf:
            checks["heads: patch 3 from the counterfactual"] = {
                "id": "heads.attr",
                "select": [0, 1, 2],
                "op": "patch",
                "counterfactual": cf,
            }
            checks["attribution graph: patch 3 features"] = {
                "id": "ag.json",
                "select": feats[:3],
                "op": "patch",
                "counterfactual": cf,
            }
        proc, url = start_server(d, f"zoo:{task}")
        try:
            for name, body in checks.items():
                try:
                    post(url, body)  # warm-up (first call loads the transcoders)
                except urllib.error.HTTPError as e:
                    res[f"{task}: {name}"] = {"error": json.loads(e.read())["message"]}
                    continue
                rt, srv = [], []
                for _ in range(args.repeats):
                    t, out = post(url, body)
                    rt.append(t * 1000)
                    srv.append(out["server_ms"])
                res[f"{task}: {name}"] = {"median_ms": round(statistics.median(rt), 1),
                                          "max_ms": round(max(rt), 1),
                                          "server_median_ms": round(statistics.median(srv), 1),
                                          "n": args.repeats}  # fmt: skip
        finally:
            proc.terminate()
            proc.wait(timeout=20)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    g = sub.add_parser("graph")
    g.add_argument("--repeats", type=int, default=3)
    g.add_argument("--browser-repeats", type=int, default=2)
    g.add_argument("--max-edges", type=int, nargs="*", default=[])
    g.add_argument("--renderers", nargs="+", default=["webgl", "canvas"])
    g.add_argument("--no-browser", action="store_true")
    v = sub.add_parser("live")
    v.add_argument("--repeats", type=int, default=20)
    v.add_argument("--tasks", nargs="+", default=["ioi", "induction"])
    args = ap.parse_args()
    out = graph(args) if args.what == "graph" else live(args)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{args.what}.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
