// The explorer's shell: the results list, the view of the chosen result, the
// selection with its live causal check, method agreement, new attributions as
// background jobs, and static export. A page that carries its data inline
// (an exported file) shows that one view and talks to no server.
import { el, clear, fmt, visible } from "./dom.js";
import { api, exportUrl } from "./api.js";
import { renderView, autoView, agreementView, diffView, unitLabel, VIEW_NAMES } from "./views.js";

const state = { info: null, results: [], current: null, view: "auto", other: null, cmp: null };
const ctx = {
  selection: new Set(), pins: new Set(), state: {},
  toggle: (ids) => {
    const allIn = ids.every((i) => ctx.selection.has(i));
    for (const i of ids) { if (allIn) ctx.selection.delete(i); else ctx.selection.add(i); }
    ctx.rerender();
  },
  setSubgraph: (units) => { ctx.subgraph = units; renderSelection(); },
  onPins: () => { if (state.current && state.current.kind === "graph") renderSelection(); },
  rerender: () => draw(),
  subgraph: [],
};

const $ = (id) => document.getElementById(id);
// the most edges of a graph the page asks for (a 100,000-edge graph draws in ~1 s: benchmarks/RESULTS.md)
const MAX_EDGES = 200000;

function showError(where, e) {
  clear(where);
  where.append(el("div", { class: "error", role: "alert" },
    el("b", { text: e.type ? `${e.type}: ` : "error: " }), visible(e.message || String(e))));
}

// ---------------------------------------------------------------- results list

async function loadList() {
  const list = $("results");
  try {
    state.results = await api("/api/results");
  } catch (e) { showError(list, e); return; }
  clear(list);
  if (!state.results.length) list.append(el("p", { class: "note", text: "no results yet: run an attribution below, or save .attr files into the results directory" }));
  for (const r of state.results) {
    const item = el("li", { class: r.error ? "bad" : "", data: { id: r.id } },
      el("button", { type: "button", class: "link", text: visible(r.id), disabled: Boolean(r.error),
        on: { click: () => open(r.id) } }),
      el("span", { class: "sub", text: r.error ? visible(r.error) : `${visible(r.method)} · ${visible(r.unit_kind)}` }));
    list.append(item);
  }
  fillOther();
}

async function open(id) {
  const main = $("view");
  try {
    // graphs: the server sends the strongest MAX_EDGES edges (?max_edges=0 in the URL: all)
    const cap = new URLSearchParams(window.location.search).get("max_edges") ?? String(MAX_EDGES);
    const q = cap !== "0" ? `?${new URLSearchParams({ max_edges: cap })}` : "";
    state.current = await api(`/api/results/${id.split("/").map(encodeURIComponent).join("/")}${q}`);
  } catch (e) { showError(main, e); return; }
  ctx.selection.clear(); ctx.pins.clear(); ctx.subgraph = []; ctx.state = {};
  state.view = "auto"; state.cmp = null; state.diff = null; state.diffWith = null;
  checkForm.counterfactual = null;
  fillViews(); fillOther();
  draw();
}

function fillViews() {
  const sel = $("view-select");
  clear(sel);
  for (const v of VIEW_NAMES.filter((x) => x !== "agreement"))
    sel.append(el("option", { value: v, text: v, selected: v === state.view }));
}

function fillOther() {
  for (const [id, first, chosen] of [["other-select", "compare with …", state.other], ["diff-select", "diff with …", state.diffWith]]) {
    const sel = $(id);
    if (!sel) continue;
    clear(sel);
    sel.append(el("option", { value: "", text: first }));
    const cur = state.current;
    for (const r of state.results) {
      if (!cur || r.error || r.kind !== "attribution" || r.id === cur.id || r.unit_kind !== cur.unit_kind) continue;
      sel.append(el("option", { value: r.id, text: `${visible(r.id)} (${visible(r.method)})`, selected: r.id === chosen }));
    }
  }
}

async function diffWith(id) {
  state.diffWith = id || null;
  state.diff = null;
  if (id && state.current) {
    try {
      state.diff = await api(`/api/diff?${new URLSearchParams({ a: state.current.id, b: id })}`);
    } catch (e) { showError($("diff"), e); return; }
  }
  draw();
}

