"""The web playground (server/ui/) in a real browser against the real server.

Headless Chromium from Debian's packages (``scripts/setup_browser.sh`` installs it; ``make
test`` runs that first), driven by Playwright through ``executable_path``: Playwright's own
browser download needs the internet. The pages run against the session server (its test
dictionary has a feature index: labels, normalised units, cards, search) and, for API keys,
against the server with a key that tests/test_faults.py uses too. Each view's screenshot is
saved under ``test-artifacts/playground/``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.browser_helpers import ensure_chromium, launch_chromium, new_page, wait_ready
from tests.server_fixtures import DICTIONARY_ID, FAULT_API_KEY, ServerHandle

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts" / "playground"
TEXT = "Paris is the capital of France. The cat slept on the warm windowsill."
TIMEOUT_MS = 180_000  # a request on the shared 2-core machine can wait behind other tests' engines


def _browser_or_skip() -> None:
    reason = ensure_chromium()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    _browser_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = launch_chromium(p)
        yield b
        b.close()


@dataclass
class Tab:
    page: Any
    base: str
    console_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def goto(self, hash_: str = "") -> None:
        self.page.goto(f"{self.base}/ui/{hash_}")

    def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _open(browser: Any, server: ServerHandle) -> Tab:
    page = new_page(browser, TIMEOUT_MS)
    tab = Tab(page, server.base_url)
    page.on("console", lambda m: tab.console_errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: tab.console_errors.append(f"page error: {e}"))
    page.on("request", lambda r: tab.requests.append(r.url))
    return tab


@pytest.fixture
def tab(browser, live_server) -> Iterator[Tab]:
    t = _open(browser, live_server)
    yield t
    t.page.context.close()


def _wait_ready(tab: Tab) -> None:
    wait_ready(tab.page, DICTIONARY_ID)


def _api(server: ServerHandle, method: str, path: str, body: dict | None = None) -> Any:
    r = httpx.request(method, f"{server.base_url}{path}", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def _shading(tab: Tab, selector: str) -> list[str]:
    return tab.page.eval_on_selector_all(selector, "els => els.map(e => e.style.backgroundColor)")


def test_page_loads_without_console_errors(tab, live_server):
    r = httpx.get(f"{live_server.base_url}/", follow_redirects=False, timeout=30)
    assert r.status_code in (302, 307) and r.headers["location"] == "/ui/"
    ui = httpx.get(f"{live_server.base_url}/ui/", timeout=30)
    assert ui.status_code == 200 and "connect-src 'self'" in ui.headers["content-security-policy"]
    tab.page.goto(f"{live_server.base_url}/")  # the redirect
    assert tab.page.url.startswith(f"{live_server.base_url}/ui/")
    _wait_ready(tab)
    for view in ("search", "steer", "dictionary", "text"):
        tab.page.click(f"#nav a[data-view='{view}']")
        tab.page.wait_for_selector(f"#view-{view}:not([hidden])")
        if view == "dictionary":
            tab.page.wait_for_selector("#dict-density svg")
    assert tab.console_errors == []
    # nothing but this server: no CDN, no network at run time
    assert tab.requests and all(u.startswith(live_server.base_url) or u.startswith("data:") for u in tab.requests), \
        tab.requests


def _exchange(tab: Tab, path: str, action: Any) -> tuple[dict, Any]:
    """Run ``action`` (a click...) and return the body the page sent to ``path`` and the answer."""
    with tab.page.expect_response(lambda r: path in r.url and r.request.method == "POST") as info:
        action()
    resp = info.value
    assert resp.status == 200, resp.text()
    return json.loads(resp.request.post_data or "{}"), resp.json()


def _links(tab: Tab, where: str) -> list[int]:
    return tab.page.eval_on_selector_all(f"{where} a.feature", "els => els.map(e => +e.dataset.feature)")


def _strongest(d: dict, n: int = 10) -> list[int]:
    """Feature ids of one token's features that fire, strongest first."""
    return [f for f, v in sorted(zip(d["indices"], d["values"], strict=True), key=lambda fv: -fv[1]) if v > 0][:n]


