// The server's API as the page uses it: every call carries the key typed into the page
// (kept in this tab's sessionStorage only) and turns an error envelope into ApiError.

const KEY_ITEM = "sae-serve-api-key";

export function getKey() {
  return sessionStorage.getItem(KEY_ITEM) || "";
}

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY_ITEM, key);
  else sessionStorage.removeItem(KEY_ITEM);
}

export class ApiError extends Error {
  constructor(status, message, param) {
    super(message);
    this.status = status;
    this.param = param || null;
  }
}

// Listeners of a 401 (main.js shows the key message).
const authListeners = [];
export function onAuthError(fn) {
  authListeners.push(fn);
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = getKey();
  if (key) h["Authorization"] = `Bearer ${key}`;
  return h;
}

async function failure(resp) {
  let message = `${resp.status} ${resp.statusText}`;
  let param = null;
  try {
    const body = await resp.json();
    if (body && body.error) {
      message = body.error.message || message;
      param = body.error.param || null;
    }
  } catch (_) {
    // not JSON: keep the status line
  }
  const err = new ApiError(resp.status, message, param);
  if (resp.status === 401) authListeners.forEach((fn) => fn(err));
  return err;
}

export async function call(path, { method = "GET", body, signal } = {}) {
  const resp = await fetch(path, {
    method,
    headers: headers(body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
  });
  if (!resp.ok) throw await failure(resp);
  return resp.json();
}

const enc = encodeURIComponent;
// Dictionary ids may hold a slash ("layers.6/topk-512"): the routes take the id as a path.
const dictPath = (id) => id.split("/").map(enc).join("/");

export const models = () => call("/v1/models");
export const dictionaries = () => call("/v1/dictionaries");
export const summary = (id) => call(`/v1/dictionaries/${dictPath(id)}/summary`);
export const feature = (id, i, examples = 10) =>
  call(`/v1/dictionaries/${dictPath(id)}/features/${i}?examples=${examples}`);
export const searchLabels = (id, q, limit = 24) =>
  call(`/v1/dictionaries/${dictPath(id)}/features?q=${enc(q)}&limit=${limit}`);
export const searchByExample = (body) => call("/v1/features/search", { method: "POST", body });
export const extract = (body, signal) => call("/v1/features/extract", { method: "POST", body, signal });
export const vectors = () => call("/v1/steering/vectors");

// POST /v1/chat/completions with stream=true: yields each SSE chunk (parsed JSON) until
// [DONE]; an in-band error chunk is thrown as ApiError.
export async function* streamChat(body, signal) {
  const resp = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: headers(true),
    body: JSON.stringify({ ...body, stream: true }),
    signal,
  });
  if (!resp.ok) throw await failure(resp);
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(500, chunk.error.message, null);
        yield chunk;
      }
    }
  }
}
