// Views of one result, chosen by its kind. They read the JSON the server sends
// for an Attribution (units as [name, values] pairs, scores, rows, meta, extra)
// or a graph, and build DOM nodes with textContent only.
import { el, clear, svg, scoreColor, fmt, maxAbs, visible } from "./dom.js";
import { renderGraph, graphFromEdgeUnits } from "./graph.js";

export const VIEW_NAMES = ["auto", "tokens", "heatmap", "sources", "train", "lens", "graph", "table", "agreement"];

export function columns(res) {
  const cols = {};
  for (const [name, values] of res.units || []) cols[name] = values;
  return cols;
}

export function rowsOf(res) {
  const rows = {};
  for (const [name, values] of res.rows || []) rows[name] = values;
  return rows;
}

export function is2d(res) {
  return Array.isArray(res.scores) && Array.isArray(res.scores[0]);
}

// the scores of one row, or their mean over rows (null entries skipped)
export function rowScores(res, row) {
  if (!is2d(res)) return res.scores;
  if (row !== null && row !== undefined && row >= 0) return res.scores[row];
  const n = res.scores[0].length;
  const out = new Array(n).fill(null);
  for (let j = 0; j < n; j++) {
    let s = 0, c = 0;
    for (const r of res.scores) if (r[j] !== null) { s += r[j]; c++; }
    out[j] = c ? s / c : null;
  }
  return out;
}

export function unitLabel(res, i) {
  const parts = [];
  for (const [name, values] of res.units || []) {
    const v = values[i];
    if (name === "layer") parts.push(`L${v}`);
    else if (name === "head") parts.push(`H${v}`);
    else if (name === "position") parts.push(`@${v}`);
    else if (name === "special" || name === "segment" || name === "start" || name === "end") continue;
    else parts.push(typeof v === "string" ? JSON.stringify(v) : `${name}=${v}`);
  }
  return visible(parts.join(" "));
}

export function autoView(res) {
  if (res.kind === "graph") return "graph";
  const cols = columns(res);
  const kind = res.unit_kind;
  if (kind === "edges") return "graph";
  if ((res.method || "").includes("lens") && res.meta && res.meta.topk_tokens) return "lens";
  if (["tokens", "words", "sentences", "spans"].includes(kind)) return "tokens";
  if (kind === "sources") return "sources";
  if (kind === "train") return "train";
  if ("layer" in cols && ("head" in cols || "position" in cols)) return "heatmap";
  return "table";
}

// ---------------------------------------------------------------- tokens

function tokenTexts(res) {
  const cols = columns(res);
  return (cols.token || cols.text || []).map((t) => String(t));
}

// group token units into words or sentences (sums of their scores)
export function aggregate(texts, scores, level) {
  if (level === "tokens") return texts.map((t, i) => ({ text: t, score: scores[i], members: [i] }));
  const groups = [];
  let cur = null;
  texts.forEach((t, i) => {
    const startsWord = i === 0 || /^\s/.test(t) || /^[^\p{L}\p{N}]/u.test(t) ||
      (cur && /[^\p{L}\p{N}]$/u.test(cur.text));
    const startsSentence = i === 0 || (cur && /[.!?]\s*$/.test(cur.text));
    const start = level === "words" ? startsWord : startsSentence;
    if (!cur || start) { cur = { text: "", score: null, members: [] }; groups.push(cur); }
    cur.text += t;
    cur.members.push(i);
    const s = scores[i];
    if (s !== null && Number.isFinite(s)) cur.score = (cur.score || 0) + s;
  });
  return groups;
}

function tokenRow(parts, max, ctx, labelText) {
  const row = el("div", { class: "tok-row" });
  if (labelText !== undefined) row.append(el("span", { class: "row-label", text: visible(labelText) }));
  for (const p of parts) {
    const chip = el("span", {
      class: "tok" + (p.members.some((m) => ctx.selection.has(m)) ? " selected" : ""),
      title: `${visible(p.text)}: ${fmt(p.score)}`,
      style: { backgroundColor: scoreColor(p.score, max) },
      text: visible(p.text),
      data: { units: p.members.join(",") },
    });
    chip.addEventListener("click", () => ctx.toggle(p.members));
    row.append(chip);
  }
  return row;
}