def test_text_heat_map_token_then_feature_opens_card(tab, live_server):
    tab.goto("#view=text")
    _wait_ready(tab)
    tab.page.fill("#text-input", TEXT)
    sent, answer = _exchange(tab, "/v1/features/extract", lambda: tab.page.click("#text-run"))
    # normalised units, labels, dense features left out
    assert sent == {"text": TEXT, "features": {"dictionaries": [DICTIONARY_ID], "top_k": 8, "scope": "all",
                                               "normalize": "max", "labels": True, "exclude_dense_above": 0.1}}
    tab.page.wait_for_selector("#heatmap .tok")
    expected = answer["tokens"]
    texts = tab.page.eval_on_selector_all("#heatmap .tok", "els => els.map(e => e.textContent)")
    assert [t.replace("↵", "") for t in texts] == [t["token"] for t in expected]
    shading = _shading(tab, "#heatmap .tok")
    fires = [any(v > 0 for v in t["features"][0]["values"]) for t in expected]
    assert [bool(s) for s in shading] == fires  # shaded exactly where a (non-dense) feature fires
    assert sum(fires) > len(fires) // 2
    assert "view=text" in tab.page.url and "Paris" in tab.page.url  # the text is in the link

    # "show dense features": the same text without leaving dense features out
    assert tab.page.get_attribute("#heatmap", "data-dense") == "0"
    sent, with_dense = _exchange(tab, "/v1/features/extract", lambda: tab.page.check("#show-dense"))
    assert "exclude_dense_above" not in sent["features"]
    tab.page.wait_for_selector("#heatmap[data-dense='1'] .tok")
    assert "dense=1" in tab.page.url
    tab.page.click("#heatmap .tok[data-index='1']")
    assert _links(tab, "#token-detail") == _strongest(with_dense["tokens"][1]["features"][0])
    # the test dictionary has dense features: the token lists differ somewhere
    assert any(a["features"][0]["indices"] != b["features"][0]["indices"]
               for a, b in zip(expected, with_dense["tokens"], strict=True))
    tab.page.uncheck("#show-dense")
    tab.page.wait_for_selector("#heatmap[data-dense='0'] .tok")

    pos = next(i for i, t in enumerate(expected) if t["token"].strip() == "Paris")
    tab.page.click(f"#heatmap .tok[data-index='{pos}']")
    links = _links(tab, "#token-detail")
    assert links == _strongest(expected[pos]["features"][0])
    tab.shot("text")
    feature = links[0]
    tab.page.click(f"#token-detail a.feature[data-feature='{feature}']")
    tab.page.wait_for_selector("#card-examples .example")
    assert f"feature={feature}" in tab.page.url and "view=feature" in tab.page.url
    card = _api(live_server, "GET", f"/v1/dictionaries/{DICTIONARY_ID}/features/{feature}?examples=12")["index"]
    assert tab.page.inner_text("#card-label") == card["label"]
    assert tab.page.locator("#card-examples .example").count() == len(card["examples"]) > 0
    bars = tab.page.locator("svg.histogram rect.binbar")
    assert bars.count() == len(card["histogram"])
    heights = [float(bars.nth(i).get_attribute("height")) for i in range(bars.count())]
    assert [h > 0 for h in heights] == [c > 0 for c in card["histogram"]]
    # each token of the strongest example shaded by its activation over the feature's max
    # (clamped at 1: position 0, left out of the index's statistics, can exceed it)
    first = tab.page.locator("#card-examples .example").first
    shades = first.locator(".tok").evaluate_all("els => els.map(e => e.style.backgroundColor)")
    # "rgba(r, g, b, a)", or "rgb(r, g, b)" when a = 1, or "" when not shaded
    alphas = [float(m.group(1)) if (m := re.fullmatch(r"rgba\(\d+, \d+, \d+, ([\d.]+)\)", s)) else (1.0 if s else 0.0)
              for s in shades]
    ex = card["examples"][0]
    want = [0.0 if a <= 0 else 0.12 + 0.88 * min(1.0, a / card["max_activation"]) for a in ex["activations"]]
    assert alphas == pytest.approx(want, abs=0.002)
    assert alphas[ex["peak"]] == 1.0
    tab.shot("feature")
    assert tab.console_errors == []


def _paris_feature(server: ServerHandle) -> tuple[int, str]:
    """The strongest feature at the token "Paris" of TEXT whose label has a word, and that word."""
    body = {"text": TEXT, "features": {"dictionaries": [DICTIONARY_ID], "top_k": 8, "labels": True,
                                       "normalize": "max", "exclude_dense_above": 0.1}}
    tokens = _api(server, "POST", "/v1/features/extract", body)["tokens"]
    d = next(t for t in tokens if t["token"].strip() == "Paris")["features"][0]
    for feature, label in zip(d["indices"], d["labels"], strict=True):
        words = [w for w in re.findall(r"[A-Za-z]{2,}", label) if w not in ("fires", "on", "never", "fired")]
        if words:
            return feature, words[0]
    raise AssertionError(f"no feature at 'Paris' has a label with a word: {d}")


