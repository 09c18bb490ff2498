// Feature card: label and its score, max-activating examples with per-token shading, the
// activation histogram and density, promoted/suppressed tokens, co-occurring features.

import * as api from "./api.js";
import { h, clear, errorBox, fmt, loading, pct } from "./dom.js";
import { histogram } from "./plots.js";
import { getState, setState } from "./state.js";
import { featureList, tokenStrip } from "./tokens.js";
import { addEdit } from "./steer_view.js";

const EXAMPLES = 12;

const open = (id) => setState({ view: "feature", feature: id });

function tokenScores(items, title, negative = false) {
  const feats = items.map((t) => ({ id: t.token_id, value: negative ? -Math.abs(t.score) : t.score, label: "" }));
  const list = h("ul", { class: "feature-list" },
    items.map((t, i) => {
      const bar = h("span", { class: "bar" + (negative ? " neg" : "") });
      const top = Math.abs(items[0].score) || 1;
      bar.style.width = `${Math.round((60 * Math.abs(t.score)) / top)}px`;
      return h("li", {}, h("span", { class: "val" }, fmt(feats[i].value)), bar, h("code", {}, JSON.stringify(t.token)));
    }));
  return h("div", {}, h("h3", {}, title), list);
}

function examples(card) {
  const max = card.max_activation || 1;
  return h("div", { id: "card-examples" },
    h("h3", {}, `Max-activating examples (${card.examples.length})`),
    card.examples.length
      ? card.examples.map((ex) =>
          h("div", { class: "example" },
            h("span", { class: "muted" }, `${fmt(ex.activation)} · doc ${ex.doc} `),
            tokenStrip(ex.tokens.map((t, i) => ({
              text: t, value: ex.activations[i] / max, peak: i === ex.peak,
              title: `${fmt(ex.activations[i])} (${fmt(ex.activations[i] / max)} × max)`,
            })), { hover: false })))
      : h("p", { class: "muted" }, "it never fired in the indexed corpus"));
}

export function createCardView(root, ctx) {
  let last = null;

  async function update(state) {
    const feature = state.feature === undefined || state.feature === "" ? null : Number(state.feature);
    const key = JSON.stringify([ctx.dictionary, feature, ctx.keyVersion]);
    if (key === last) return;
    last = key;
    clear(root);
    if (feature === null || Number.isNaN(feature)) {
      root.append(h("h2", {}, "Feature"), h("p", { class: "muted" }, "Open a feature from the text, search or steer view."));
      return;
    }
    root.append(h("h2", {}, `Feature #${feature}`), loading());
    let info;
    try {
      info = await api.feature(ctx.dictionary, feature, EXAMPLES);
    } catch (err) {
      last = null;
      clear(root).append(h("h2", {}, `Feature #${feature}`), errorBox(err));
      return;
    }
    if (getState().feature !== String(feature)) return; // navigated away meanwhile
    const card = info.index;
    const nav = h("div", { class: "row" },
      feature > 0 ? h("button", { onclick: () => open(feature - 1) }, `← #${feature - 1}`) : null,
      h("button", { onclick: () => open(feature + 1) }, `#${feature + 1} →`),
      h("button", { id: "card-steer", onclick: () => addEdit(feature, card ? card.label : "") }, "Steer with it"),
      h("button", { onclick: () => setState({ view: "text", feature }) }, "Show on the text"));
    clear(root).append(
      h("h2", { id: "card-title" }, `Feature #${feature}`, card && card.label ? ` — ${card.label}` : ""),
      nav,
    );
    if (!card) {
      root.append(h("p", { class: "muted" }, "This dictionary has no feature index: no examples or label (build one with sae-index)."));
    } else {
      const edges = card.histogram.map((_, i) => (i * card.histogram_max) / card.histogram.length);
      edges.push(card.histogram_max);
      root.append(
        h("div", { class: "panel stats" },
          h("div", { class: "stat" }, h("b", { id: "card-label" }, card.label || "(no label)"), "label"),
          h("div", { class: "stat" }, h("b", {}, card.label_score === null ? "–" : fmt(card.label_score)),
            "label score (detection, 0.5 = chance)"),
          h("div", { class: "stat" }, h("b", { id: "card-density" }, pct(card.density, 3)), `density (${card.n_fired} tokens)`),
          h("div", { class: "stat" }, h("b", {}, fmt(card.max_activation)), "max activation"),
          h("div", { class: "stat" }, h("b", {}, fmt(info.decoder_norm)), "decoder norm")),
        h("div", { class: "cols" },
          h("div", { class: "panel" }, h("h3", {}, "Activation histogram (nonzero activations)"),
            histogram(card.histogram, edges, { xlabel: "activation", label: "activation histogram", logY: true })),
          h("div", { class: "panel" }, h("h3", {}, "Co-occurring features"),
            featureList(card.cooccurring.map((c) => ({ id: c.feature, value: c.jaccard, label: c.label })),
                        { onFeature: open, unit: " J" }),
            card.top_tokens.length ? h("div", {}, h("h3", {}, "Peak tokens of its examples"),
              h("p", {}, card.top_tokens.map((t) => h("code", { class: "chip" }, `${JSON.stringify(t.token)}×${t.count} `)))) : null)),
        h("div", { class: "panel" }, examples(card)),
      );
    }
    root.append(h("div", { class: "cols" },
      h("div", { class: "panel" }, tokenScores(info.top_promoted.slice(0, 10), "Promoted tokens (logit lens)")),
      h("div", { class: "panel" }, tokenScores(info.top_suppressed.slice(0, 10), "Suppressed tokens", true))));
  }

  return { update, reset: () => { last = null; } };
}
