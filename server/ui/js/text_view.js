// Text view: the text's tokens as a heat map, of each token's strongest feature or of one
// feature; hover a token for its top features, click it to pin them, click a feature to
// open its card.

import * as api from "./api.js";
import { h, clear, errorBox, fmt } from "./dom.js";
import { setState } from "./state.js";
import { featureList, featuresOf, featureValueOf, tokenStrip } from "./tokens.js";

export const DENSE_THRESHOLD = 0.1; // features firing on more than 10% of tokens are hidden unless "show dense"
const TOP_K = 8;

// The `features` part of a request: normalised units and labels when the dictionary has an
// index, dense features left out unless asked for.
export function featureRequest(ctx, { dense = false, featureIds = null, scope = "all" } = {}) {
  const f = { dictionaries: [ctx.dictionary], top_k: TOP_K, scope };
  if (featureIds) f.feature_ids = featureIds;
  if (ctx.summary && ctx.summary.has_index) {
    f.normalize = "max";
    f.labels = true;
    if (!dense) f.exclude_dense_above = DENSE_THRESHOLD;
  }
  return f;
}

// An extracted / generated token → what tokenStrip shows.
export function heatToken(t, ctx, feature) {
  const feats = featuresOf(t, ctx.dictionary);
  const value = feature !== null ? featureValueOf(t, ctx.dictionary) : feats.length ? feats[0].value : 0;
  return { text: t.token, value, features: feats, position: t.position };
}

export function createTextView(root, ctx) {
  const input = h("textarea", { id: "text-input", rows: 4, placeholder: "Type or paste text…" });
  const asChat = h("input", { type: "checkbox", id: "text-chat" });
  const dense = h("input", { type: "checkbox", id: "show-dense" });
  const featureInput = h("input", { type: "number", id: "heat-feature", min: 0, placeholder: "strongest", size: 8 });
  const run = h("button", { id: "text-run" }, "Show features");
  const legend = h("span", { class: "muted", id: "heat-legend" });
  const heat = h("div", { id: "heatmap", class: "panel" }, h("p", { class: "muted" }, "Tokens appear here."));
  const detail = h("div", { id: "token-detail", class: "panel" },
                   h("p", { class: "muted" }, "Click a token to see its features."));
  let last = null;
  let controller = null;
  let timer = null;

  const commit = (replace = true) =>
    setState({ view: "text", text: input.value, chat: asChat.checked ? 1 : "", dense: dense.checked ? 1 : "",
               feature: featureInput.value }, { replace });
  input.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(() => commit(true), 500);
  });
  for (const el of [asChat, dense, featureInput]) el.addEventListener("change", () => commit(true));
  run.addEventListener("click", () => commit(true));

  root.append(
    h("h2", {}, "Text"),
    h("div", { class: "panel" },
      input,
      h("div", { class: "row" },
        run,
        h("label", {}, asChat, " as a chat message (the model's template)"),
        h("label", { title: `features firing on more than ${DENSE_THRESHOLD * 100}% of tokens are hidden by default` },
          dense, " show dense features"),
        h("label", {}, "heat map of feature ", featureInput),
        h("button", { class: "link", onclick: () => { featureInput.value = ""; commit(true); } }, "each token's strongest"),
        legend)),
    h("div", { class: "cols" }, heat, detail),
  );

  function showDetail(tok) {
    clear(detail).append(
      h("h3", {}, `Token ${JSON.stringify(tok.text)} (position ${tok.position})`),
      featureList(tok.features, { onFeature: (id) => setState({ view: "feature", feature: id }) }),
    );
  }

  async function update(state) {
    if (document.activeElement !== input && input.value !== (state.text || "")) input.value = state.text || "";
    asChat.checked = state.chat === "1";
    dense.checked = state.dense === "1";
    if (document.activeElement !== featureInput) featureInput.value = state.feature || "";
    const text = state.text || "";
    const feature = state.feature === undefined || state.feature === "" ? null : Number(state.feature);
    const key = JSON.stringify([ctx.dictionary, text, state.chat, state.dense, feature, ctx.keyVersion]);
    if (key === last) return;
    last = key;
    if (!text.trim()) {
      clear(heat).append(h("p", { class: "muted" }, "Tokens appear here."));
      return;
    }
    if (controller) controller.abort();
    controller = new AbortController();
    const body = asChat.checked ? { messages: [{ role: "user", content: text }] } : { text };
    body.features = featureRequest(ctx, { dense: dense.checked, featureIds: feature !== null ? [feature] : null });
    const unit = ctx.summary && ctx.summary.has_index ? "× max" : "raw";
    legend.textContent = feature !== null ? `shading: feature #${feature} (${unit})` : `shading: strongest feature (${unit})`;
    heat.classList.add("busy");
    try {
      const resp = await api.extract(body, controller.signal);
      const tokens = resp.tokens.map((t) => heatToken(t, ctx, feature));
      heat.dataset.dense = dense.checked ? "1" : "0";
      clear(heat).append(
        tokenStrip(tokens, { onClick: (t) => showDetail(t) }),
        h("p", { class: "muted" }, `${tokens.length} tokens · max ${fmt(Math.max(0, ...tokens.map((t) => t.value)))}`),
      );
    } catch (err) {
      if (err.name === "AbortError") return;
      last = null;
      clear(heat).append(errorBox(err));
    } finally {
      heat.classList.remove("busy");
    }
  }

  return { update };
}
