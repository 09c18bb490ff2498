// Dictionary page: held-out metrics (FVU, L0, dead, CE recovered), the log10-density
// histogram of all its features, and the training curves sae-train recorded.

import { h, clear, fmt, pct } from "./dom.js";
import { histogram, lineChart } from "./plots.js";

const CURVES = [
  ["loss", "training loss"],
  ["fvu", "FVU (training batch)"],
  ["l0", "L0"],
  ["dead", "dead fraction"],
];

export function createDictionaryView(root, ctx) {
  let last = null;

  function update() {
    const key = JSON.stringify([ctx.dictionary, ctx.keyVersion, !!ctx.summary]);
    if (key === last) return;
    last = key;
    clear(root);
    const s = ctx.summary;
    if (!s) {
      root.append(h("h2", {}, "Dictionary"), h("p", { class: "muted" }, "No dictionary loaded (see the message above)."));
      return;
    }
    root.append(
      h("h2", { id: "dict-title" }, `Dictionary ${s.id}`),
      h("p", { class: "muted" }, `${s.model} · ${s.hook_point} · ${s.architecture}` + (s.k ? ` (k=${s.k})` : "") +
        ` · ${s.d_sae} features over d_in ${s.d_in}`),
      h("div", { class: "panel stats", id: "dict-metrics" },
        h("div", { class: "stat" }, h("b", {}, fmt(s.fvu, 4)), "FVU (held out)"),
        h("div", { class: "stat" }, h("b", {}, fmt(s.l0, 1)), "L0"),
        h("div", { class: "stat" }, h("b", {}, pct(s.dead_frac)), "dead"),
        h("div", { class: "stat" }, h("b", {}, pct(s.ce_loss_recovered)), "CE loss recovered"),
        s.eval_tokens ? h("div", { class: "stat" }, h("b", {}, String(s.eval_tokens)), "evaluation tokens") : null),
      s.fvu === null ? h("p", { class: "muted" }, "No metrics.json beside this dictionary (sae-train writes one).") : null,
    );
    const density = h("div", { class: "panel", id: "dict-density" }, h("h3", {}, "Feature density (log10 of the firing rate)"));
    if (s.has_index && s.density_counts.length) {
      density.append(histogram(s.density_counts, s.density_log10_edges,
        { width: 560, xlabel: "log10 density", label: "density histogram", xfmt: (x) => x.toFixed(2) }),
        h("p", { class: "muted" }, `${s.never_fired} features never fired in ${s.index_tokens ?? "?"} indexed tokens`));
    } else {
      density.append(h("p", { class: "muted" }, s.has_index ? "No feature fired in the index." : "No feature index (sae-index builds one)."));
    }
    root.append(density);
    const curves = h("div", { class: "panel", id: "dict-curves" }, h("h3", {}, "Training curves"));
    if (s.training_log.length) {
      curves.append(h("div", { class: "row" }, CURVES.map(([k, title]) =>
        lineChart(s.training_log.map((p) => ({ x: p.tokens, y: p[k] })), { xlabel: "training tokens", ylabel: title, label: title }))));
    } else {
      curves.append(h("p", { class: "muted" }, "No training_log.jsonl beside this dictionary (sae-train records one)."));
    }
    root.append(curves);
  }

  return { update, reset: () => { last = null; } };
}
