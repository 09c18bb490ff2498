"""Labels written by a language model (``sae-index --explainer URL``), scored by detection.

Any OpenAI-compatible chat endpoint can be the explainer (sae-serve itself included). For
each feature, from the examples stored in the index (:mod:`.labels` splits them by rank:
even ranks are shown, odd ranks held out):

1. *Explain*: one chat request shows the shown examples' windows with each peak token
   marked ``<<like this>>`` and asks for a short label (:func:`explain_prompt`); the first
   line of the answer, without quotes or a ``Label:`` prefix, is the label
   (:func:`parse_label`; an answer with no words is an error).
2. *Detect*: for each held-out example and as many random corpus windows where the feature
   does not fire (the index's ``random_windows``, chosen as for the deterministic label,
   :func:`.labels.pick_non_activating`), one chat request asks the same endpoint whether the
   window's text matches the label (:func:`detect_prompt`); an answer starting with "yes"
   is a detection, anything else is not (:func:`parse_verdict`; answers that are neither
   "yes" nor "no" are counted in the report).
3. *Score*: ``label_score`` = balanced accuracy of those verdicts
   (:func:`.labels.balanced_accuracy`): (held-out windows detected / held-out windows +
   random windows not detected / random windows) / 2; 0.5 is chance.

The label is stored with ``label_source = "explainer:<model>"``. Each finished feature is
appended to a work file (``<index>.labels.jsonl``) as it completes, so an interrupted run
started again skips it, as it skips features the index already holds a label of this
explainer for; the index file itself is replaced once, at the end (servers hold it open
read-only). A feature whose requests fail keeps its label (the deterministic one) and is
named in the report; an endpoint that cannot be reached at all stops the run before any
feature (:class:`ExplainerError`).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .labels import balanced_accuracy, pick_non_activating, split_examples
from .store import Example, FeatureIndex, LabelUpdate, RandomWindow, update_labels

LABEL_MAX_TOKENS = 24
VERDICT_MAX_TOKENS = 3
LABEL_MAX_CHARS = 120
PEAK_OPEN, PEAK_CLOSE = "<<", ">>"

EXPLAIN_TEMPLATE = (
    "Below are short text excerpts where one feature of a language model is most active. "
    "In each excerpt the token where it is most active is marked {open}like this{close}.\n\n"
    "{excerpts}\n\n"
    "What do the marked tokens have in common? Answer with a short label of at most six words "
    "and nothing else.")
DETECT_TEMPLATE = (
    "Label: {label}\n"
    "Text: {text}\n\n"
    "Does the text contain something that matches the label? Answer yes or no.")


class ExplainerError(ValueError):
    """The explainer cannot be used at all (unreachable, no model): nothing is labelled."""


class ExplainerCallError(RuntimeError):
    """One request to the explainer failed or its answer is unusable."""


@dataclass(frozen=True)
class ExplainerSettings:
    url: str
    model: str | None = None
    """The endpoint's model; None = the first one its ``GET /models`` lists."""
    api_key: str | None = None
    concurrency: int = 4
    """Requests in flight at once."""
    timeout_s: float = 120.0


@dataclass
class FeatureLabel:
    """What the explainer said about one feature."""

    feature: int
    label: str
    score: float | None
    activating: list[bool]
    """Verdict on each held-out example."""
    non_activating: list[bool]
    """Verdict on each random non-firing window."""
    unclear: int
    """Verdicts that were neither "yes" nor "no" (counted as not detected)."""

    def update(self, source: str) -> LabelUpdate:
        return LabelUpdate(self.feature, self.label, source, self.score)


@dataclass
class LabelReport:
    source: str
    labelled: list[int] = field(default_factory=list)
    """Features labelled in this run."""
    skipped: list[int] = field(default_factory=list)
    """Features that already had a label of this explainer (index or work file)."""
    failed: dict[int, str] = field(default_factory=dict)
    """Features whose requests failed, with the reason; they keep their label."""
    unscorable: list[int] = field(default_factory=list)
    """Features with fewer than two examples or no non-firing random window: not sent."""
    unclear: int = 0
    results: dict[int, FeatureLabel] = field(default_factory=dict)
    """This run's labels with their verdicts."""


# -- prompts and answers ------------------------------------------------------------------------


def _squash(text: str) -> str:
    return " ".join(text.split())


def marked_window(token_ids: Sequence[int], peak: int, decode: Callable[[list[int]], str]) -> str:
    """The window's text with its peak token marked."""
    ids = list(token_ids)
    before, tok, after = decode(ids[:peak]), decode(ids[peak:peak + 1]), decode(ids[peak + 1:])
    lead = " " if tok[:1].isspace() else ""
    return _squash(f"{before}{lead}{PEAK_OPEN}{tok.strip()}{PEAK_CLOSE}{after}")