function renderDiff() {
  const box = $("diff");
  if (!box) return;
  clear(box);
  if (state.diff) box.append(diffView(state.diff, state.current.id, state.diffWith));
}

function draw() {
  const main = $("view");
  if (!state.current) return;
  state.shownView = renderView(main, state.current, ctx, state.view);
  renderSelection();
  renderAgreement();
  renderDiff();
  const link = $("export-link");
  if (link) link.href = exportUrl(state.current.id, state.view, state.cmp ? state.other : null);
}

// ---------------------------------------------------------------- selection and live check

function selectedUnits() {
  if (ctx.selection.size) return [...ctx.selection].sort((a, b) => a - b);
  return ctx.subgraph || [];
}

// the live-check form keeps its values across re-renders (pins re-render it)
const checkForm = { op: "ablate", counterfactual: null, steerOp: "add", value: "1", ablation: "" };

function checkControls(res, ops) {
  if (!ops.includes(checkForm.op)) checkForm.op = ops[0];
  if (checkForm.counterfactual === null) {
    const q = res.meta && res.meta.question;
    checkForm.counterfactual = (q && typeof q.counterfactual === "string") ? q.counterfactual : "";
  }
  const op = el("select", { id: "check-op", "aria-label": "check" },
    ops.map((o) => el("option", { value: o, text: o, selected: o === checkForm.op })));
  const cf = el("input", { id: "check-cf", type: "text", value: checkForm.counterfactual,
    placeholder: "counterfactual prompt to patch from (same token length)" });
  const steerOp = el("select", { id: "steer-op", "aria-label": "steer operation" },
    ["add", "set", "scale"].map((o) => el("option", { value: o, text: o, selected: o === checkForm.steerOp })));
  const value = el("input", { id: "steer-value", type: "number", step: "any", value: checkForm.value, "aria-label": "steer value" });
  const abl = el("select", { id: "ablation", "aria-label": "ablation" }, el("option", { value: "", text: "the result's own ablation" }),
    (state.info ? state.info.ablations : []).map((a) => el("option", { value: a, text: a, selected: a === checkForm.ablation })));
  const sync = () => {
    checkForm.op = op.value; checkForm.counterfactual = cf.value; checkForm.steerOp = steerOp.value;
    checkForm.value = value.value; checkForm.ablation = abl.value;
    cfBox.hidden = op.value !== "patch";
    steerBox.hidden = op.value !== "steer";
    ablBox.hidden = op.value !== "ablate" || res.kind === "graph";
  };
  const cfBox = el("label", { class: "check-field" }, "from ", cf);
  const steerBox = el("span", { class: "check-field" }, steerOp, " value ", value);
  const ablBox = el("span", { class: "check-field" }, abl);
  for (const n of [op, cf, steerOp, value, abl]) { n.addEventListener("change", sync); n.addEventListener("input", sync); }
  sync();
  return { nodes: [op, " ", ablBox, cfBox, steerBox],
    body: () => {
      const b = { op: op.value };
      if (op.value === "patch" && cf.value) b.counterfactual = cf.value;
      if (op.value === "steer") { b.steer_op = steerOp.value; b.value = Number(value.value); }
      if (op.value === "ablate" && abl.value && res.kind !== "graph") b.ablation = abl.value;
      return b;
    } };
}

