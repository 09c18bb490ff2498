// Steer: feature edits (from a card or a search) and/or a stored contrastive vector, with a
// strength slider and a mode; one streamed request with `compare: true` gives the steered
// and the default completion side by side, each generated token shaded by its features.

import * as api from "./api.js";
import { h, clear, errorBox, fmt } from "./dom.js";
import { getState, setState } from "./state.js";
import { featureRequest, heatToken } from "./text_view.js";
import { featureList, tokenStrip } from "./tokens.js";

const MODES = ["add", "clamp", "scale", "ablate", "project_cap", "orthogonal"];
const UNIT_MODES = new Set(["add", "clamp", "project_cap", "orthogonal"]); // the others take a factor / nothing
const DEFAULT_STRENGTH = 8;

// Add feature `id` to the steering of the URL state and open the steer view.
export function addEdit(id, label = "") {
  const steer = getState().steer || {};
  const edits = (steer.edits || []).filter((e) => e.f !== id);
  edits.push({ f: id, v: DEFAULT_STRENGTH, m: "add", l: label || "" });
  setState({ view: "steer", steer: { ...steer, edits } });
}

function sliderRange(mode, hasIndex) {
  if (mode === "scale") return { min: -5, max: 10, step: 0.1 };
  return hasIndex ? { min: -20, max: 20, step: 0.5 } : { min: -100, max: 100, step: 1 };
}

// The request's `steering` from the URL state.
export function steeringSpec(steer, ctx) {
  const hasIndex = ctx.summary && ctx.summary.has_index;
  const edits = (steer.edits || []).map((e) => {
    const edit = { dictionary: ctx.dictionary, feature: e.f, mode: e.m || "add" };
    if (edit.mode !== "ablate") edit.value = Number(e.v);
    if (UNIT_MODES.has(edit.mode)) edit.unit = hasIndex ? "max" : "raw";
    return edit;
  });
  const vectors = steer.vec && steer.vec.id ? [{ vector_id: steer.vec.id, scale: Number(steer.vec.s ?? 1) }] : [];
  return { edits, vectors };
}

// One completion column: tokens from the per-token features (by position, so a token whose
// features come a chunk later is still shaded), the text not yet covered by them after.
class Completion {
  constructor(title, id, ctx, onToken) {
    this.ctx = ctx;
    this.onToken = onToken;
    this.text = "";
    this.byPosition = new Map();
    this.finish = null;
    this.body = h("div", { class: "completion" });
    this.foot = h("p", { class: "muted" });
    this.el = h("div", { class: "panel", id }, h("h3", {}, title), this.body, this.foot);
  }

  add(choice) {
    if (choice.delta && choice.delta.content) this.text += choice.delta.content;
    for (const t of choice.features || []) this.byPosition.set(t.position, t);
    if (choice.finish_reason) this.finish = choice.finish_reason;
    this.render();
  }

  render() {
    const tokens = [...this.byPosition.keys()].sort((a, b) => a - b).map((p) => heatToken(this.byPosition.get(p), this.ctx, null));
    const covered = tokens.map((t) => t.text).join("");
    // The last generated token is never read by the model, so it has no features: it and
    // whatever text is ahead of the features is shown unshaded.
    const rest = this.text.startsWith(covered) ? this.text.slice(covered.length) : tokens.length ? "" : this.text;
    if (rest) tokens.push({ text: rest, value: 0, pending: true, title: "no features (not read by the model yet)" });
    clear(this.body).append(tokenStrip(tokens, { onClick: (t) => this.onToken(t) }));
    this.foot.textContent = this.finish ? `finished: ${this.finish}` : "generating…";
  }
}