def test_search_by_label_and_by_example_return_cards(tab, live_server):
    feature, word = _paris_feature(live_server)
    label = word
    card = _api(live_server, "GET", f"/v1/dictionaries/{DICTIONARY_ID}/features?q={word}&limit=24")["results"]
    assert feature in [r["feature"] for r in card], (label, card)
    tab.goto("#view=search")
    _wait_ready(tab)
    tab.page.fill("#search-q", word)
    tab.page.click("#search-label-form button[type=submit]")
    tab.page.wait_for_selector("#search-results .result-card")
    shown = tab.page.eval_on_selector_all("#search-results .result-card", "els => els.map(e => +e.dataset.feature)")
    assert shown == [r["feature"] for r in card]
    tab.page.fill("#search-texts", "Paris is the capital of France.")
    tab.page.fill("#search-contrast", "The cat slept on the warm windowsill.")
    sent, expected = _exchange(tab, "/v1/features/search",
                               lambda: tab.page.click("#search-example-form button[type=submit]"))
    assert sent == {"dictionary": DICTIONARY_ID, "texts": ["Paris is the capital of France."],
                    "contrast_texts": ["The cat slept on the warm windowsill."], "limit": 24,
                    "exclude_dense_above": 0.1}
    tab.page.wait_for_selector("#search-results h3:has-text('minus the contrast')")
    tab.page.wait_for_selector("#search-results .result-card")
    shown = tab.page.eval_on_selector_all("#search-results .result-card", "els => els.map(e => +e.dataset.feature)")
    assert shown == [r["feature"] for r in expected["results"]] and shown, \
        (tab.page.inner_text("#search-results")[:3000], [u for u in tab.requests if "/v1/" in u])
    tab.shot("search")
    tab.page.click("#search-results .result-card >> nth=0")
    tab.page.wait_for_selector("#card-title")
    assert f"feature={shown[0]}" in tab.page.url
    assert tab.console_errors == []


def test_steering_shows_two_different_completions(tab, live_server):
    # the feature that fires most strongly on "Paris", steered with from its card
    feature, _word = _paris_feature(live_server)
    tab.goto(f"#view=feature&feature={feature}")
    _wait_ready(tab)
    tab.page.click("#card-steer")
    tab.page.wait_for_selector("#steer-edits .edit")
    assert "view=steer" in tab.page.url and "steer=" in tab.page.url
    tab.page.fill("#steer-prompt", "Tell me about your day.")
    tab.page.fill("#steer-max-tokens", "12")
    with tab.page.expect_request(lambda r: "/v1/chat/completions" in r.url) as req:
        tab.page.click("#steer-run")
    sent = json.loads(req.value.post_data or "{}")
    assert sent["stream"] is True and sent["compare"] is True and sent["temperature"] == 0
    assert sent["steering"]["edits"] == [{"dictionary": DICTIONARY_ID, "feature": feature, "mode": "add",
                                          "value": 8, "unit": "max"}]
    assert sent["features"]["scope"] == "generated"
    tab.page.wait_for_selector("#steer-outputs[data-done='1']")
    steered = tab.page.inner_text("#steer-steered .completion").strip()
    default = tab.page.inner_text("#steer-default .completion").strip()
    assert steered and default and steered != default
    # the same request without the stream: greedy, so the same two completions (Playwright
    # does not hand back the body of a stream the page reads itself)
    whole = {k: v for k, v in sent.items() if k not in ("stream", "features")}
    ref = _api(live_server, "POST", "/v1/chat/completions", whole)
    shown = lambda s: s.replace("↵", "").replace("→", "\t").strip()  # noqa: E731  (the page's newline/tab marks)
    assert shown(steered) == ref["choices"][0]["message"]["content"].strip()
    assert shown(default) == ref["unsteered"]["choices"][0]["message"]["content"].strip()
    # every generated token the model read is shaded from its own features, the first included;
    # only the last one (never read by the model) is left pending
    for side in ("steered", "default"):
        toks = tab.page.locator(f"#steer-{side} .tok")
        pending = toks.evaluate_all("els => els.map(e => e.classList.contains('pending'))")
        assert pending[:-1] == [False] * (len(pending) - 1) and len(pending) > 2
        assert _shading(tab, f"#steer-{side} .tok:not(.pending)")[0], f"first {side} token unshaded"
    tab.page.click("#steer-steered .tok >> nth=0")
    tab.page.wait_for_selector("#steer-token a.feature")
    tab.shot("steer")
    # the link reproduces the view: prompt, edits and length
    url = tab.page.url
    tab.page.goto("about:blank")
    tab.page.goto(url)
    tab.page.wait_for_selector("#steer-edits .edit")
    assert tab.page.input_value("#steer-prompt") == "Tell me about your day."
    assert tab.page.input_value("#steer-max-tokens") == "12"
    assert _links(tab, "#steer-edits") == [feature]
    assert tab.console_errors == []


