"""The README's playground screenshots, made against what `make serve` serves.

Starts ``sae-serve`` on free ports with the embedded default model and the default
dictionary (``sae_runtime/data/default_dictionary``, with its feature index), eager for a
quicker start; opens ``/ui`` in headless Chromium (Debian's ``/usr/bin/chromium``, driven by
Playwright: ``make browser`` installs it); runs a text in the text view, pins one token and
opens, from its top features, the first one whose label names that token (else its
strongest); saves

- ``<out>/playground.png``: the text view, the heat map with the token's features pinned;
- ``<out>/playground-card.png``: that feature's card;

then stops the server and checks that none of its processes is left.

Run from the repository root (one vLLM engine at a time on a small machine)::

    make browser
    flock /tmp/sae-engine.lock .venv/bin/python scripts/playground_screenshots.py
    .venv/bin/python scripts/playground_screenshots.py --text "..." --token ship --out /tmp/shots
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

from load import free_port, start_server, stop_server  # noqa: E402  (benchmarks/load.py)

from tests.browser_helpers import VIEWPORT, ensure_chromium, launch_chromium, new_page, wait_ready  # noqa: E402

TEXT = (
    "The old ship left the harbour at dawn and sailed out across the Atlantic, while the passengers "
    "watched the lighthouse fade into the fog."
)
TOKEN = "ship"
LABEL_WORDS = ("ship", "naval", "maritime", "boat", "sail")
"""What the card's feature is picked by: the first of the token's features whose label names one."""
TIMEOUT_MS = 300_000


def pick_feature(links: list[int], labels: dict[int, str], words: tuple[str, ...]) -> int:
    """The first of ``links`` (the token's features, strongest first) whose label names one of
    ``words`` (else the strongest)."""
    for feature in links:
        if any(w.lower() in labels.get(feature, "").lower() for w in words):
            return feature
    return links[0]


def screenshots(base: str, dictionary: str, text: str, word: str, out: Path,
                label_words: tuple[str, ...] = LABEL_WORDS) -> tuple[int, str]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = new_page(browser, TIMEOUT_MS)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{base}/ui/#view=text")
            wait_ready(page, dictionary)
            page.fill("#text-input", text)
            with page.expect_response(lambda r: "/v1/features/extract" in r.url and r.request.method == "POST") as info:
                page.click("#text-run")
            answer = info.value.json()
            page.wait_for_selector("#heatmap .tok")
            tokens = answer["tokens"]
            pos = next((i for i, t in enumerate(tokens) if t["token"].strip() == word), None)
            if pos is None:
                raise SystemExit(f"no token {word!r} in {[t['token'] for t in tokens]}")
            page.click(f"#heatmap .tok[data-index='{pos}']")
            page.wait_for_selector("#token-detail a.feature")
            links = page.eval_on_selector_all("#token-detail a.feature", "els => els.map(e => +e.dataset.feature)")
            d = tokens[pos]["features"][0]
            labels = dict(zip(d["indices"], d.get("labels") or [], strict=False))
            feature = pick_feature(links, labels, (word, *label_words))
            out.mkdir(parents=True, exist_ok=True)
            page.mouse.move(1, VIEWPORT["height"] - 1)  # off the token: its hover tooltip closes
            page.wait_for_selector("#tooltip", state="hidden")
            box = page.locator("#view-text").bounding_box()  # the header and the view, not the empty page below
            height = box["y"] + box["height"] + 24
            page.screenshot(
                path=str(out / "playground.png"), clip={"x": 0, "y": 0, "width": VIEWPORT["width"], "height": height}
            )
            # the card by its URL (a fresh page on #view=feature&feature=N, what the token's link
            # opens): one run on a busy machine once timed out after clicking the link; on a quiet
            # machine the click renders the card in 0.2 s (tests/test_browser_playground.py clicks)
            card = new_page(browser, TIMEOUT_MS)
            card.on("pageerror", lambda e: errors.append(str(e)))
            card.goto(f"{base}/ui/#view=feature&feature={feature}")
            card.wait_for_selector("#card-examples .example")
            card.wait_for_selector("svg.histogram rect.binbar", state="attached")
            card.mouse.move(1, VIEWPORT["height"] - 1)
            card.screenshot(path=str(out / "playground-card.png"), full_page=True)
            if errors:
                raise SystemExit(f"the page reported errors: {errors}")
            return feature, labels.get(feature, "")
        finally:
            browser.close()


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", default=TEXT, help="the text run in the text view")
    ap.add_argument("--token", default=TOKEN, help="the token of the text to pin (without its leading space)")
    ap.add_argument("--out", type=Path, default=REPO / "docs", help="where the two PNGs go (default: docs/)")
    ap.add_argument("--start-timeout", type=float, default=900.0)
    args = ap.parse_args()
    reason = ensure_chromium()
    if reason:
        print(f"playground_screenshots: {reason}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="playground-shots-") as tmp:
        http_port, grpc_port = free_port(), free_port()
        while grpc_port == http_port:
            grpc_port = free_port()
        t0 = time.monotonic()
        proc = start_server(
            SimpleNamespace(dictionary_dir=None, server_args="--eager", start_timeout=args.start_timeout),
            http_port,
            grpc_port,
            Path(tmp),
        )
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        base = f"http://127.0.0.1:{http_port}"
        try:
            print(f"sae-serve healthy after {time.monotonic() - t0:.0f}s", flush=True)
            dictionaries = httpx.get(f"{base}/v1/dictionaries", timeout=60).json()["data"]
            dictionary = dictionaries[0]["id"]
            feature, label = screenshots(base, dictionary, args.text, args.token, args.out)
            print(f"dictionary {dictionary}; token {args.token!r}: feature {feature} ({label})")
            print(f"wrote {args.out / 'playground.png'} and {args.out / 'playground-card.png'}")
        finally:
            stop_server(proc)
            _, alive = psutil.wait_procs(tree, timeout=30)
            left = [p for p in alive if _alive(p)]
            for p in left:
                p.kill()
    if left:
        print(
            f"playground_screenshots: processes left after SIGTERM (killed): {[p.pid for p in left]}", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