function tokensView(res, ctx) {
  const box = el("div", { class: "view view-tokens", data: { view: "tokens" } });
  const texts = tokenTexts(res);
  const canAggregate = res.unit_kind === "tokens";
  const level = canAggregate ? ctx.state.level || "tokens" : "tokens";
  if (canAggregate) {
    const bar = el("div", { class: "toolbar" }, "aggregate: ");
    for (const lv of ["tokens", "words", "sentences"]) {
      bar.append(el("label", {}, el("input", {
        type: "radio", name: "agg", value: lv, checked: lv === level,
        on: { change: () => { ctx.state.level = lv; ctx.rerender(); } },
      }), lv));
    }
    box.append(bar);
  }
  if (is2d(res)) {
    const rows = rowsOf(res);
    const labels = rows.token || res.scores.map((_, i) => `row ${i}`);
    const max = maxAbs(res.scores.flat());
    box.append(el("p", { class: "note", text: "one row per generated token: which earlier tokens it depends on" }));
    res.scores.forEach((r, i) => box.append(tokenRow(aggregate(texts, r, level), max, ctx, labels[i])));
  } else {
    const s = res.scores;
    box.append(tokenRow(aggregate(texts, s, level), maxAbs(s), ctx));
  }
  box.append(legend());
  return box;
}

function legend() {
  return el("div", { class: "legend" },
    el("span", { class: "swatch", style: { backgroundColor: scoreColor(1, 1) } }), " supports the target  ",
    el("span", { class: "swatch", style: { backgroundColor: scoreColor(-1, 1) } }), " works against it  (click units to select them)");
}

// ---------------------------------------------------------------- heatmaps

function heatmapView(res, ctx) {
  const cols = columns(res);
  const s = rowScores(res, ctx.state.row);
  const max = maxAbs(s);
  const n = s.length;
  let rowKey, colKey;
  if ("head" in cols && "position" in cols) {
    rowKey = (i) => `L${cols.layer[i]}H${cols.head[i]}`;
    colKey = (i) => cols.position[i];
  } else if ("head" in cols) {
    rowKey = (i) => `L${cols.layer[i]}`;
    colKey = (i) => `H${cols.head[i]}`;
  } else {
    rowKey = (i) => `L${cols.layer[i]}`;
    colKey = (i) => cols.position[i];
  }
  const rowKeys = [], colKeys = [], cell = new Map();
  for (let i = 0; i < n; i++) {
    const r = rowKey(i), c = colKey(i);
    if (!rowKeys.includes(r)) rowKeys.push(r);
    if (!colKeys.includes(c)) colKeys.push(c);
    cell.set(`${r}|${c}`, i);
  }
  const toks = (res.meta && (res.meta.tokens || res.meta.prompt_tokens)) || null;
  const table = el("table", { class: "heatmap" });
  const head = el("tr", {}, el("th", { text: "" }));
  for (const c of colKeys) {
    const tok = typeof c === "number" && toks && toks[c] !== undefined ? ` ${visible(toks[c])}` : "";
    head.append(el("th", { text: (typeof c === "number" ? `@${c}` : c) + tok }));
  }
  table.append(head);
  for (const r of rowKeys) {
    const tr = el("tr", {}, el("th", { text: r }));
    for (const c of colKeys) {
      const i = cell.get(`${r}|${c}`);
      if (i === undefined) { tr.append(el("td", { class: "empty" })); continue; }
      const td = el("td", {
        class: "cell" + (ctx.selection.has(i) ? " selected" : ""),
        title: `${unitLabel(res, i)}: ${fmt(s[i])}`,
        style: { backgroundColor: scoreColor(s[i], max) },
        text: fmt(s[i], 2),
        data: { unit: i },
      });
      td.addEventListener("click", () => ctx.toggle([i]));
      tr.append(td);
    }
    table.append(tr);
  }
  return el("div", { class: "view view-heatmap", data: { view: "heatmap" } }, rowPicker(res, ctx), table, legend());
}