export function createSteerView(root, ctx) {
  const prompt = h("textarea", { id: "steer-prompt", rows: 2, placeholder: "A prompt (a user message)" });
  const maxTokens = h("input", { type: "number", id: "steer-max-tokens", min: 1, max: 256, value: 24, size: 5 });
  const edits = h("div", { id: "steer-edits" });
  const vecSelect = h("select", { id: "steer-vector" }, h("option", { value: "" }, "(no vector)"));
  const vecScale = h("input", { type: "range", id: "steer-vector-scale", min: -10, max: 10, step: 0.5, value: 1 });
  const vecValue = h("span", {}, "1");
  const go = h("button", { id: "steer-run" }, "Generate");
  const status = h("div", { id: "steer-status" });
  const detail = h("div", { class: "panel", id: "steer-token" }, h("p", { class: "muted" }, "Click a generated token to see its features."));
  const outputs = h("div", { class: "cols", id: "steer-outputs" });
  let vectorsLoaded = null;
  let controller = null;

  const steer = () => getState().steer || {};
  const save = (next) => setState({ steer: next, prompt: prompt.value, tokens: maxTokens.value }, { replace: true, silent: true });

  prompt.addEventListener("change", () => save(steer()));
  maxTokens.addEventListener("change", () => save(steer()));
  vecSelect.addEventListener("change", () => save({ ...steer(), vec: vecSelect.value ? { id: vecSelect.value, s: Number(vecScale.value) } : undefined }));
  vecScale.addEventListener("input", () => {
    vecValue.textContent = vecScale.value;
    if (vecSelect.value) save({ ...steer(), vec: { id: vecSelect.value, s: Number(vecScale.value) } });
  });
  go.addEventListener("click", () => run());

  root.append(
    h("h2", {}, "Steer"),
    h("div", { class: "panel" }, prompt,
      h("div", { class: "row" }, h("label", {}, "max tokens ", maxTokens), go,
        h("span", { class: "muted" }, "greedy decoding; the default completion is the same request without steering"))),
    h("div", { class: "panel" }, h("h3", {}, "Feature edits"), edits,
      h("p", { class: "muted" }, "Add features from a feature card or a search result (“steer”).")),
    h("div", { class: "panel" }, h("h3", {}, "Stored contrastive vector"),
      h("div", { class: "row" }, vecSelect, h("label", {}, "scale ", vecScale), vecValue)),
    status, outputs, detail,
  );

  function renderEdits() {
    const hasIndex = ctx.summary && ctx.summary.has_index;
    const list = steer().edits || [];
    clear(edits);
    if (!list.length) edits.append(h("p", { class: "muted" }, "no feature edits"));
    list.forEach((e, i) => {
      const mode = h("select", { class: "edit-mode" }, MODES.map((m) => h("option", { value: m, selected: m === (e.m || "add") }, m)));
      const range = sliderRange(e.m || "add", hasIndex);
      const slider = h("input", { type: "range", class: "edit-strength", ...range, value: e.v ?? DEFAULT_STRENGTH,
                                  disabled: e.m === "ablate" });
      const unit = e.m === "scale" ? "× (factor)" : e.m === "ablate" ? "" : hasIndex ? "× max" : "raw";
      const value = h("span", { class: "edit-value" }, e.m === "ablate" ? "–" : `${fmt(slider.value, 1)} ${unit}`);
      const update = (patch) => {
        const next = steer();
        next.edits = (next.edits || []).map((x, j) => (j === i ? { ...x, ...patch } : x));
        save(next);
      };
      slider.addEventListener("input", () => { value.textContent = `${fmt(slider.value, 1)} ${unit}`; update({ v: Number(slider.value) }); });
      mode.addEventListener("change", () => {
        const m = mode.value;
        update({ m, v: m === "scale" ? 2 : m === "clamp" ? 1 : DEFAULT_STRENGTH });
        renderEdits();
      });
      edits.append(h("div", { class: "edit" },
        h("span", {}, h("a", { class: "feature", href: "#", dataset: { feature: e.f }, onclick: (ev) => { ev.preventDefault(); setState({ view: "feature", feature: e.f }); } }, `#${e.f}`),
          " ", h("span", { class: "muted" }, e.l || "")),
        slider, value, mode,
        h("button", { onclick: () => { const next = steer(); next.edits = next.edits.filter((_, j) => j !== i); save(next); renderEdits(); } }, "remove")));
    });
  }

  async function loadVectors() {
    if (vectorsLoaded === ctx.keyVersion) return;
    vectorsLoaded = ctx.keyVersion;
    try {
      const resp = await api.vectors();
      const current = (steer().vec || {}).id;
      clear(vecSelect).append(h("option", { value: "" }, "(no vector)"),
        resp.data.map((v) => h("option", { value: v.id, selected: v.id === current },
          `${v.name || v.id} (${v.hook_point}, norm ${fmt(v.norm)})`)));
    } catch (err) {
      vectorsLoaded = null;
      clear(vecSelect).append(h("option", { value: "" }, `(vectors unavailable: ${err.message})`));
    }
  }

  function showToken(t) {
    clear(detail).append(h("h3", {}, `Token ${JSON.stringify(t.text)}`),
      featureList(t.features || [], { onFeature: (id) => setState({ view: "feature", feature: id }) }));
  }

  async function run() {
    const state = getState();
    const spec = steeringSpec(state.steer || {}, ctx);
    clear(status);
    if (!spec.edits.length && !spec.vectors.length) {
      status.append(errorBox("Add a feature edit or choose a vector first."));
      return;
    }
    if (!prompt.value.trim()) {
      status.append(errorBox("Write a prompt first."));
      return;
    }
    save(state.steer || {});
    if (controller) controller.abort();
    controller = new AbortController();
    const steered = new Completion("Steered", "steer-steered", ctx, showToken);
    const plain = new Completion("Default", "steer-default", ctx, showToken);
    clear(outputs).append(steered.el, plain.el);
    const body = {
      model: ctx.model,
      messages: [{ role: "user", content: prompt.value }],
      max_tokens: Number(maxTokens.value) || 24,
      temperature: 0,
      steering: spec,
      compare: true,
      features: featureRequest(ctx, { dense: state.dense === "1", scope: "generated" }),
    };
    go.disabled = true;
    try {
      for await (const chunk of api.streamChat(body, controller.signal)) {
        if (chunk.steering_applied) {
          const applied = chunk.steering_applied.edits || [];
          status.append(h("p", { class: "muted", id: "steer-applied" },
            applied.map((a) => `#${a.feature} ${a.mode} ${fmt(a.value)} ${a.unit}` + (a.raw_value != null ? ` (= ${fmt(a.raw_value)} raw)` : "")).join(" · ")));
        }
        for (const choice of chunk.choices || []) (choice.unsteered ? plain : steered).add(choice);
      }
      for (const c of [steered, plain]) {
        if (!c.finish) c.finish = "stop";
        c.render();
      }
      outputs.dataset.done = "1";
    } catch (err) {
      if (err.name !== "AbortError") status.append(errorBox(err));
    } finally {
      go.disabled = false;
    }
  }

  function update(state) {
    if (document.activeElement !== prompt) prompt.value = state.prompt ?? prompt.value;
    if (state.tokens) maxTokens.value = state.tokens;
    const vec = (state.steer || {}).vec;
    if (vec) {
      vecScale.value = vec.s ?? 1;
      vecValue.textContent = vecScale.value;
    }
    renderEdits();
    loadVectors();
  }

  return { update };
}