def explain_prompt(examples: Sequence[Example], decode: Callable[[list[int]], str]) -> str:
    excerpts = "\n".join(f"{i + 1}. {marked_window(e.token_ids, e.peak, decode)}" for i, e in enumerate(examples))
    return EXPLAIN_TEMPLATE.format(open=PEAK_OPEN, close=PEAK_CLOSE, excerpts=excerpts)


def detect_prompt(label: str, text: str) -> str:
    return DETECT_TEMPLATE.format(label=label, text=_squash(text))


_LABEL_PREFIX = re.compile(r"^\s*(?:the\s+)?(?:label|answer)\s*[:\-]\s*", re.I)
_VERDICT = re.compile(r"^\W*(yes|no)\b", re.I)


def parse_label(answer: str) -> str:
    """The label in an explainer's answer: its first line with words, without a ``Label:``
    prefix, quotes or a final full stop, at most :data:`LABEL_MAX_CHARS` characters."""
    for line in answer.splitlines():
        text = _LABEL_PREFIX.sub("", line).strip()
        for _ in range(2):  # quotes around a final full stop, or the other way round
            text = text.strip("\"'`*").strip().rstrip(".").strip()
        if re.search(r"\w", text):
            return text[:LABEL_MAX_CHARS]
    raise ExplainerCallError(f"the answer holds no label: {answer[:200]!r}")


def parse_verdict(answer: str) -> bool | None:
    """True for an answer starting with "yes", False for "no", None otherwise."""
    m = _VERDICT.match(answer)
    return None if m is None else m.group(1).lower() == "yes"


# -- the endpoint -------------------------------------------------------------------------------


class Explainer:
    """An OpenAI-compatible chat endpoint (the ``openai`` client), with bounded concurrency."""

    def __init__(self, settings: ExplainerSettings):
        import openai

        self.settings = settings
        self.client = openai.AsyncOpenAI(base_url=settings.url, api_key=settings.api_key or "unused",
                                         timeout=settings.timeout_s, max_retries=1)
        self.model = settings.model or ""
        self._sem = asyncio.Semaphore(max(1, settings.concurrency))

    async def connect(self) -> str:
        """Check that the endpoint answers and settle the model; raises ExplainerError."""
        import openai

        try:
            if not self.model:
                models = [m.id async for m in self.client.models.list()]
                if not models:
                    raise ExplainerError(f"explainer: {self.settings.url} lists no model; pass --explainer-model")
                self.model = models[0]
            await self.chat("Answer yes or no: is the sky blue?", 1)
        except openai.APIConnectionError as exc:  # timeouts included
            raise ExplainerError(f"explainer: cannot reach {self.settings.url}: {exc}") from None
        except openai.APIStatusError as exc:
            raise ExplainerError(f"explainer: {self.settings.url} answered {exc.status_code}: "
                                 f"{_short(exc.message)}") from None
        except (ExplainerCallError, openai.OpenAIError, ValueError) as exc:
            raise ExplainerError(f"explainer: {self.settings.url}: not an OpenAI-compatible chat endpoint? "
                                 f"{type(exc).__name__}: {_short(str(exc))}") from None
        return self.model

    async def chat(self, prompt: str, max_tokens: int) -> str:
        import openai

        async with self._sem:
            try:
                resp = await self.client.chat.completions.create(
                    model=self.model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                    temperature=0)
            except openai.APIStatusError as exc:
                raise ExplainerCallError(f"HTTP {exc.status_code}: {_short(exc.message)}") from None
            except (openai.OpenAIError, ValueError) as exc:  # ValueError: a body that is not JSON
                raise ExplainerCallError(f"{type(exc).__name__}: {_short(str(exc))}") from None
        try:
            content = resp.choices[0].message.content
        except (AttributeError, IndexError, TypeError):
            content = None
        if not isinstance(content, str):
            raise ExplainerCallError(f"not a chat completion: {_short(repr(resp))}")
        return content

    async def close(self) -> None:
        await self.client.close()


def _short(text: str, n: int = 300) -> str:
    return text if len(text) <= n else text[:n] + "..."


async def label_feature(explainer: Explainer, feature: int, examples: Sequence[Example],
                        random_windows: Sequence[RandomWindow], non_firing: Sequence[int],
                        decode: Callable[[list[int]], str]) -> FeatureLabel:
    """Explain, detect and score one feature (see the module's docstring); ``non_firing`` are
    the random windows to use."""
    shown, _ = split_examples(len(examples))
    label = parse_label(await explainer.chat(explain_prompt([examples[i] for i in shown], decode),
                                             LABEL_MAX_TOKENS))
    return await score_label(explainer, feature, label, examples, random_windows, non_firing, decode)