function rowPicker(res, ctx) {
  if (!is2d(res)) return null;
  const rows = rowsOf(res);
  const labels = rows.token || res.scores.map((_, i) => `row ${i}`);
  const sel = el("select", { on: { change: (e) => { ctx.state.row = Number(e.target.value); ctx.rerender(); } } },
    el("option", { value: "-1", text: "mean over rows", selected: ctx.state.row === -1 || ctx.state.row === undefined }),
    labels.map((l, i) => el("option", { value: String(i), text: visible(l), selected: ctx.state.row === i })));
  return el("div", { class: "toolbar" }, "target row: ", sel);
}

// ---------------------------------------------------------------- sources, training data

function sourcesView(res, ctx) {
  const cols = columns(res);
  const s = rowScores(res, ctx.state.row);
  const max = maxAbs(s);
  const texts = cols.text || cols.source || [];
  const box = el("div", { class: "view view-sources", data: { view: "sources" } }, rowPicker(res, ctx));
  if (res.meta && typeof res.meta.response === "string") {
    box.append(el("p", { class: "note" }, "response: ", el("q", { text: visible(res.meta.response) })));
  }
  texts.forEach((t, i) => {
    const p = el("div", {
      class: "source" + (ctx.selection.has(i) ? " selected" : ""),
      style: { backgroundColor: scoreColor(s[i], max) },
      data: { unit: i },
    }, el("span", { class: "score", text: fmt(s[i]) }), " ", el("span", { text: visible(t) }));
    p.addEventListener("click", () => ctx.toggle([i]));
    box.append(p);
  });
  return box;
}

function trainView(res, ctx) {
  const cols = columns(res);
  const s = rowScores(res, ctx.state.row);
  const order = s.map((v, i) => i).sort((a, b) => (s[b] ?? -Infinity) - (s[a] ?? -Infinity));
  const k = Math.min(order.length, ctx.state.k || 50);
  const ol = el("ol", { class: "ranked" });
  const show = order.slice(0, k).concat(order.length > 2 * k ? order.slice(-Math.min(10, k)) : []);
  show.forEach((i, j) => {
    if (j === k) ol.append(el("li", { class: "gap", text: "… most opposing:" }));
    ol.append(el("li", { data: { unit: i } },
      el("span", { class: "score", text: fmt(s[i]) }), " ",
      el("span", { class: "id", text: `#${visible(cols.id ? cols.id[i] : i)}` }), " ",
      el("span", { class: "text", text: visible(cols.text ? cols.text[i] : "") })));
  });
  return el("div", { class: "view view-train", data: { view: "train" } }, rowPicker(res, ctx),
    el("p", { class: "note", text: `training examples ranked by score (top ${k} of ${order.length})` }), ol);
}

// ---------------------------------------------------------------- logit lens

function lensView(res) {
  const cols = columns(res);
  const meta = res.meta || {};
  const topk = meta.topk_tokens || [];
  const lp = res.extra && res.extra.topk_logprobs;
  const rank = res.extra && res.extra.rank;
  const kl = res.extra && res.extra.kl_to_final;
  const k = topk[0] ? topk[0].length : 0;
  const table = el("table", { class: "lens" });
  table.append(el("tr", {}, el("th", { text: "layer" }), el("th", { text: "site" }),
    el("th", { text: `score (${visible(res.target || "target")})` }), el("th", { text: "rank" }),
    el("th", { text: "KL to final" }), el("th", { text: `top ${k} tokens (log-prob)` })));
  const s = rowScores(res, null);
  for (let i = 0; i < s.length; i++) {
    const toks = (topk[i] || []).map((t, j) => {
      const v = lp && lp.values ? lp.values[i * k + j] : null;
      return el("span", { class: "lens-tok", text: `${visible(t)} ${v === null || v === undefined ? "" : fmt(v, 2)}` });
    });
    table.append(el("tr", {},
      el("td", { text: cols.layer ? cols.layer[i] : i }),
      el("td", { text: cols.site ? visible(cols.site[i]) : "" }),
      el("td", { text: fmt(s[i]) }),
      el("td", { text: rank && rank.values ? fmt(rank.values[i], 0) : "–" }),
      el("td", { text: kl && kl.values ? fmt(kl.values[i]) : "–" }),
      el("td", {}, toks)));
  }
  return el("div", { class: "view view-lens", data: { view: "lens" } }, table);
}