def test_dictionary_page_density_and_curves(tab, live_server):
    summary = _api(live_server, "GET", f"/v1/dictionaries/{DICTIONARY_ID}/summary")
    assert summary["has_index"] and summary["d_sae"] == 512
    assert sum(summary["density_counts"]) + summary["never_fired"] == 512
    assert len(summary["density_log10_edges"]) == len(summary["density_counts"]) + 1
    assert summary["training_log"] == [] and summary["fvu"] is None  # the test dictionary has neither file
    import grpc

    from sae_wire import convert as conv
    from sae_wire import sae_serve_pb2 as pb
    from sae_wire import sae_serve_pb2_grpc as pb_grpc

    with grpc.insecure_channel(live_server.grpc_target) as ch:  # the same model over gRPC
        msg = pb_grpc.SAEServiceStub(ch).GetDictionarySummary(pb.GetDictionarySummaryRequest(dictionary=DICTIONARY_ID),
                                                              timeout=120)
        assert conv.dictionary_summary_from_pb(msg).model_dump() == summary
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.SAEServiceStub(ch).GetDictionarySummary(pb.GetDictionarySummaryRequest(dictionary="nope"),
                                                            timeout=120)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "dictionary" in err.value.details()
    log = live_server.dictionary_dir / "training_log.jsonl"
    points = [{"step": s, "tokens": s * 256, "loss": 1 / s, "fvu": 1 / s, "l0": 16.0, "dead": 0.5 / s}
              for s in range(10, 110, 10)]
    log.write_text("".join(json.dumps(p) + "\n" for p in points))
    try:
        again = _api(live_server, "GET", f"/v1/dictionaries/{DICTIONARY_ID}/summary")
        assert [p["step"] for p in again["training_log"]] == list(range(10, 110, 10))
        tab.goto("#view=dictionary")
        _wait_ready(tab)
        tab.page.wait_for_selector("#dict-curves svg.linechart")
        assert tab.page.locator("#dict-curves svg.linechart path.curve").count() == 4
        bars = tab.page.locator("#dict-density rect.binbar")
        assert bars.count() == len(summary["density_counts"])
        tab.shot("dictionary")
    finally:
        log.unlink()
    assert tab.console_errors == []


def test_api_key_page_works_after_entering_it(browser, keyed_server):
    base = keyed_server.base_url
    assert httpx.get(f"{base}/ui/js/api.js", timeout=30).status_code == 200  # the page's files are open
    assert httpx.get(f"{base}/v1/models", timeout=30).status_code == 401  # its data is not
    tab = _open(browser, keyed_server)
    try:
        tab.goto(f"#view=text&text={TEXT.replace(' ', '+')}")
        banner = tab.page.locator("#banner")
        banner.wait_for(state="visible")
        assert "needs an API key" in banner.inner_text()
        assert tab.page.locator("#heatmap .tok").count() == 0
        tab.shot("api-key-missing")
        tab.page.fill("#api-key", "not-the-key")
        tab.page.click("#key-form button[type=submit]")
        tab.page.wait_for_selector("#banner:has-text('was refused')")
        tab.page.fill("#api-key", FAULT_API_KEY)
        tab.page.click("#key-form button[type=submit]")
        _wait_ready(tab)
        tab.page.wait_for_selector("#heatmap .tok")
        assert banner.is_hidden()
        assert len(_shading(tab, "#heatmap .tok")) > 5
        # the key stays in this tab only: sessionStorage, never the URL or localStorage
        assert tab.page.evaluate("sessionStorage.getItem('sae-serve-api-key')") == FAULT_API_KEY
        assert tab.page.evaluate("localStorage.length") == 0 and FAULT_API_KEY not in tab.page.url
        # the server has no feature index: the page says so on a card instead of failing
        tab.page.click("#heatmap .tok >> nth=1")
        tab.page.click("#token-detail a.feature >> nth=0")
        tab.page.wait_for_selector("#view-feature :text('no feature index')")
        tab.shot("api-key-entered")
        unexpected = [e for e in tab.console_errors if "401" not in e]
        assert unexpected == []
    finally:
        tab.page.context.close()
