// Shareable state in the URL hash: view, dict, text, feature, q, steer... A link reproduces
// the view. Values are URL-encoded; the steering spec is JSON.

export function getState() {
  const params = new URLSearchParams(location.hash.replace(/^#/, ""));
  const state = Object.fromEntries(params.entries());
  if (state.steer) {
    try {
      state.steer = JSON.parse(state.steer);
    } catch (_) {
      delete state.steer;
    }
  }
  return state;
}

export function hashOf(state) {
  const params = new URLSearchParams();
  for (const [k, v] of Object.entries(state)) {
    if (v === undefined || v === null || v === "") continue;
    params.set(k, typeof v === "object" ? JSON.stringify(v) : String(v));
  }
  return "#" + params.toString();
}

// Merge `patch` into the state; a new history entry unless `replace` (typing does not
// flood the history). Fires hashchange (main.js renders on it) unless `silent`.
export function setState(patch, { replace = false, silent = false } = {}) {
  const next = { ...getState(), ...patch };
  const hash = hashOf(next);
  if (hash === location.hash) return;
  if (replace || silent) {
    history.replaceState(null, "", hash);
    if (!silent) window.dispatchEvent(new HashChangeEvent("hashchange"));
  } else {
    location.hash = hash;
  }
}