// ---------------------------------------------------------------- ranked table (every attribution)

export function unitsTable(res, ctx, k = 30) {
  const s = rowScores(res, ctx.state.row);
  const order = s.map((v, i) => i).sort((a, b) => Math.abs(s[b] ?? 0) - Math.abs(s[a] ?? 0)).slice(0, k);
  const max = maxAbs(s);
  const table = el("table", { class: "units" });
  table.append(el("tr", {}, el("th", { text: "select" }), el("th", { text: "unit" }), el("th", { text: "score" })));
  for (const i of order) {
    table.append(el("tr", { data: { unit: i } },
      el("td", {}, el("input", { type: "checkbox", checked: ctx.selection.has(i), "aria-label": `select unit ${i}`,
        on: { change: () => ctx.toggle([i]) } })),
      el("td", { text: unitLabel(res, i) }),
      el("td", { class: "num", style: { backgroundColor: scoreColor(s[i], max) }, text: fmt(s[i]) })));
  }
  return el("div", { class: "view view-table", data: { view: "table" } },
    el("p", { class: "note", text: `top ${order.length} of ${s.length} units by |score|` }), table);
}

// ---------------------------------------------------------------- method agreement

export function agreementView(cmp) {
  const W = 320, H = 320, P = 36;
  const xs = cmp.scores_a, ys = cmp.scores_b;
  const mx = maxAbs(xs) || 1, my = maxAbs(ys) || 1;
  const X = (v) => P + ((v + mx) / (2 * mx)) * (W - 2 * P);
  const Y = (v) => H - P - ((v + my) / (2 * my)) * (H - 2 * P);
  const top = new Set([...cmp.top_a, ...cmp.top_b]);
  const plot = svg("svg", { width: W, height: H, class: "scatter", viewBox: `0 0 ${W} ${H}` },
    svg("line", { x1: P, y1: Y(0), x2: W - P, y2: Y(0), class: "axis" }),
    svg("line", { x1: X(0), y1: P, x2: X(0), y2: H - P, class: "axis" }),
    svg("text", { x: W / 2, y: H - 6, "text-anchor": "middle", text: visible(cmp.method_a) }),
    svg("text", { x: 10, y: H / 2, transform: `rotate(-90 10 ${H / 2})`, "text-anchor": "middle", text: visible(cmp.method_b) }),
    xs.map((x, i) => svg("circle", { cx: X(x), cy: Y(ys[i]), r: top.has(i) ? 4 : 2.5, class: top.has(i) ? "pt top" : "pt" },
      svg("title", { text: `${visible(cmp.labels[i])}: ${fmt(x)} / ${fmt(ys[i])}` }))));
  const list = (idx, name) => el("div", { class: "topk" }, el("h4", { text: `top ${cmp.k}: ${visible(name)}` }),
    el("ol", {}, idx.map((i) => el("li", { class: cmp.top_a.includes(i) && cmp.top_b.includes(i) ? "both" : "", text: visible(cmp.labels[i]) }))));
  return el("div", { class: "view view-agreement", data: { view: "agreement" } },
    el("p", { class: "metrics", text: `Spearman ${fmt(cmp.spearman, 3)} · Pearson ${fmt(cmp.pearson, 3)} · top-${cmp.k} overlap ${cmp.overlap}/${cmp.k} (Jaccard ${fmt(cmp.jaccard, 3)}) · ${cmp.n_units} shared units` }),
    el("div", { class: "agree-row" }, plot, list(cmp.top_a, cmp.method_a), list(cmp.top_b, cmp.method_b)));
}

// ---------------------------------------------------------------- diff of two results

