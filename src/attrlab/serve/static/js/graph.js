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

export function renderGraph(g, ctx) {
  const t0 = performance.now();
  const box = el("div", { class: "view view-graph", data: { view: "graph" } });
  const n = g.nodes.id.length, m = g.edges.source.length;
  const weights = g.edges.weight.map((w) => Math.abs(w));
  const sorted = [...weights].sort((a, b) => b - a);
  const maxW = sorted[0] || 1;
  // default threshold: keep the strongest 300 edges (or all)
  let threshold = m > 300 ? sorted[299] : 0;
  const pins = ctx.pins;
  const canvas = el("div", { class: "cy", data: { nodes: n, edges: m } });
  const pane = el("div", { class: "subgraph" });
  const label = el("span", { class: "thr" });
  const slider = el("input", { type: "range", min: "0", max: "1000", value: String(Math.round(1000 * Math.sqrt(threshold / maxW))),
    "aria-label": "edge threshold" });
  const shown = el("span", { class: "count" });
  box.append(el("div", { class: "toolbar" }, "|weight| ≥ ", slider, " ", label, " ", shown,
    el("button", { type: "button", text: "clear pins", on: { click: () => { pins.clear(); update(); } } }),
    el("button", { type: "button", text: "fit", on: { click: () => cy && cy.fit() } })),
    g.capped ? el("p", { class: "note capped", text: `the server sent the ${m} strongest of ${g.capped.n_edges} edges (|weight| ≥ ${fmt(g.capped.min_abs_weight)}) and their ${n} of ${g.capped.n_nodes} nodes` }) : null,
    el("div", { class: "graph-row" }, canvas, pane));

  const hasCy = typeof window.cytoscape === "function";
  let cy = null;
  const place = layout(g);
  if (hasCy) {
    const elements = [];
    g.nodes.id.forEach((id, i) => elements.push({ group: "nodes", data: { id: String(id), label: nodeLabel(g, i) }, position: place[i] }));
    g.edges.source.forEach((s, j) => elements.push({ group: "edges", data: {
      id: `e${j}`, source: String(s), target: String(g.edges.target[j]), w: g.edges.weight[j],
      width: 0.5 + 5 * Math.abs(g.edges.weight[j]) / maxW } }));
    cy = window.cytoscape({
      container: canvas, elements, layout: { name: "preset" },
      hideEdgesOnViewport: m > 5000, textureOnViewport: m > 5000, pixelRatio: 1,
      style: [
        { selector: "node", style: { label: "data(label)", "font-size": 9, width: 12, height: 12,
          "min-zoomed-font-size": n > 500 ? 7 : 0,
          "background-color": "#888", "text-valign": "top", color: "#222" } },
        { selector: "node.pinned", style: { "background-color": "#ff9800", "border-width": 2, "border-color": "#333" } },
        { selector: "edge", style: { width: "data(width)", "curve-style": "straight", "target-arrow-shape": "triangle",
          "arrow-scale": 0.6, opacity: 0.7, "line-color": "#d62728", "target-arrow-color": "#d62728" } },
        { selector: "edge[w < 0]", style: { "line-color": "#1f77b4", "target-arrow-color": "#1f77b4" } },
        { selector: ".hidden", style: { display: "none" } },
      ],
    });
    cy.on("tap", "node", (e) => {
      const id = e.target.id();
      if (pins.has(id)) pins.delete(id); else pins.add(id);
      update();
    });
  } else {
    canvas.append(el("p", { class: "error", text: "Cytoscape.js did not load: the graph cannot be drawn" }));
  }

  function update() {
    label.textContent = fmt(threshold);
    const keep = new Set();
    let nEdges = 0;
    if (cy) {
      cy.batch(() => {
        cy.edges().forEach((e, j) => {
          const on = Math.abs(e.data("w")) >= threshold;
          if (on) { nEdges++; keep.add(e.data("source")); keep.add(e.data("target")); }
          e.toggleClass("hidden", !on);
        });
        cy.nodes().forEach((nd) => {
          nd.toggleClass("hidden", !keep.has(nd.id()) && !pins.has(nd.id()));
          nd.toggleClass("pinned", pins.has(nd.id()));
        });
      });
    }
    shown.textContent = `${nEdges} of ${m} edges shown`;
    renderPane();
  }

  function renderPane() {
    clear(pane);
    pane.append(el("h4", { text: `pinned nodes (${pins.size})` }));
    pane.append(el("ul", { class: "pins" }, [...pins].map((id) => el("li", { text: visible(id) }))));
    const sub = [];
    g.edges.source.forEach((s, j) => {
      if (pins.has(String(s)) && pins.has(String(g.edges.target[j]))) sub.push(j);
    });
    pane.append(el("h4", { text: `selected subgraph: ${sub.length} edges` }));
    sub.sort((a, b) => Math.abs(g.edges.weight[b]) - Math.abs(g.edges.weight[a]));
    pane.append(el("table", { class: "sub-edges" }, sub.slice(0, 200).map((j) =>
      el("tr", {}, el("td", { text: visible(g.edges.label ? g.edges.label[j] : `${g.edges.source[j]} → ${g.edges.target[j]}`) }),
        el("td", { class: "num", text: fmt(g.edges.weight[j]) })))));
    if (g.fromUnits && ctx.setSubgraph) ctx.setSubgraph(sub.map((j) => g.edges.unit[j]));
    else if (ctx.onPins) ctx.onPins();
  }

  slider.addEventListener("input", () => {
    const t = Number(slider.value) / 1000;
    threshold = t * t * maxW;
    update();
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
