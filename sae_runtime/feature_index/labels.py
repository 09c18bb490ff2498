"""The deterministic feature label (``label_source = "tokens"``) and its detection score.

A feature's top examples are split by rank: even ranks (0, 2, 4, ...) make the label, odd
ranks are held out to score it. The label's *words* are the tokens at the peaks of the
label examples, compared as stripped lower-case text, most frequent first (ties: the
stronger example first), at most :data:`LABEL_WORDS`; the label text quotes them and adds
the two tokens the feature's decoder direction promotes most (logit lens), after an arrow:
``" sea", " ocean" → " waves", " tide"``. A feature that never fired has only the arrow
part and no score.

Detection score: the label *detects* a context window when one of the window's tokens, as
stripped lower-case text, is one of the label's words. Windows: the held-out activating
examples, and as many random windows of the corpus in which the feature does not fire.
``label_score`` = balanced accuracy = (share of activating windows detected + share of
non-activating windows not detected) / 2; 0.5 is chance, 1.0 perfect. A separate step from
the statistics, so that another labeller (an explainer language model) can replace it and
be scored the same way.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

LABEL_WORDS = 3
PROMOTED_IN_LABEL = 2
METHOD = ("tokens: up to 3 most frequent peak tokens of the even-ranked top examples, then the 2 most "
          "promoted tokens; score: balanced accuracy of detecting the odd-ranked top examples vs as many "
          "random non-firing windows by containing one of the peak-token words")


def word(token: str) -> str:
    """A token's text as the label compares it."""
    return token.strip().lower()


@dataclass(frozen=True)
class TokenLabel:
    text: str
    words: tuple[str, ...]
    """What the detection test looks for (stripped lower-case token texts)."""


def _quote(tokens: Sequence[str]) -> str:
    return ", ".join(json.dumps(t, ensure_ascii=False) for t in tokens)


def make_label(peak_tokens: Sequence[str], promoted: Sequence[str]) -> TokenLabel:
    """The label of a feature from the token texts at its label examples' peaks (strongest
    example first) and its most promoted tokens (best first)."""
    counts: dict[str, int] = {}
    shown: dict[str, str] = {}
    for t in peak_tokens:
        w = word(t)
        if not w:
            continue
        counts[w] = counts.get(w, 0) + 1
        shown.setdefault(w, t)
    words = sorted(counts, key=lambda w: -counts[w])[:LABEL_WORDS]  # stable: ties keep first-seen order
    parts = []
    if words:
        parts.append(_quote([shown[w] for w in words]))
    promo = [t for t in promoted if word(t)][:PROMOTED_IN_LABEL]
    if promo:
        parts.append("→ " + _quote(promo))
    return TokenLabel(" ".join(parts), tuple(words))


def detects(words: Sequence[str], window: Sequence[str]) -> bool:
    wanted = set(words)
    return any(word(t) in wanted for t in window)


def balanced_accuracy(activating: Sequence[bool], non_activating: Sequence[bool]) -> float | None:
    """The detection score from the test's verdicts (True = "the label detects this window")
    on the activating and on the non-activating windows: (share of activating windows
    detected + share of non-activating windows not detected) / 2; None when either set is
    empty."""
    if not activating or not non_activating:
        return None
    tpr = sum(bool(v) for v in activating) / len(activating)
    tnr = sum(not v for v in non_activating) / len(non_activating)
    return (tpr + tnr) / 2


def detection_score(words: Sequence[str], activating: Sequence[Sequence[str]],
                    non_activating: Sequence[Sequence[str]]) -> float | None:
    """Balanced accuracy of the label's words on the two sets of windows (token texts);
    None when there is nothing to score."""
    if not words:
        return None
    return balanced_accuracy([detects(words, w) for w in activating], [detects(words, w) for w in non_activating])


def split_examples(n: int) -> tuple[range, range]:
    """Ranks of a feature's ``n`` top examples that make its label (even) and that are held
    out to score it (odd)."""
    return range(0, n, 2), range(1, n, 2)


def pick_non_activating(feature: int, active: Sequence[bool], n: int) -> list[int]:
    """``n`` indices of reservoir windows where the feature does not fire (``active[i]``
    false), in a per-feature rotation of the reservoir (deterministic)."""
    total = len(active)
    out: list[int] = []
    for j in range(total):
        i = (feature * 7919 + j) % total
        if not active[i]:
            out.append(i)
            if len(out) == n:
                break
    return out


def label_feature(feature: int, examples: Sequence[Sequence[int]], peaks: Sequence[int],
                  promoted: Sequence[int], random_windows: Sequence[Sequence[int]],
                  random_active: Sequence[bool], text: Callable[[int], str]) -> tuple[TokenLabel, float | None]:
    """Label and score of one feature: ``examples`` are its top windows (token ids,
    strongest first) with ``peaks`` their peak offsets; ``promoted`` its promoted token ids;
    ``random_windows``/``random_active`` the reservoir and whether the feature fires in each;
    ``text`` a token id's text."""
    label_ex, held = split_examples(len(examples))
    label = make_label([text(examples[i][peaks[i]]) for i in label_ex], [text(t) for t in promoted])
    chosen = pick_non_activating(feature, random_active, len(held))
    score = detection_score(label.words, [[text(t) for t in examples[i]] for i in held],
                            [[text(t) for t in random_windows[i]] for i in chosen])
    return label, score
