// Graph view: route graphs, circuits (edge attributions) and attribution graphs
// (attrlab and circuit-tracer JSON) in a layer x position layout, drawn by the
// vendored Cytoscape.js (pan, zoom), with an |weight| threshold, node pinning
// and a pane listing the subgraph among the pinned nodes.
import { el, clear, fmt, visible } from "./dom.js";

// parse a component name of attrlab's edge graph: embed, a3.h2(.q), m3, logits
function componentPlace(name, nLayers) {
  let m = /^a(\d+)\.h(\d+)/.exec(name);
  if (m) return { layer: Number(m[1]), x: Number(m[2]) };
  m = /^m(\d+)/.exec(name);
  if (m) return { layer: Number(m[1]) + 0.5, x: 0 };
  if (name === "embed" || name === "input") return { layer: -1, x: 0 };
  if (name === "logits" || name === "output") return { layer: nLayers, x: 0 };
  return { layer: 0, x: 0 };
}

// an edge Attribution (units upstream/downstream or src/dst) as a graph;
// each edge keeps its unit index, so a pinned subgraph maps to units
export function graphFromEdgeUnits(res) {
  const cols = {};
  for (const [k, v] of res.units) cols[k] = v;
  const up = cols.upstream || cols.src || [], down = cols.downstream || cols.dst || [];
  const strip = (n) => String(n).replace(/\.(q|k|v)$/, "");
  const scores = Array.isArray(res.scores[0]) ? res.scores[0] : res.scores;
  const ids = [];
  const seen = new Set();
  for (const n of up.concat(down).map(strip)) if (!seen.has(n)) { seen.add(n); ids.push(n); }
  const nLayers = (res.meta && res.meta.n_layers) || Math.max(0, ...ids.map((n) => componentPlace(n, 0).layer)) + 1;
  const places = ids.map((n) => componentPlace(n, nLayers));
  return {
    kind: "graph", id: res.id, method: res.method, target: res.target, model_id: res.model_id, meta: {},
    fromUnits: true,
    nodes: { id: ids, layer: places.map((p) => p.layer), position: places.map((p) => p.x) },
    edges: { source: up.map(strip), target: down.map(strip), weight: scores.map((s) => s ?? 0),
      unit: up.map((_, i) => i), label: up.map((u, i) => `${u} → ${down[i]}`) },
  };
}

function numericLayer(v, maxLayer) {
  if (typeof v === "number") return v;
  const n = Number(v);
  if (Number.isFinite(n)) return n;
  if (v === "E" || v === "embed") return -1;
  return maxLayer + 1;
}

function layout(g) {
  const n = g.nodes.id.length;
  const layers = g.nodes.layer || new Array(n).fill(0);
  const pos = g.nodes.position || g.nodes.ctx_idx || new Array(n).fill(0);
  const finite = layers.map(Number).filter(Number.isFinite);
  const maxLayer = finite.length ? Math.max(...finite) : 0;
  // several nodes at one (layer, position): spread them sideways
  const slot = new Map();
  return g.nodes.id.map((id, i) => {
    const L = numericLayer(layers[i], maxLayer);
    const P = Number(pos[i]) || 0;
    const key = `${L}|${P}`;
    const k = slot.get(key) || 0;
    slot.set(key, k + 1);
    return { x: P * 120 + k * 18, y: -L * 90 + k * 6 };
  });
}

function nodeLabel(g, i) {
  const keys = ["clerp", "token", "feature_label", "label"];
  for (const k of keys) if (g.nodes[k] && g.nodes[k][i] !== undefined && g.nodes[k][i] !== null && g.nodes[k][i] !== "")
    return visible(`${g.nodes.id[i]} ${g.nodes[k][i]}`).slice(0, 60);
  return visible(g.nodes.id[i]);
}

// graphs with more nodes than this label a node only when hovered or pinned
const LABEL_ALL_NODES = 500;
// graphs with more edges than this draw edges as "haystack" lines without
// arrowheads (Cytoscape's cheapest edges; edges run up the layers anyway)
const FAST_EDGES = 2000;
// edge widths come in this many steps above the thinnest (one style class each)
const WIDTH_CLASSES = 10;

