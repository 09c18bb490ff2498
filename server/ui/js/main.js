// The playground's entry: the key field, the dictionary choice, the views and the
// URL-hash routing between them.

import * as api from "./api.js";
import { h } from "./dom.js";
import { getState, setState } from "./state.js";
import { createCardView } from "./card_view.js";
import { createDictionaryView } from "./dictionary_view.js";
import { createSearchView } from "./search_view.js";
import { createSteerView } from "./steer_view.js";
import { createTextView } from "./text_view.js";
import { hideTooltip } from "./tokens.js";

const ctx = { dictionary: null, summary: null, model: null, keyVersion: 0 };
const banner = document.getElementById("banner");
const dictSelect = document.getElementById("dictionary");
const keyInput = document.getElementById("api-key");

function showBanner(text, kind = "error") {
  banner.textContent = text;
  banner.className = kind;
  banner.hidden = false;
}

function hideBanner() {
  banner.hidden = true;
}

api.onAuthError((err) => {
  showBanner(api.getKey()
    ? `The API key was refused (${err.message}). Enter a valid key above.`
    : "This server needs an API key: enter it in the “API key” field above (it stays in this browser tab).");
  keyInput.focus();
});

const views = {};
function buildViews() {
  views.text = createTextView(document.getElementById("view-text"), ctx);
  views.feature = createCardView(document.getElementById("view-feature"), ctx);
  views.search = createSearchView(document.getElementById("view-search"), ctx);
  views.steer = createSteerView(document.getElementById("view-steer"), ctx);
  views.dictionary = createDictionaryView(document.getElementById("view-dictionary"), ctx);
}

function route() {
  hideTooltip();
  const state = getState();
  const name = views[state.view] ? state.view : "text";
  for (const [v, _] of Object.entries(views)) document.getElementById(`view-${v}`).hidden = v !== name;
  document.querySelectorAll("#nav a").forEach((a) => a.classList.toggle("active", a.dataset.view === name));
  if (!ctx.dictionary) return;
  if (state.dict && state.dict !== ctx.dictionary) {
    connect(); // the link names another dictionary
    return;
  }
  views[name].update(state);
}

// Load the model, the dictionaries and the chosen one's summary (again after a key change).
async function connect() {
  try {
    const [models, dicts] = await Promise.all([api.models(), api.dictionaries()]);
    ctx.model = models.data.length ? models.data[0].id : null;
    if (!dicts.data.length) {
      showBanner("This server serves no dictionary.");
      return;
    }
    const wanted = getState().dict;
    const chosen = dicts.data.find((d) => d.id === wanted) || dicts.data[0];
    dictSelect.replaceChildren(...dicts.data.map((d) => h("option", { value: d.id, selected: d.id === chosen.id },
      `${d.id} (${d.hook_point}, ${d.d_sae})`)));
    ctx.summary = await api.summary(chosen.id);
    ctx.dictionary = chosen.id;
    ctx.keyVersion += 1;
    hideBanner();
    if (wanted !== chosen.id) setState({ dict: chosen.id }, { replace: true, silent: true });
    route();
  } catch (err) {
    if (err.status !== 401) showBanner(`Cannot reach the server's API: ${err.message}`);
  }
}

document.getElementById("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  api.setKey(keyInput.value.trim());
  connect();
});
dictSelect.addEventListener("change", () => {
  setState({ dict: dictSelect.value }, { replace: false });
});
window.addEventListener("hashchange", route);

keyInput.value = api.getKey();
buildViews();
route();
connect();