function renderSelection() {
  const box = $("selection");
  if (!box || !state.current) return;
  clear(box);
  const res = state.current;
  const isGraph = res.kind === "graph";
  const gk = isGraph ? graphKind(res) : null;
  if (isGraph && !gk) {
    box.append(el("p", { class: "note", text: "this graph carries no prompt ids and target: pin nodes to inspect a subgraph (live checks run on attrlab route graphs and attribution graphs)" }));
    return;
  }
  const units = isGraph ? [...ctx.pins] : selectedUnits();
  const what = isGraph ? "pinned node" : "unit";
  box.append(el("h3", { text: `selection: ${units.length} ${what}${units.length === 1 ? "" : "s"}` }));
  box.append(el("p", { class: "sel-labels", text: (isGraph ? units.map((u) => visible(u)) : units.map((i) => unitLabel(res, i))).slice(0, 30).join(", ") + (units.length > 30 ? " …" : "") }));
  if (isGraph) box.append(el("p", { class: "note", text: gk === "attribution_graph"
    ? "pinned feature nodes are the units (errors kept, as graph faithfulness keeps them)" + (state.info && state.info.transcoders ? "" : "; the server has no transcoders: start it with --transcoders DIR")
    : "the attention and MLP edges among the pinned nodes name the components (head or MLP output at a position)" }));
  const hasModel = state.info && state.info.model;
  const ops = gk === "attribution_graph" ? ["ablate", "patch", "steer"] : ["ablate", "patch"];
  const form = checkControls(res, ops);
  const out = el("div", { id: "check-out" });
  const btn = el("button", { type: "button", id: "check-btn", text: "run check", disabled: !hasModel || !units.length,
    on: { click: async () => {
      btn.disabled = true;
      const t0 = performance.now();
      try {
        const r = await api("/api/check", { id: res.id, select: units, ...form.body() });
        const rt = performance.now() - t0;
        clear(out);
        const after = { ablate: "selection ablated", patch: "selection patched", steer: "selection steered" }[r.op] || r.op;
        out.append(el("table", { class: "check", data: { op: r.op } },
          row("metric, clean run", r.metric_clean, "clean"),
          row(`metric, ${after}`, r.metric_ablated, "after"),
          row("change (measured)", r.change, "change"),
          r.predicted_change !== undefined ? row("change predicted by the scores", r.predicted_change) : null,
          r.metric_selection_only !== undefined ? row(`metric, only the selection kept (rest ${r.op === "patch" ? "patched" : "ablated"})`, r.metric_selection_only) : null,
          r.metric_none !== undefined ? row(`metric, every unit ${r.op === "patch" ? "patched" : "ablated"}`, r.metric_none) : null,
          r.faithfulness !== undefined ? row("faithfulness of the selection", r.faithfulness, "faithfulness") : null,
          r.components ? row("components", r.components.join(", ")) : null,
          r.ignored && r.ignored.length ? row("pinned but not interventions", r.ignored.join(", ")) : null,
          r.op === "steer" ? row("edit", `${r.steer_op} ${fmt(r.value)}`) : row("ablation", r.ablation || "default"),
          row("round trip", `${fmt(rt, 0)} ms (server ${fmt(r.server_ms, 0)} ms)`)));
      } catch (e) { showError(out, e); }
      btn.disabled = false;
    } } });
  box.append(el("div", { class: "toolbar" }, form.nodes, " ", btn,
    el("button", { type: "button", text: "clear", on: { click: () => { ctx.selection.clear(); ctx.pins.clear(); draw(); } } })));
  if (!hasModel) box.append(el("p", { class: "note", text: "start the server with --model (e.g. zoo:ioi) to run live checks" }));
  box.append(out);
}

function graphKind(res) {
  const meta = res.meta || {};
  if (res.method === "attribution_graph" && "ids" in meta && "target_id" in meta) return "attribution_graph";
  if (res.method === "routes") return "routes";
  return null;
}

function row(name, value, key) {
  return el("tr", { data: key ? { key } : {} }, el("th", { text: name }),
    el("td", { class: "num", text: typeof value === "number" ? fmt(value, 5) : visible(value ?? "–") }));
}

// ---------------------------------------------------------------- agreement

async function renderAgreement() {
  const box = $("agreement");
  if (!box) return;
  clear(box);
  if (!state.cmp) return;
  box.append(agreementView(state.cmp));
}

async function compareWith(id) {
  state.other = id || null;
  state.cmp = null;
  if (id && state.current) {
    try {
      state.cmp = await api(`/api/compare?${new URLSearchParams({ a: state.current.id, b: id, k: "10" })}`);
    } catch (e) { showError($("agreement"), e); return; }
  }
  draw();
}

// ---------------------------------------------------------------- new attribution (jobs)