function hasWebGL2() {
  try { return Boolean(document.createElement("canvas").getContext("webgl2")); } catch (e) { return false; }
}

// Cytoscape's 2-D canvas renderer, or its WebGL one with `?renderer=webgl` in
// the page URL (when the browser has WebGL 2). Not the default: with software
// WebGL (headless Chromium, SwiftShader) it drew large graphs about 1.5-2x slower
// than the canvas (benchmarks/RESULTS.md)
function chooseRenderer() {
  const asked = new URLSearchParams(window.location.search).get("renderer");
  return asked === "webgl" && hasWebGL2() ? "webgl" : "canvas";
}

// Only the edges at or above the threshold (and the nodes they touch, and the
// pinned nodes) are elements of the Cytoscape graph: edges are kept sorted by
// |weight|, so the shown set is always a prefix of that order and a new
// threshold adds or removes only the edges between the old and new prefix
// length (one cy.add of an array / one cy.remove in one batch). Positions are
// preset (layer x position), styles are by class (edge widths in 10 steps, not
// a per-edge data mapping), no layout runs; slider input is coalesced to one
// update per animation frame.
export function renderGraph(g, ctx) {
  const t0 = performance.now();
  const box = el("div", { class: "view view-graph", data: { view: "graph" } });
  const n = g.nodes.id.length, m = g.edges.source.length;
  const absW = new Float64Array(m);
  for (let j = 0; j < m; j++) absW[j] = Math.abs(Number(g.edges.weight[j]) || 0);
  const order = new Uint32Array(m);
  for (let j = 0; j < m; j++) order[j] = j;
  order.sort((a, b) => absW[b] - absW[a] || a - b);
  const maxW = m ? absW[order[0]] || 1 : 1;
  // the number of edges with |weight| >= t (binary search over the sorted order)
  const countAbove = (t) => {
    let lo = 0, hi = m;
    while (lo < hi) { const mid = (lo + hi) >> 1; if (absW[order[mid]] >= t) lo = mid + 1; else hi = mid; }
    return lo;
  };
  // default threshold: keep the strongest 300 edges (or all)
  let threshold = m > 300 ? absW[order[299]] : 0;
  const pins = ctx.pins;
  const renderer = chooseRenderer();
  const canvas = el("div", { class: "cy", data: { nodes: n, edges: m, renderer } });
  // Cytoscape's container is a child of .cy: Cytoscape watches its container's
  // attributes (a MutationObserver) and answers any change with a resize and a
  // full redraw, so the data-shown-* attributes set on every update live on .cy
  const host = el("div", { class: "cy-host" });
  canvas.append(host);
  const pane = el("div", { class: "subgraph" });
  const label = el("span", { class: "thr" });
  const slider = el("input", { type: "range", min: "0", max: "1000", value: String(Math.round(1000 * Math.sqrt(threshold / maxW))),
    "aria-label": "edge threshold" });
  const shown = el("span", { class: "count" });
  box.append(el("div", { class: "toolbar" }, "|weight| ≥ ", slider, " ", label, " ", shown,
    el("button", { type: "button", text: "clear pins", on: { click: () => { pins.clear(); update(); } } }),
    el("button", { type: "button", text: "fit", on: { click: () => cy && cy.fit(undefined, 20) } })),
    g.capped ? el("p", { class: "note capped", text: `the server sent the ${m} strongest of ${g.capped.n_edges} edges (|weight| ≥ ${fmt(g.capped.min_abs_weight)}) and their ${n} of ${g.capped.n_nodes} nodes` }) : "",
    el("div", { class: "graph-row" }, canvas, pane));

  const index = new Map();
  for (let i = 0; i < n; i++) index.set(String(g.nodes.id[i]), i);
  const srcIdx = new Int32Array(m), dstIdx = new Int32Array(m);
  for (let j = 0; j < m; j++) {
    srcIdx[j] = index.get(String(g.edges.source[j])) ?? -1;
    dstIdx[j] = index.get(String(g.edges.target[j])) ?? -1;
  }
  const place = layout(g);
  const labels = new Array(n);  // computed when a node is first added
  const degree = new Int32Array(n);  // shown edges touching each node
  const nodeEl = new Array(n).fill(null), edgeEl = new Array(m).fill(null);
  let nShown = 0;  // edges order[0 .. nShown) are in the graph
  let pinnedEls = new Set();  // the Cytoscape nodes that have the class "pinned"

  const hasCy = typeof window.cytoscape === "function";
  let cy = null;
  if (hasCy) {
    const many = n > LABEL_ALL_NODES;
    cy = window.cytoscape({
      container: host, elements: [], layout: { name: "preset" },
      renderer: renderer === "webgl" ? { name: "canvas", webgl: true } : { name: "canvas" },
      hideEdgesOnViewport: renderer === "canvas" && m > 5000, textureOnViewport: renderer === "canvas" && m > 5000, pixelRatio: 1,
      style: [
        { selector: "node", style: { label: many ? "" : "data(label)", "font-size": 9, width: 12, height: 12,
          "background-color": "#888", "text-valign": "top", color: "#222" } },
        { selector: "node.hover, node.pinned", style: { label: "data(label)", "z-index": 10 } },
        { selector: "node.pinned", style: { "background-color": "#ff9800", "border-width": 2, "border-color": "#333" } },
        { selector: "edge", style: m > FAST_EDGES
          ? { width: 0.5, "curve-style": "haystack", "haystack-radius": 0, opacity: 0.6, "line-color": "#d62728" }
          : { width: 0.5, "curve-style": "straight", "target-arrow-shape": "triangle",
            "arrow-scale": 0.6, opacity: 0.7, "line-color": "#d62728", "target-arrow-color": "#d62728" } },
        { selector: "edge.neg", style: { "line-color": "#1f77b4", "target-arrow-color": "#1f77b4" } },
        // widths by class (w1 .. w10), not a data mapping evaluated per edge
        ...Array.from({ length: WIDTH_CLASSES }, (_, k) => ({ selector: `edge.w${k + 1}`, style: { width: 0.5 + 5 * (k + 1) / WIDTH_CLASSES } })),
      ],
    });
    cy.on("tap", "node", (e) => {
      const id = e.target.id();
      if (pins.has(id)) pins.delete(id); else pins.add(id);
      update();
    });
    cy.on("mouseover", "node", (e) => e.target.addClass("hover"));
    cy.on("mouseout", "node", (e) => e.target.removeClass("hover"));
  } else {
    canvas.append(el("p", { class: "error", text: "Cytoscape.js did not load: the graph cannot be drawn" }));
  }

  const nodeDef = (i) => {
    if (labels[i] === undefined) labels[i] = nodeLabel(g, i);
    return { group: "nodes", data: { id: String(g.nodes.id[i]), label: labels[i] }, position: { ...place[i] } };
  };
  // width 0.5 + 5 |w| / max|w|, rounded to one of WIDTH_CLASSES steps (class wK)
  const edgeDef = (j) => {
    const k = Math.round(WIDTH_CLASSES * absW[j] / maxW);
    const cls = (g.edges.weight[j] < 0 ? "neg" : "") + (k > 0 ? ` w${Math.min(k, WIDTH_CLASSES)}` : "");
    return { group: "edges", classes: cls.trim(), data: {
      id: `e${j}`, source: String(g.nodes.id[srcIdx[j]]), target: String(g.nodes.id[dstIdx[j]]), w: g.edges.weight[j] } };
  };
  const wanted = (i) => degree[i] > 0 || pins.has(String(g.nodes.id[i]));

  // swap the shown edge set for the strongest k edges, and the nodes to match
  function showTop(k) {
    if (!cy) { nShown = k; return; }
    const addNodes = [], addEdges = [], gone = [];
    if (k > nShown) {
      for (let r = nShown; r < k; r++) {
        const j = order[r], a = srcIdx[j], b = dstIdx[j];
        if (a < 0 || b < 0) continue;
        for (const i of [a, b]) { if (degree[i]++ === 0 && !nodeEl[i]) { nodeEl[i] = true; addNodes.push(i); } }
        addEdges.push(j);
      }
    } else {
      for (let r = k; r < nShown; r++) {
        const j = order[r], a = srcIdx[j], b = dstIdx[j];
        if (a < 0 || b < 0) continue;
        gone.push(edgeEl[j]); edgeEl[j] = null;
        for (const i of [a, b]) { if (--degree[i] === 0 && !wanted(i)) { gone.push(nodeEl[i]); nodeEl[i] = null; } }
      }
    }
    for (const id of pins) {  // pinned nodes stay drawn
      const i = index.get(id);
      if (i !== undefined && !nodeEl[i]) { nodeEl[i] = true; addNodes.push(i); }
    }
    nShown = k;
    cy.batch(() => {
      if (gone.length) cy.remove(cy.collection(gone));
      if (addNodes.length || addEdges.length) {
        const added = cy.add(addNodes.map(nodeDef).concat(addEdges.map(edgeDef)));
        for (let q = 0; q < addNodes.length; q++) nodeEl[addNodes[q]] = added[q];
        for (let q = 0; q < addEdges.length; q++) edgeEl[addEdges[q]] = added[addNodes.length + q];
      }
      // nodes that only a pin kept
      const unpinned = [];
      for (let i = 0; i < n; i++) if (nodeEl[i] && degree[i] === 0 && !pins.has(String(g.nodes.id[i]))) { unpinned.push(nodeEl[i]); nodeEl[i] = null; }
      if (unpinned.length) cy.remove(cy.collection(unpinned));
      // re-mark only the nodes whose pin state changed (no scan of all nodes)
      const nowPinned = new Set();
      for (const id of pins) { const i = index.get(id); if (i !== undefined && nodeEl[i]) nowPinned.add(nodeEl[i]); }
      for (const e of pinnedEls) if (!nowPinned.has(e) && !e.removed()) e.removeClass("pinned");
      for (const e of nowPinned) if (!pinnedEls.has(e)) e.addClass("pinned");
      pinnedEls = nowPinned;
    });
  }

  function update() {
    label.textContent = fmt(threshold);
    showTop(countAbove(threshold));
    shown.textContent = `${nShown} of ${m} edges shown`;
    canvas.dataset.shownEdges = String(nShown);
    canvas.dataset.shownNodes = String(cy ? cy.nodes().length : 0);
    renderPane();
  }

  function renderPane() {
    clear(pane);
    pane.append(el("h4", { text: `pinned nodes (${pins.size})` }));
    pane.append(el("ul", { class: "pins" }, [...pins].map((id) => el("li", { text: visible(id) }))));
    const sub = [];
    if (pins.size) {
      const pinned = new Uint8Array(n);
      for (const id of pins) { const i = index.get(id); if (i !== undefined) pinned[i] = 1; }
      for (let j = 0; j < m; j++) if (srcIdx[j] >= 0 && dstIdx[j] >= 0 && pinned[srcIdx[j]] && pinned[dstIdx[j]]) sub.push(j);
    }
    pane.append(el("h4", { text: `selected subgraph: ${sub.length} edges` }));
    sub.sort((a, b) => absW[b] - absW[a]);
    pane.append(el("table", { class: "sub-edges" }, sub.slice(0, 200).map((j) =>
      el("tr", {}, el("td", { text: visible(g.edges.label ? g.edges.label[j] : `${g.edges.source[j]} → ${g.edges.target[j]}`) }),
        el("td", { class: "num", text: fmt(g.edges.weight[j]) })))));
    if (g.fromUnits && ctx.setSubgraph) ctx.setSubgraph(sub.map((j) => g.edges.unit[j]));
    else if (ctx.onPins) ctx.onPins();
  }

  // one update per animation frame at most: a drag fires many input events,
  // and each would otherwise add/remove elements and redraw in turn
  let pending = 0;
  slider.addEventListener("input", () => {
    if (pending) return;
    pending = requestAnimationFrame(() => {
      pending = 0;
      const t = Number(slider.value) / 1000;
      threshold = t * t * maxW;
      update();
    });
  });
  update();
  // the container gets its size once attached
  // data-render-ms: from the start of this function to the first frame after fit()
  requestAnimationFrame(() => {
    if (cy) { cy.resize(); cy.fit(undefined, 20); }
    requestAnimationFrame(() => { box.dataset.renderMs = String(Math.round(performance.now() - t0)); });
  });
  box.cy = cy;
  return box;
}
