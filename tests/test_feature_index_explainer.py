"""``sae-index --explainer``: labels from an OpenAI-compatible chat endpoint, scored by detection.

Without an engine: the prompts and answer parsing, and a whole labelling run against a
small OpenAI-compatible HTTP endpoint written here (fixed answers, every request recorded):
the stored label is the endpoint's, the score is the balanced accuracy of its yes/no
verdicts, a feature whose request fails keeps its label and is reported, a rerun skips what
is labelled, an unreachable endpoint stops the run with a clear error. Then the real thing:
the session's ``sae-serve`` (the default model's chat) labels a few features of a small
index, and each stored label and score is what that endpoint answers to the same prompts.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from sae_runtime.feature_index import HIST_BINS, QUANTILE_LEVELS, Example, FeatureIndex, FeatureRecord, IndexWriter
from sae_runtime.feature_index import cli as index_cli
from sae_runtime.feature_index.build import explainer_base_url
from sae_runtime.feature_index.explainer import (
    LABEL_MAX_TOKENS,
    VERDICT_MAX_TOKENS,
    ExplainerError,
    ExplainerSettings,
    detect_prompt,
    explain_prompt,
    label_index,
    marked_window,
    parse_label,
    parse_verdict,
    work_file,
)
from sae_runtime.feature_index.labels import balanced_accuracy, pick_non_activating
from sae_runtime.feature_index.store import RandomWindow
from tests.server_fixtures import free_port

VOCAB = ["<pad>", "the", "sea", "was", "calm", "waves", "ocean", "dog", "barked", "1990", "2001", "year",
         "unclear", "BROKEN", "cat", "sat", "HTTP500"]
ID = {w: i for i, w in enumerate(VOCAB)}


def decode(ids: list[int]) -> str:
    return "".join(" " + VOCAB[i] for i in ids)


def toks(text: str) -> list[int]:
    return [ID[w] for w in text.split()]


def test_prompts_and_answers():
    assert marked_window(toks("the sea was calm"), 1, decode) == "the <<sea>> was calm"
    ex = Example(3.0, toks("the sea was"), [0, 3.0, 0], 1, "d", 1)
    prompt = explain_prompt([ex], decode)
    assert "1. the <<sea>> was" in prompt and "short label" in prompt
    assert "Label: the sea\nText: the dog barked" in detect_prompt("the sea", " the  dog\nbarked")
    assert parse_label('Label: "The sea and waves".\nMore text') == "The sea and waves"
    assert parse_label("\n  sea words") == "sea words"
    with pytest.raises(Exception, match="no label"):
        parse_label("  ...\n")
    assert parse_verdict("Yes.") is True and parse_verdict(" no, it does not") is False
    assert parse_verdict("Maybe") is None and parse_verdict("yesterday") is None
    assert explainer_base_url("http://h:8000") == "http://h:8000/v1"
    assert explainer_base_url("https://api.x.com/v1/") == "https://api.x.com/v1/"
    with pytest.raises(ValueError, match="explainer: 'h:8000' is not an http"):
        explainer_base_url("h:8000")


# -- a fake OpenAI-compatible endpoint --------------------------------------------------------


class FakeEndpoint:
    """Answers like a chat model with fixed rules; records every prompt."""

    model = "fake-explainer"

    def __init__(self) -> None:
        self.prompts: list[str] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, status: int, body: object) -> None:
                data = json.dumps(body).encode() if not isinstance(body, bytes) else body
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.startswith("/garbage"):
                    return self._send(200, b"<html>not an API</html>")
                self._send(200, {"object": "list", "data": [{"id": endpoint.model, "object": "model",
                                                              "created": 0, "owned_by": "test"}]})

            def do_POST(self) -> None:
                if self.path.startswith("/garbage"):
                    return self._send(200, b"<html>not an API</html>")
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = req["messages"][-1]["content"]
                endpoint.prompts.append(prompt)
                if "<<HTTP500>>" in prompt:
                    return self._send(500, {"error": {"message": "the model fell over"}})
                self._send(200, {"id": "c", "object": "chat.completion", "created": 0, "model": req["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": endpoint.answer(prompt)}}],
                                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    @staticmethod
    def answer(prompt: str) -> str:
        if prompt.startswith("Below are"):
            if "<<BROKEN>>" in prompt:
                return "  \n"  # no label in it
            return "Label: the sea." if "<<sea>>" in prompt else "years"
        if prompt.startswith("Label:"):
            label, text = (line.split(": ", 1)[1] for line in prompt.splitlines()[:2])
            if "unclear" in text.split():
                return "Perhaps"
            return "Yes" if label.split()[-1].rstrip("s") in text.split() else "No"
        return "yes"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint():
    e = FakeEndpoint()
    yield e
    e.close()


def _record(f: int, label: str) -> FeatureRecord:
    return FeatureRecord(feature=f, max_act=1.0, n_fired=1, density=0.1, quantiles=[0.5] * len(QUANTILE_LEVELS),
                         hist=[0] * HIST_BINS, label=label, label_source="tokens", label_score=0.6)


RANDOM = ["the sea was calm", "the sea waves", "the dog barked", "the cat sat", "the year 2001 unclear",
          "the dog sat", "the cat barked"]
"""Random windows; feature 0 fires in the first."""
EXAMPLES = {
    0: ["the sea was calm", "calm sea waves", "the sea waves", "the ocean was calm"],  # held out: ranks 1, 3
    1: ["the BROKEN sea", "a BROKEN thing"],
    3: ["the year 1990", "year 2001 unclear", "1990 was calm", "the year 2001"],  # held out: ranks 1, 3
    4: ["the HTTP500 sea", "the HTTP500 ocean"],
}
PEAK = {0: "sea", 1: "BROKEN", 3: "1990", 4: "HTTP500"}


def small_index(path: Path) -> Path:
    with IndexWriter(path, {"dictionary_id": "d", "d_sae": 6}) as w:
        w.add_features([_record(f, f"tokens label {f}") for f in range(6)])
        for f, texts in EXAMPLES.items():
            exs = []
            for r, text in enumerate(texts):
                ids = [ID.get(t, ID["the"]) for t in text.split()]
                peak = next((i for i, t in enumerate(text.split()) if t == PEAK[f]), 0)
                exs.append(Example(5.0 - r, ids, [0.0] * len(ids), peak, "doc", peak))
            w.add_examples(f, exs)
        w.add_random_windows([RandomWindow(i, toks(t), [0] if i == 0 else []) for i, t in enumerate(RANDOM)])
    return path


def test_explainer_labels_and_scores_every_feature_it_can(tmp_path, endpoint):
    path = small_index(tmp_path / "idx.sqlite")
    settings = ExplainerSettings(url=endpoint.url, concurrency=3)
    report = label_index(path, settings, decode, progress=False)
    source = "explainer:fake-explainer"
    assert report.source == source and report.labelled == [0, 3]
    assert set(report.failed) == {1, 4}
    assert "no label" in report.failed[1] and "HTTP 500" in report.failed[4] and "fell over" in report.failed[4]
    idx = FeatureIndex(path)
    # Feature 0: held out "calm sea waves" (yes), "the ocean was calm" (no); the random
    # windows it does not fire in, in its rotation: "the sea waves" (a false yes), "the dog barked" (no).
    non = pick_non_activating(0, [True] + [False] * 6, 2)
    assert [RANDOM[i] for i in non] == ["the sea waves", "the dog barked"]
    f0 = idx.feature(0)
    assert f0.label == "the sea" and f0.label_source == source
    assert f0.label_score == pytest.approx(balanced_accuracy([True, False], [True, False])) == 0.5
    # Feature 3 ("years"): held out "year 2001 unclear" (neither yes nor no: not detected) and
    # "the year 2001" (yes); random windows "the cat barked" and "the sea was calm" (no, no).
    assert [RANDOM[i] for i in pick_non_activating(3, [False] * 7, 2)] == ["the cat barked", "the sea was calm"]
    f3 = idx.feature(3)
    assert (f3.label, f3.label_score) == ("years", 0.75) and report.unclear == 1
    # Failed and never-firing features keep their deterministic labels.
    for f in (1, 2, 4, 5):
        r = idx.feature(f)
        assert (r.label, r.label_source, r.label_score) == (f"tokens label {f}", "tokens", 0.6)
    assert [h.feature for h in idx.search("sea")] == [0]  # the search follows the new label
    idx.close()
    assert not work_file(path).exists()

    # Run again: the labelled features are skipped, only the failed ones are asked again.
    endpoint.prompts.clear()
    again = label_index(path, settings, decode, progress=False)
    assert sorted(again.skipped) == [0, 3] and again.labelled == [] and set(again.failed) == {1, 4}
    assert not any("<<sea>> was calm" in p or "<<1990>>" in p for p in endpoint.prompts)


def test_an_interrupted_run_resumes_from_its_work_file(tmp_path, endpoint):
    path = small_index(tmp_path / "idx.sqlite")
    source = "explainer:fake-explainer"
    work_file(path).write_text(json.dumps({"feature": 3, "label": "from before", "label_source": source,
                                           "label_score": 0.9}) + "\n" + '{"feature": 0, "lab')  # cut line
    report = label_index(path, ExplainerSettings(url=endpoint.url), decode, features=[0, 3, 2], progress=False)
    assert report.skipped == [3] and report.labelled == [0] and report.unscorable == [2]
    assert not any("<<1990>>" in p for p in endpoint.prompts)
    idx = FeatureIndex(path)
    assert (idx.feature(3).label, idx.feature(3).label_score, idx.feature(3).label_source) == ("from before", 0.9,
                                                                                             source)
    assert idx.feature(0).label == "the sea"


def test_unreachable_or_garbage_endpoint_stops_before_any_feature(tmp_path, endpoint):
    path = small_index(tmp_path / "idx.sqlite")
    before = path.read_bytes()
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(ExplainerError, match=f"explainer: cannot reach {re.escape(dead)}"):
        label_index(path, ExplainerSettings(url=dead, timeout_s=5), decode, progress=False)
    garbage = endpoint.url.replace("/v1", "/garbage/v1")
    with pytest.raises(ExplainerError, match=r"explainer: .*garbage.*not an OpenAI-compatible chat endpoint"):
        label_index(path, ExplainerSettings(url=garbage, timeout_s=5), decode, progress=False)
    assert path.read_bytes() == before


def test_label_only_cli_errors(tmp_path, capsys):
    missing = tmp_path / "none.sqlite"
    assert index_cli.main(["--label-only", "--out", str(missing), "--explainer", "http://127.0.0.1:1/v1"]) == 2
    assert "out: no index at" in capsys.readouterr().err
    path = small_index(tmp_path / "idx.sqlite")
    assert index_cli.main(["--label-only", "--out", str(path)]) == 2
    assert "explainer: --label-only labels an existing index with an explainer" in capsys.readouterr().err
    assert index_cli.main(["--label-only", "--out", str(path), "--explainer", "localhost:8000"]) == 2
    assert "explainer: 'localhost:8000' is not an http(s) URL" in capsys.readouterr().err
    # A build with a malformed explainer URL stops before the engine starts.
    assert index_cli.main(["--explainer", "ftp://x", "--out", str(tmp_path / "new.sqlite")]) == 2
    assert "explainer: 'ftp://x' is not an http(s) URL" in capsys.readouterr().err
    assert not (tmp_path / "new.sqlite").exists()
    assert index_cli.main(["--explainer-concurrency", "0", "--print-config"]) == 2
    assert "--explainer-concurrency: Input should be greater than 0" in capsys.readouterr().err
    assert index_cli.main(["--explainer-api-key", "sk-secret", "--print-config"]) == 0
    assert "sk-secret" not in capsys.readouterr().out


# -- the session's sae-serve as the explainer -------------------------------------------------

SEA = ["The ship sailed across the sea at dawn.", "Fish swim deep in the sea near the coast.",
       "A storm rose over the sea that night.", "They swam in the warm sea all summer."]
YEARS = ["The war ended in 1945 after six years.", "In 1969 astronauts walked on the Moon.",
         "The company was founded in 1998 in a garage.", "By 1910 the town had doubled in size."]
OTHER = ["The cat sat on the mat.", "She baked bread with flour and butter.", "He fixed the old bicycle.",
         "The train was late again this morning.", "Please close the door behind you."]


@pytest.mark.slow
def test_sae_serve_labels_features_of_a_small_index(tmp_path, live_server, default_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    def peak_of(text: str, word: str) -> int:
        return next(i for i, t in enumerate(ids(text)) if word in tok.decode([t]))

    path = tmp_path / "feature_index.sqlite"
    features = {0: (SEA, " sea"), 1: (YEARS, "1")}
    with IndexWriter(path, {"dictionary_id": "d", "d_sae": 3}) as w:
        w.add_features([_record(f, f"tokens label {f}") for f in range(3)])
        for f, (texts, word) in features.items():
            w.add_examples(f, [Example(4.0 - r, ids(t), [0.0] * len(ids(t)), peak_of(t, word), "doc", 0)
                               for r, t in enumerate(texts)])
        w.add_random_windows([RandomWindow(i, ids(t), []) for i, t in enumerate(OTHER)])

    url = f"{live_server.base_url}/v1"
    model = httpx.get(f"{url}/models", timeout=30).json()["data"][0]["id"]
    # One request at a time: each answer then comes from a batch of one, as the direct
    # requests below do (greedy answers are deterministic).
    report = label_index(path, ExplainerSettings(url=url, concurrency=1), tok.decode, progress=False)
    assert report.labelled == [0, 1] and not report.failed, report

    def ask(prompt: str, max_tokens: int) -> str:
        r = httpx.post(f"{url}/chat/completions", timeout=120, json={
            "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    idx = FeatureIndex(path)
    windows = idx.random_windows()
    assert windows is not None
    for f in features:
        rec, exs = idx.feature(f), idx.examples(f)
        label = parse_label(ask(explain_prompt([exs[0], exs[2]], tok.decode), LABEL_MAX_TOKENS))
        assert rec.label_source == f"explainer:{model}" and rec.label == label
        non = pick_non_activating(f, [False] * len(windows), 2)
        held = [parse_verdict(ask(detect_prompt(label, tok.decode(exs[r].token_ids)), VERDICT_MAX_TOKENS))
                for r in (1, 3)]
        rand = [parse_verdict(ask(detect_prompt(label, tok.decode(windows[j].token_ids)), VERDICT_MAX_TOKENS))
                for j in non]
        assert rec.label_score == pytest.approx(balanced_accuracy([v is True for v in held],
                                                                  [v is True for v in rand]))
    assert idx.feature(2).label_source == "tokens"
    idx.close()
    shutil.rmtree(tmp_path, ignore_errors=True)