function runForm() {
  const box = $("run");
  clear(box);
  const info = state.info;
  if (!info.model) {
    box.append(el("p", { class: "note", text: "no model loaded: start with --model NAME or zoo:TASK to run attributions" }));
    return;
  }
  const methods = Object.keys(info.methods).sort();
  const method = el("select", { name: "method" }, methods.map((m) => el("option", { value: m, text: m, selected: m === "ig" })));
  const units = el("select", { name: "units" });
  const fillUnits = () => {
    clear(units);
    for (const u of info.methods[method.value] || []) units.append(el("option", { value: u, text: u }));
  };
  method.addEventListener("change", fillUnits);
  fillUnits();
  const input = (name, ph) => el("input", { name, type: "text", placeholder: ph });
  const prompt = el("textarea", { name: "prompt", rows: "3", placeholder: "prompt" });
  const target = input("target", "target token, e.g. \" Mary\" (empty: top prediction)");
  const c1 = input("contrast_a", "or contrast: answer"), c2 = input("contrast_b", "wrong answer");
  const cf = input("counterfactual", "counterfactual prompt (optional)");
  const abl = el("select", { name: "ablation" }, el("option", { value: "", text: "default ablation" }),
    info.ablations.map((a) => el("option", { value: a, text: a })));
  const opts = input("options", "method options as JSON, e.g. {\"steps\": 16}");
  const msg = el("div", { class: "job-msg" });
  const submit = el("button", { type: "submit", text: "run" });
  const form = el("form", { class: "run-form" }, el("label", {}, "method ", method), el("label", {}, "units ", units),
    prompt, target, el("div", { class: "pair" }, c1, c2), cf, el("label", {}, "ablation ", abl), opts, submit, msg);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clear(msg);
    let options = {};
    if (opts.value.trim()) {
      try { options = JSON.parse(opts.value); } catch (e) { showError(msg, { type: "InputError", message: `options are not JSON: ${e.message}` }); return; }
    }
    const body = { prompt: prompt.value, method: method.value, units: units.value, options };
    if (target.value) body.target = target.value;
    if (c1.value || c2.value) body.contrast = [c1.value, c2.value];
    if (cf.value) body.counterfactual = cf.value;
    if (abl.value) body.ablation = abl.value;
    try {
      const job = await api("/api/jobs", body);
      poll(job.id, msg);
    } catch (e) { showError(msg, e); }
  });
  box.append(form);
}

async function poll(id, msg) {
  let job;
  try { job = await api(`/api/jobs/${encodeURIComponent(id)}`); } catch (e) { showError(msg, e); return; }
  clear(msg);
  if (job.state === "error") { showError(msg, { type: job.error_type, message: job.error }); return; }
  const frac = job.fraction || 0;
  msg.append(el("p", { class: "note", text: `${visible(job.title)}: ${job.state} (${visible(job.stage)}, ${fmt(job.elapsed_s, 1)} s)` }),
    el("progress", { class: "job-progress", max: "1", value: String(frac), "aria-label": "job progress" }),
    el("span", { class: "job-fraction", text: ` ${Math.round(100 * frac)}%` }));
  if (job.state === "done") { await loadList(); await open(job.result_id); return; }
  setTimeout(() => poll(id, msg), 400);
}

// ---------------------------------------------------------------- start

function staticMode(data) {
  state.current = data.result;
  state.view = data.view || "auto";
  state.cmp = data.compare || null;
  for (const id of ["sidebar", "selection", "controls", "diff"]) { const n = $(id); if (n) n.remove(); }
  draw();
}

async function start() {
  const embedded = document.getElementById("attrlab-data");
  if (embedded) { staticMode(JSON.parse(embedded.textContent)); return; }
  try {
    state.info = await api("/api/info");
  } catch (e) { showError($("view"), e); return; }
  $("model").textContent = state.info.model ? `model: ${visible(state.info.model)}` : "no model loaded";
  $("view-select").addEventListener("change", (e) => { state.view = e.target.value; draw(); });
  $("other-select").addEventListener("change", (e) => compareWith(e.target.value));
  $("diff-select").addEventListener("change", (e) => diffWith(e.target.value));
  $("refresh").addEventListener("click", loadList);
  fillViews();
  runForm();
  await loadList();
  const wanted = new URLSearchParams(window.location.search).get("result");
  if (wanted) await open(wanted);
  document.body.dataset.ready = "1";
}

start().then(() => { document.body.dataset.ready = "1"; });