async def score_label(explainer: Explainer, feature: int, label: str, examples: Sequence[Example],
                      random_windows: Sequence[RandomWindow], non_firing: Sequence[int],
                      decode: Callable[[list[int]], str]) -> FeatureLabel:
    """The detection test of ``label`` (any label: the benchmark scores the deterministic
    ones this way too) on the held-out examples and the random windows ``non_firing``."""
    _, held = split_examples(len(examples))

    async def verdict(ids: Sequence[int]) -> bool | None:
        return parse_verdict(await explainer.chat(detect_prompt(label, decode(list(ids))), VERDICT_MAX_TOKENS))

    got = await asyncio.gather(*[verdict(examples[i].token_ids) for i in held],
                               *[verdict(random_windows[j].token_ids) for j in non_firing])
    act = [v is True for v in got[:len(held)]]
    non = [v is True for v in got[len(held):]]
    return FeatureLabel(feature, label, balanced_accuracy(act, non), act, non, sum(v is None for v in got))


# -- a whole index ------------------------------------------------------------------------------


def work_file(index_path: Path) -> Path:
    return index_path.with_name(index_path.name + ".labels.jsonl")


def _read_work(path: Path, source: str) -> dict[int, LabelUpdate]:
    out: dict[int, LabelUpdate] = {}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by an interruption
            continue
        if row.get("label_source") == source:
            out[int(row["feature"])] = LabelUpdate(int(row["feature"]), row["label"], source, row["label_score"])
    return out


def label_index(index_path: str | Path, settings: ExplainerSettings, decode: Callable[[list[int]], str], *,
                features: Sequence[int] | None = None, progress: bool = True) -> LabelReport:
    """Label the features of the index at ``index_path`` (all that fired, or ``features``)
    with the explainer and write them into it (the file is replaced once, at the end).
    ``decode`` turns token ids into text (the model's tokenizer). Raises ExplainerError when
    the endpoint cannot be used, ValueError when the index has no random windows."""
    return asyncio.run(_label_index(Path(index_path), settings, decode, features, progress))


async def _label_index(path: Path, settings: ExplainerSettings, decode: Callable[[list[int]], str],
                       features: Sequence[int] | None, progress: bool) -> LabelReport:
    from tqdm import tqdm

    idx = FeatureIndex(path)
    try:
        windows = idx.random_windows()
        if windows is None:
            raise ValueError(f"{path}: no random_windows table (an index written before it existed); "
                             "sae-index --label-only adds it")
        wanted = list(range(idx.d_sae)) if features is None else [int(f) for f in features]
        bad = [f for f in wanted if not 0 <= f < idx.d_sae]
        if bad:
            raise ValueError(f"explainer_features: {bad[:5]} out of range (the dictionary has {idx.d_sae})")
        firing = np.zeros((idx.d_sae, len(windows)), bool)
        for j, w in enumerate(windows):
            firing[w.active, j] = True
        explainer = Explainer(settings)
        try:
            model = await explainer.connect()
            source = f"explainer:{model}"
            report = LabelReport(source)
            wf = work_file(path)
            done = _read_work(wf, source)
            sources = idx.label_sources()
            todo: list[tuple[int, list[Example], list[int]]] = []
            for f in wanted:
                if f in done or sources.get(f) == source:
                    report.skipped.append(f)
                    continue
                exs = idx.examples(f)
                held = len(split_examples(len(exs))[1])
                non = pick_non_activating(f, firing[f].tolist(), held)
                if held == 0 or not non:
                    if features is not None:
                        report.unscorable.append(f)
                    continue
                todo.append((f, exs, non))
            bar = tqdm(total=len(todo), unit="feature", desc="sae-index labels", disable=not progress)

            async def one(f: int, exs: list[Example], non: list[int]) -> FeatureLabel | None:
                try:
                    return await label_feature(explainer, f, exs, windows, non, decode)
                except ExplainerCallError as exc:
                    report.failed[f] = str(exc)
                    return None

            with wf.open("a") as log:
                pending = [asyncio.ensure_future(one(*t)) for t in todo]
                for fut in asyncio.as_completed(pending):
                    res = await fut
                    bar.update(1)
                    if res is None:
                        continue
                    u = res.update(source)
                    log.write(json.dumps({"feature": u.feature, "label": u.label, "label_source": source,
                                          "label_score": u.label_score, "held_out": res.activating,
                                          "random": res.non_activating}) + "\n")
                    log.flush()
                    done[u.feature] = u
                    report.labelled.append(u.feature)
                    report.results[u.feature] = res
                    report.unclear += res.unclear
            bar.close()
        finally:
            await explainer.close()
    finally:
        idx.close()
    if done:
        update_labels(path, path, [done[f] for f in sorted(done)])
    work_file(path).unlink(missing_ok=True)
    report.labelled.sort()
    return report
