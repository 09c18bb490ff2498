"""The deterministic feature label and its detection score (sae_runtime/feature_index/labels.py)."""

from __future__ import annotations

import pytest

from sae_runtime.feature_index.labels import (
    detection_score,
    label_feature,
    make_label,
    pick_non_activating,
)


def test_label_words_are_the_most_frequent_peak_tokens_then_promoted_tokens():
    label = make_label([" Sea", " ocean", " sea", "\n", " waves", " ocean", " sea"], [" tide", " ", " salt", " x"])
    assert label.words == ("sea", "ocean", "waves")
    assert label.text == '" Sea", " ocean", " waves" → " tide", " salt"'
    assert make_label([], [" up"]).text == '→ " up"' and make_label([], [" up"]).words == ()


def test_detection_score_is_balanced_accuracy():
    words = ("sea",)
    activating = [[" the", " sea"], [" a", " Sea "], [" no"], [" sea"]]  # 3 of 4 detected
    non_activating = [[" land"], [" sea"]]  # 1 of 2 correctly not detected
    assert detection_score(words, activating, non_activating) == pytest.approx((0.75 + 0.5) / 2)
    assert detection_score((), activating, non_activating) is None
    assert detection_score(words, [], non_activating) is None


def test_non_activating_windows_skip_those_where_the_feature_fires_and_are_deterministic():
    active = [False, True, False, False, True, False]
    got = pick_non_activating(3, active, 3)
    assert len(got) == 3 and not any(active[i] for i in got) and got == pick_non_activating(3, active, 3)
    assert pick_non_activating(0, [True, True], 2) == []


def test_label_feature_uses_even_ranks_for_the_label_and_odd_ranks_for_the_score():
    vocab = {1: " sea", 2: " ocean", 3: " land", 4: " tax", 5: " wave"}
    examples = [[3, 1], [5, 2], [1, 3], [2, 2], [4, 1]]  # peaks at offset 1
    peaks = [1, 1, 1, 1, 1]
    label, score = label_feature(0, examples, peaks, [5], [[4, 4], [3, 4], [1]], [False, False, True],
                                 vocab.__getitem__)
    # even ranks 0, 2, 4 peak at sea, land, sea
    assert label.words == ("sea", "land") and label.text.endswith('→ " wave"')
    # held out: ranks 1 and 3 (" wave ocean", " ocean ocean"): neither holds sea/land -> TPR 0;
    # non-activating: windows 0 and 1 (window 2 fires): [tax tax] not detected, [land tax] detected -> TNR 0.5
    assert score == pytest.approx(0.25)
