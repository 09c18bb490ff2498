// Tokens as a heat map: each token a <span> shaded by a value in normalised units (1 = the
// feature's max activation recorded in the index), with its top features on hover and a
// click handler. Shared by the text view, the card's examples and the steer view.

import { h, fmt } from "./dom.js";

const tooltip = () => document.getElementById("tooltip");

export function shade(el, value) {
  const a = Math.max(0, Math.min(1, value || 0));
  el.style.backgroundColor = a > 0 ? `rgba(234, 88, 12, ${(0.12 + 0.88 * a).toFixed(3)})` : "";
  el.style.color = a > 0.6 ? "#fff" : "";
}

// Visible text of a token: newlines and tabs kept, shown as ↵ / → so an empty token is seen.
export function tokenText(tok) {
  if (tok === "") return "∅";
  return tok.replace(/\n/g, "↵\n").replace(/\t/g, "→");
}

// Per-token features of one dictionary: [{id, value, label}], strongest first.
export function featuresOf(token, dictionary) {
  const d = (token.features || []).find((x) => x.dictionary === dictionary);
  if (!d || !d.indices) return [];
  return d.indices
    .map((id, j) => ({ id, value: d.values[j], label: d.labels ? d.labels[j] : "" }))
    .filter((f) => f.value > 0)
    .sort((a, b) => b.value - a.value);
}

// The value of one requested feature (feature_ids) at this token.
export function featureValueOf(token, dictionary) {
  const d = (token.features || []).find((x) => x.dictionary === dictionary);
  return d && d.feature_values ? d.feature_values[0] : 0;
}

export function featureList(features, { onFeature, limit = 10, unit = "" } = {}) {
  if (!features.length) return h("p", { class: "muted" }, "no feature fires here");
  const shown = features.slice(0, limit);
  const top = Math.abs(shown[0].value) || 1;
  return h(
    "ul",
    { class: "feature-list" },
    shown.map((f) => {
      const bar = h("span", { class: "bar" + (f.value < 0 ? " neg" : "") });
      // widths through CSSOM: the page's CSP allows no style attributes
      bar.style.width = `${Math.round((60 * Math.abs(f.value)) / top)}px`;
      return h(
        "li",
        {},
        h("span", { class: "val" }, fmt(f.value) + unit),
        bar,
        onFeature
          ? h("a", { class: "feature", href: "#", dataset: { feature: f.id },
                     onclick: (e) => { e.preventDefault(); onFeature(f.id); } }, `#${f.id}`)
          : h("span", {}, `#${f.id}`),
        h("span", { class: "muted" }, f.label || ""),
      );
    }),
  );
}

function showTooltip(ev, content) {
  const tip = tooltip();
  tip.replaceChildren(content);
  tip.hidden = false;
  const x = Math.min(ev.clientX + 12, window.innerWidth - 380);
  tip.style.left = `${x}px`;
  tip.style.top = `${ev.clientY + 16}px`;
}

export function hideTooltip() {
  tooltip().hidden = true;
}

// tokens: [{text, value, features, title, peak, pending}] → a .tokens element.
export function tokenStrip(tokens, { onClick, hover = true } = {}) {
  const strip = h("div", { class: "tokens" });
  tokens.forEach((t, i) => {
    const span = h("span", { class: "tok" + (t.peak ? " peak" : "") + (t.pending ? " pending" : ""),
                             dataset: { index: i } }, tokenText(t.text));
    shade(span, t.value);
    if (t.title) span.title = t.title;
    if (hover && t.features) {
      span.addEventListener("mousemove", (ev) => {
        const list = featureList(t.features, { limit: 6 });
        showTooltip(ev, h("div", {}, h("div", {}, `token ${JSON.stringify(t.text)}  value ${fmt(t.value)}`), list));
      });
      span.addEventListener("mouseleave", hideTooltip);
    }
    if (onClick && !t.pending) {
      span.addEventListener("click", () => {
        strip.querySelectorAll(".tok.pinned").forEach((x) => x.classList.remove("pinned"));
        span.classList.add("pinned");
        onClick(t, i);
      });
    }
    strip.append(span);
  });
  return strip;
}
