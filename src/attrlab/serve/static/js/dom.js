// DOM helpers: every string goes in through textContent or a property, never
// through an HTML parser, so no data from a result can become markup or script.

export function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = String(v);
    else if (k === "on") for (const [ev, fn] of Object.entries(v)) node.addEventListener(ev, fn);
    else if (k === "data") for (const [dk, dv] of Object.entries(v)) node.dataset[dk] = String(dv);
    else if (k === "style") for (const [sk, sv] of Object.entries(v)) node.style[sk] = sv;
    else if (k === "value" || k === "checked" || k === "disabled" || k === "selected") node[k] = v;
    else node.setAttribute(k, String(v));
  }
  appendAll(node, children);
  return node;
}

export function appendAll(node, children) {
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

export function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
  return node;
}

export function svg(tag, attrs, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") node.textContent = String(v);
    else node.setAttribute(k, String(v));
  }
  for (const c of children.flat(Infinity)) if (c) node.append(c);
  return node;
}

// a diverging colour for a score: red = supports the target, blue = against
export function scoreColor(v, max) {
  if (v === null || v === undefined || !Number.isFinite(v)) return "rgb(230,230,230)";
  const t = max > 0 ? Math.max(-1, Math.min(1, v / max)) : 0;
  const a = Math.abs(t);
  const base = t >= 0 ? [214, 39, 40] : [31, 119, 180];
  const mix = (c) => Math.round(255 + (c - 255) * a);
  return `rgb(${mix(base[0])},${mix(base[1])},${mix(base[2])})`;
}

export function fmt(x, digits = 4) {
  if (x === null || x === undefined) return "–";
  if (typeof x !== "number") return String(x);
  if (!Number.isFinite(x)) return String(x);
  if (x !== 0 && (Math.abs(x) >= 1e5 || Math.abs(x) < 1e-3)) return x.toExponential(2);
  return x.toFixed(digits).replace(/\.?0+$/, "") || "0";
}

export function maxAbs(values) {
  let m = 0;
  for (const v of values) if (v !== null && Number.isFinite(v)) m = Math.max(m, Math.abs(v));
  return m;
}

// show control and bidirectional characters instead of obeying them
export function visible(s) {
  return String(s).replace(/[\u0000-\u001f\u007f-\u009f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]/g,
    (c) => "\\u" + c.charCodeAt(0).toString(16).padStart(4, "0"));
}
