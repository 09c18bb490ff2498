// Search: by label and top tokens (the index's full-text search), and by example texts
// against contrast texts. Each result is a card that opens the feature.

import * as api from "./api.js";
import { h, clear, errorBox, fmt, loading, pct } from "./dom.js";
import { setState } from "./state.js";
import { addEdit } from "./steer_view.js";
import { DENSE_THRESHOLD } from "./text_view.js";

function resultCards(results, scoreOf) {
  if (!results.length) return h("p", { class: "muted" }, "no feature matches");
  return h("div", { class: "result-cards" },
    results.map((r) =>
      h("div", { class: "result-card", dataset: { feature: r.feature }, tabindex: 0,
                 onclick: () => setState({ view: "feature", feature: r.feature }) },
        h("div", {}, h("span", { class: "label" }, `#${r.feature} `), r.label || "(no label)"),
        h("div", { class: "muted" }, scoreOf(r)),
        h("button", { class: "link", onclick: (e) => { e.stopPropagation(); addEdit(r.feature, r.label); } }, "steer"))));
}

export function createSearchView(root, ctx) {
  const q = h("input", { id: "search-q", type: "search", placeholder: "words of a label or top tokens", size: 40 });
  const texts = h("textarea", { id: "search-texts", rows: 3, placeholder: "texts the feature should fire on, one per line" });
  const contrast = h("textarea", { id: "search-contrast", rows: 3, placeholder: "contrast texts it should not fire on (optional)" });
  const out = h("div", { id: "search-results" });
  let last = null;

  const byLabel = h("form", { class: "panel", id: "search-label-form",
                              onsubmit: (e) => { e.preventDefault(); setState({ view: "search", q: q.value, by: "label" }); } },
    h("h3", {}, "By label and top tokens"), h("div", { class: "row" }, q, h("button", { type: "submit" }, "Search")));
  const byExample = h("form", { class: "panel", id: "search-example-form",
                                onsubmit: (e) => { e.preventDefault(); setState({ view: "search", by: "example", ex: texts.value, cx: contrast.value }); } },
    h("h3", {}, "By example"),
    h("div", { class: "cols" }, texts, contrast),
    h("button", { type: "submit" }, "Find features"));
  root.append(h("h2", {}, "Search"), h("div", { class: "cols" }, byLabel, byExample), out);

  async function update(state) {
    if (document.activeElement !== q) q.value = state.q || "";
    if (document.activeElement !== texts) texts.value = state.ex || "";
    if (document.activeElement !== contrast) contrast.value = state.cx || "";
    const key = JSON.stringify([ctx.dictionary, state.by, state.q, state.ex, state.cx, ctx.keyVersion]);
    if (key === last) return;
    last = key;
    const lines = (s) => (s || "").split("\n").map((x) => x.trim()).filter(Boolean);
    try {
      if (state.by === "label" && (state.q || "").trim()) {
        clear(out).append(loading("searching…"));
        const resp = await api.searchLabels(ctx.dictionary, state.q);
        clear(out).append(h("h3", {}, `Labels matching "${state.q}"`),
          resultCards(resp.results, (r) => `density ${pct(r.density, 3)} · max ${fmt(r.max_activation)}`));
      } else if (state.by === "example" && lines(state.ex).length) {
        clear(out).append(loading("running the texts through the model…"));
        const body = { dictionary: ctx.dictionary, texts: lines(state.ex), contrast_texts: lines(state.cx),
                       limit: 24, exclude_dense_above: DENSE_THRESHOLD };
        const resp = await api.searchByExample(body);
        clear(out).append(h("h3", {}, "Features of the examples" + (body.contrast_texts.length ? ", minus the contrast" : "")),
          resultCards(resp.results, (r) => `score ${fmt(r.score)} · density ${pct(r.density, 3)}`));
      } else {
        clear(out);
      }
    } catch (err) {
      last = null;
      clear(out).append(errorBox(err));
    }
  }

  return { update };
}
