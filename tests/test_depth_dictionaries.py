"""Dictionaries at several depths: ``sae-serve --depth-dictionaries`` serves the ones shipped
in ``sae_runtime/data/depth_dictionaries`` beside the others.

The flag's resolution is checked here on folders made for the test (so it does not depend on
what ships); the shipped dictionaries themselves are checked for what a user relies on (they
load, are hooked where their folder says, were trained on the embedded model, state their
metrics), and on the session engine they extract what their hook point's stream gives
(``tests/test_engine.py::test_training_harvest_reads_what_the_engine_reads``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

import server.config as server_config
from server.config import DEFAULT_DICTIONARY_DIR, ServeConfig
from tests.dictionary_factory import make_dictionary

SHIPPED = sorted(server_config.depth_dictionary_dirs())


@pytest.fixture
def depth_dir(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "depth_dictionaries"
    for layer in (24, 4):  # written out of order: they are served shallowest first
        make_dictionary(root / f"layers.{layer}", layer=layer, d_sae=64, architecture="topk", k=4, seed=layer)
    monkeypatch.setattr(server_config, "DEPTH_DICTIONARIES_DIR", root)
    server_config._dictionary_id.cache_clear()
    return root


def test_the_flag_adds_each_depth_after_the_served_dictionaries(depth_dir):
    plain = ServeConfig().resolved_engine().dictionaries
    with_depths = ServeConfig(depth_dictionaries=True).resolved_engine().dictionaries
    assert with_depths == [*plain, str(depth_dir / "layers.4"), str(depth_dir / "layers.24")]
    if (DEFAULT_DICTIONARY_DIR / "cfg.json").is_file():
        assert plain == [str(DEFAULT_DICTIONARY_DIR)]  # the default dictionary stays first
    # beside dictionaries given by the user, without the default
    mine = ServeConfig(engine={"dictionaries": ["/x/mine"]}, use_default_dictionary=False, depth_dictionaries=True)
    assert mine.resolved_engine().dictionaries == ["/x/mine", str(depth_dir / "layers.4"), str(depth_dir / "layers.24")]


def test_a_depth_dictionary_given_by_hand_is_not_served_twice(depth_dir):
    cfg = ServeConfig(engine={"dictionaries": [str(depth_dir / "layers.24")]}, depth_dictionaries=True)
    assert cfg.resolved_engine().dictionaries == [str(depth_dir / "layers.24"), str(depth_dir / "layers.4")]


def test_with_ids_given_the_depth_dictionaries_keep_their_own(depth_dir):
    cfg = ServeConfig(engine={"dictionaries": ["/x/mine"], "dictionary_ids": ["mine"]}, depth_dictionaries=True)
    engine = cfg.resolved_engine()
    assert engine.dictionary_ids == ["mine", "layers.4/topk-64", "layers.24/topk-64"]
    assert len(engine.dictionary_ids) == len(engine.dictionaries)


def test_no_depth_dictionary_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(server_config, "DEPTH_DICTIONARIES_DIR", tmp_path / "missing")
    with pytest.raises(ValidationError, match=r"depth_dictionaries: no dictionary found in .*missing"):
        ServeConfig(depth_dictionaries=True)
    ServeConfig(depth_dictionaries=False)  # only asking for them fails


def test_the_flag_and_its_variable(depth_dir):
    from server import cli as serve_cli

    def serve(argv, environ):
        return serve_cli.config_from_args(serve_cli.build_parser().parse_args(argv), environ=environ)

    assert serve(["--depth-dictionaries"], {}).depth_dictionaries is True
    assert serve([], {"SAE_SERVE_DEPTH_DICTIONARIES": "1"}).depth_dictionaries is True
    assert serve([], {}).depth_dictionaries is False


@pytest.mark.skipif(not SHIPPED, reason="no depth dictionary in this checkout")
@pytest.mark.parametrize("folder", SHIPPED, ids=[p.name for p in SHIPPED])
def test_each_shipped_depth_dictionary(folder):
    from sae_runtime.default_model import MODEL_NAME
    from sae_runtime.dictionary import SparseDictionary

    d = SparseDictionary.load(folder)
    assert d.hook_point == folder.name
    assert d.cfg.metadata.model_name == MODEL_NAME
    assert d.d_in == 576 and d.architecture == "topk"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["hook_point"] == folder.name
    ev = metrics["eval"]
    # what the README states for them: trained, not random (a random dictionary's FVU is ≥ 1)
    assert 0 < ev["fvu"] < 0.5 and ev["ce_loss_recovered"] > 0.5, ev
    assert (folder / "training_command.txt").is_file()
    # shallower than, and deeper than, the default's layers.12
    layers = sorted(SparseDictionary.load(p).layer for p in SHIPPED)
    assert layers[0] < 12 < layers[-1]