export function diffView(d, nameA, nameB) {
  const vals = d.difference.filter((v) => v !== null);
  const max = maxAbs(vals);
  const maxS = maxAbs(d.scores_a.concat(d.scores_b).filter((v) => v !== null));
  const byPos = d.mode === "positions";
  const largest = new Set(d.largest);
  const table = el("table", { class: "diff-table" });
  table.append(el("tr", {}, el("th", { text: "unit" }),
    byPos ? [el("th", { text: "A text" }), el("th", { text: "B text" })] : null,
    el("th", { text: `A: ${visible(d.method_a)}` }), el("th", { text: `B: ${visible(d.method_b)}` }),
    el("th", { text: "B − A" })));
  d.labels.forEach((label, i) => {
    const differs = byPos && d.text_a[i] !== d.text_b[i];
    table.append(el("tr", { class: (largest.has(i) ? "largest" : "") + (differs ? " differs" : ""), data: { unit: i } },
      el("td", { text: visible(label) }),
      byPos ? [el("td", { class: "tok-cell", text: d.text_a[i] === null ? "–" : visible(d.text_a[i]) }),
        el("td", { class: "tok-cell", text: d.text_b[i] === null ? "–" : visible(d.text_b[i]) })] : null,
      el("td", { class: "num", style: { backgroundColor: scoreColor(d.scores_a[i], maxS) }, text: fmt(d.scores_a[i]) }),
      el("td", { class: "num", style: { backgroundColor: scoreColor(d.scores_b[i], maxS) }, text: fmt(d.scores_b[i]) }),
      el("td", { class: "num diff-cell", style: { backgroundColor: scoreColor(d.difference[i], max) }, text: fmt(d.difference[i]) })));
  });
  return el("div", { class: "view view-diff", data: { view: "diff", mode: d.mode } },
    el("h3", { text: `diff: ${visible(nameB || "B")} − ${visible(nameA || "A")}` }),
    el("p", { class: byPos ? "diff-note warn" : "diff-note note", text: visible(d.note) }),
    d.prompt_a !== null || d.prompt_b !== null ? el("p", { class: "note" }, "A: ", el("q", { text: visible(d.prompt_a ?? "–") }),
      " · B: ", el("q", { text: visible(d.prompt_b ?? "–") })) : null,
    table);
}

// ---------------------------------------------------------------- dispatch

export function header(res) {
  const shape = res.kind === "graph" ? `${res.nodes.id.length} nodes, ${res.edges.source.length} edges`
    : `${res.unit_kind} × ${res.shape.join(" × ")}`;
  return el("div", { class: "result-head" },
    el("h2", { text: visible(res.id || "result") }),
    el("p", { class: "meta" },
      el("b", { text: visible(res.method || "") }), " · ", shape, " · target ", el("code", { text: visible(res.target || "–") }),
      res.model_id ? [" · model ", el("code", { text: visible(res.model_id) })] : null),
    res.meta && typeof res.meta.prompt === "string"
      ? el("p", { class: "prompt" }, "prompt: ", el("q", { text: visible(res.meta.prompt) })) : null,
    res.diagnostics && Object.keys(res.diagnostics).length
      ? el("details", {}, el("summary", { text: "diagnostics" }), el("pre", { text: visible(JSON.stringify(res.diagnostics, null, 1)) })) : null);
}

export function renderView(container, res, ctx, view) {
  clear(container);
  const v = view === "auto" || !view ? autoView(res) : view;
  container.append(header(res));
  if (v === "graph") {
    const g = res.kind === "graph" ? res : graphFromEdgeUnits(res);
    container.append(renderGraph(g, ctx));
  } else if (v === "tokens") container.append(tokensView(res, ctx));
  else if (v === "heatmap") container.append(heatmapView(res, ctx));
  else if (v === "sources") container.append(sourcesView(res, ctx));
  else if (v === "train") container.append(trainView(res, ctx));
  else if (v === "lens") container.append(lensView(res));
  if (res.kind !== "graph" && v !== "table") container.append(el("h3", { text: "strongest units" }));
  if (res.kind !== "graph") container.append(unitsTable(res, ctx));
  return v;
}
