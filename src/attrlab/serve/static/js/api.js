// The JSON API, with the token from the page's URL (kept for the tab in
// sessionStorage) sent as a header on every request.
const params = new URLSearchParams(window.location.search);
const fromUrl = params.get("token");
if (fromUrl) window.sessionStorage.setItem("attrlab-token", fromUrl);
export const TOKEN = fromUrl || window.sessionStorage.getItem("attrlab-token") || "";

export class ApiError extends Error {
  constructor(type, message, status) {
    super(message);
    this.type = type;
    this.status = status;
  }
}

export async function api(path, body) {
  const opts = { headers: { "X-Attrlab-Token": TOKEN }, credentials: "same-origin" };
  if (body !== undefined) {
    opts.method = "POST";
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  let data = null;
  try { data = await r.json(); } catch (e) { data = null; }
  if (!r.ok) {
    throw new ApiError((data && data.error) || `HTTP ${r.status}`, (data && data.message) || r.statusText, r.status);
  }
  return data;
}

export function exportUrl(id, view, other) {
  const q = new URLSearchParams({ id, view, token: TOKEN });
  if (other) q.set("other", other);
  return `/api/export?${q.toString()}`;
}
