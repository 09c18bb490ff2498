"""The command lines of sae-serve and sae-train are generated from their config models
(sae_runtime/config_cli.py): every field is a flag and a variable and nothing else is,
flags > variables > --config file > defaults, and a bad value names where it came from."""

from __future__ import annotations

import argparse
import typing

import pytest
from pydantic import BaseModel

from sae_runtime.config_cli import ConfigError, field_specs
from sae_runtime.feature_index import cli as index_cli
from sae_runtime.feature_index.config import IndexConfig
from sae_runtime.training import cli as train_cli
from sae_runtime.training.config import TrainConfig
from server import cli as serve_cli
from server.config import ServeConfig

# Flags that README.md, server/README.md, the tests and users' scripts use: they must stay.
SERVE_FLAGS = """--config --model --dictionary --dictionary-id --no-default-dictionary --dtype --eager
--max-model-len --max-num-seqs --kv-cache-gib --replicas --min-replicas --max-replicas --host --http-port
--grpc-port --max-request-bytes --max-edits --max-vectors --max-top-k --max-feature-ids
--max-response-feature-values --max-concurrent-streams --api-key --api-key-file --tls-cert --tls-key
--ray-num-cpus --ray-address --proxy-location --max-replicas-per-node --cpu-threads-bind""".split()
TRAIN_FLAGS = """--config -o --out --print-config --model --hook-point --data --text-field --max-tokens
--architecture --expansion-factor --d-sae --k --batch-size --lr --epochs --steps --warmup-steps --threads
--cache --no-cache --cache-dir --eval-tokens --progress --no-progress --ctx-len --eval-fraction""".split()
INDEX_FLAGS = """--config --print-config --dictionary --model --data --text-field --ctx-len --max-tokens --top-n
--window --top-k --out -o --work-dir --resume --no-resume --overwrite --keep-work --max-model-len --enforce-eager
--no-enforce-eager --progress --no-progress""".split()
# Options of the command line only (not settings of the model).
SERVE_EXTRAS = {"--config", "--api-key-file", "-h", "--help"}
TRAIN_EXTRAS = {"--config", "-o", "--out", "--print-config", "-h", "--help"}
INDEX_EXTRAS = {"--config", "--print-config", "-h", "--help"}
# Variables the project reads for other purposes: a generated one must not take their name.
OTHER_VARIABLES = {"SAE_SERVE_API_KEY", "SAE_SERVE_CACHE", "SAE_SERVE_DEVICE", "SAE_SERVE_HOOKS",
                   "SAE_SERVE_SAELENS_YAML", "SAE_SERVE_LOAD_API_KEY", "SAE_SERVE_TEST_ALL_MODES",
                   "SAE_SERVE_TEST_START_TIMEOUT"}


def leaf_fields(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], typing.Any]:
    """Every setting of ``model``, nested models walked (independently of config_cli)."""
    out = {}
    for name, field in model.model_fields.items():
        inner = [a for a in (typing.get_args(field.annotation) or (field.annotation,)) if a is not type(None)]
        if len(inner) == 1 and isinstance(inner[0], type) and issubclass(inner[0], BaseModel):
            out.update(leaf_fields(inner[0], (*prefix, name)))
        else:
            out[(*prefix, name)] = field
    return out


CASES = [
    pytest.param(ServeConfig, serve_cli.build_parser, serve_cli.serve_specs, SERVE_EXTRAS, SERVE_FLAGS,
                 "SAE_SERVE_", id="sae-serve"),
    pytest.param(TrainConfig, train_cli.build_parser, train_cli.train_specs, TRAIN_EXTRAS, TRAIN_FLAGS,
                 "SAE_TRAIN_", id="sae-train"),
    pytest.param(IndexConfig, index_cli.build_parser, index_cli.index_specs, INDEX_EXTRAS, INDEX_FLAGS,
                 "SAE_INDEX_", id="sae-index"),
]


@pytest.mark.parametrize("model,build_parser,specs,extras,kept,prefix", CASES)
def test_every_field_is_a_flag_and_every_flag_a_field(model, build_parser, specs, extras, kept, prefix):
    parser = build_parser()
    by_dest = {a.dest: a for a in parser._actions}
    fields = leaf_fields(model)
    specs = specs()
    assert {s.path for s in specs} == set(fields)
    flags_of_fields = set()
    for spec in specs:
        action = by_dest[spec.dest]
        assert spec.flag in action.option_strings
        flags_of_fields.update(action.option_strings)
        assert spec.env == prefix + spec.name.upper()
        assert fields[spec.path].description, f"{spec.path} has no description for --help"
    every_flag = {o for a in parser._actions for o in a.option_strings}
    assert every_flag - flags_of_fields == extras
    assert set(kept) <= every_flag, sorted(set(kept) - every_flag)
    envs = [s.env for s in specs]
    assert len(set(envs)) == len(envs) and not set(envs) & OTHER_VARIABLES


@pytest.mark.parametrize("model,build_parser,specs,extras,kept,prefix", CASES)
def test_help_shows_each_description_and_default(model, build_parser, specs, extras, kept, prefix):
    helps = {a.dest: a.help for a in build_parser()._actions}
    for spec in specs():
        text = helps[spec.dest]
        assert spec.description in text.replace("%%", "%"), spec.name
        assert "(default: " in text and spec.env in text, text


def test_help_text_of_a_few_serve_options():
    text = " ".join(serve_cli.build_parser().format_help().split())
    assert "--max-model-len INT context length in tokens (default: 2048; env SAE_SERVE_MAX_MODEL_LEN)" in text
    assert "--http-port INT HTTP port (OpenAI-compatible API) (default: 8000; env SAE_SERVE_HTTP_PORT)" in text
    assert "--eager, --no-eager run vLLM in eager mode" in text
    assert "flags > environment variables (SAE_SERVE_<FIELD>) > --config file > defaults" in text


def serve(argv, environ=None):
    return serve_cli.config_from_args(serve_cli.build_parser().parse_args(argv), environ=environ or {})


def test_serve_precedence_flag_over_variable_over_yaml(tmp_path):
    cfg_file = tmp_path / "serve.yaml"
    cfg_file.write_text("http_port: 9000\nreplicas: 2\nmax_edits: 3\n"
                        "engine:\n  max_model_len: 1024\n  dtype: bfloat16\n  enforce_eager: true\n")
    env = {"SAE_SERVE_HTTP_PORT": "9100", "SAE_SERVE_MAX_MODEL_LEN": "1500", "SAE_SERVE_ENFORCE_EAGER": "false",
           "SAE_SERVE_MAX_EDITS": "none", "SAE_SERVE_DICTIONARIES": "d1, d2"}
    cfg = serve(["--config", str(cfg_file), "--http-port", "9200", "--dictionary", "d3"], env)
    assert cfg.http_port == 9200  # flag > variable > file
    assert cfg.engine.max_model_len == 1500  # variable > file
    assert cfg.engine.enforce_eager is False and cfg.max_edits is None  # variables clear the file's settings
    assert (cfg.replicas, cfg.engine.dtype) == (2, "bfloat16")  # file > defaults
    assert cfg.engine.dictionaries == ["d3"]  # the flag replaces the variable's list
    assert (cfg.grpc_port, cfg.host, cfg.engine.kv_cache_gib) == (50051, "127.0.0.1", 1.0)  # defaults
    cfg = serve(["--config", str(cfg_file)], env)
    assert (cfg.http_port, cfg.engine.dictionaries) == (9100, ["d1", "d2"])
    assert serve(["--config", str(cfg_file), "--eager"], env).engine.enforce_eager is True
    assert serve(["--http-port", "9300"], {"SAE_SERVE_HTTP_PORT": "junk"}).http_port == 9300  # not read


def test_serve_nested_and_special_flags():
    cfg = serve(["--min-replicas", "2", "--no-default-dictionary", "--limits", "max_edits=5",
                 "--dictionary", "a", "--dictionary", "b", "--dictionary-id", "x", "--dictionary-id", "y"])
    assert cfg.autoscaling is not None and (cfg.autoscaling.min_replicas, cfg.autoscaling.max_replicas) == (2, 2)
    assert cfg.use_default_dictionary is False and cfg.engine.limits == {"max_edits": 5}
    assert (cfg.engine.dictionaries, cfg.engine.dictionary_ids) == (["a", "b"], ["x", "y"])
    assert serve([]).autoscaling is None
    assert serve([], {"SAE_SERVE_USE_DEFAULT_DICTIONARY": "0"}).use_default_dictionary is False


def test_api_keys_from_flag_file_and_variable_add_up_and_replace_the_files(tmp_path):
    cfg_file = tmp_path / "serve.yaml"
    cfg_file.write_text("api_keys: [yaml-key-0000]\n")
    key_file = tmp_path / "keys"
    key_file.write_text("file-key-1111\n")
    env = {"SAE_SERVE_API_KEYS": "env-key-2222,flag-key-3333"}
    cfg = serve(["--config", str(cfg_file), "--api-key", "flag-key-3333", "--api-key-file", str(key_file)], env)
    assert [k.get_secret_value() for k in cfg.api_keys] == ["flag-key-3333", "file-key-1111", "env-key-2222"]
    assert [k.get_secret_value() for k in serve(["--config", str(cfg_file)]).api_keys] == ["yaml-key-0000"]


def test_serve_bad_values_name_the_flag_variable_or_key(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        serve_cli.build_parser().parse_args(["--http-port", "eighty"])
    assert exit_.value.code == 2
    assert "sae-serve: error: argument --http-port: invalid int value: 'eighty'" in capsys.readouterr().err
    assert serve_cli.main(["--http-port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sae-serve: error: bad configuration: --http-port: Input should be greater than")
    with pytest.raises(ConfigError, match=r"^SAE_SERVE_MAX_MODEL_LEN: invalid int value"):
        serve([], {"SAE_SERVE_MAX_MODEL_LEN": "long"})
    with pytest.raises(ConfigError, match=r"^SAE_SERVE_PROXY_LOCATION: invalid choice 'Everywhere'"):
        serve([], {"SAE_SERVE_PROXY_LOCATION": "Everywhere"})
    with pytest.raises(ConfigError, match=r"^SAE_SERVE_ENFORCE_EAGER: invalid boolean value"):
        serve([], {"SAE_SERVE_ENFORCE_EAGER": "maybe"})
    with pytest.raises(ConfigError, match=r"^SAE_SERVE_HTTP_PORT: Input should be less than or equal to 65535"):
        serve([], {"SAE_SERVE_HTTP_PORT": "70000"})
    with pytest.raises(ConfigError, match=r"^--stream-interval: Input should be greater than or equal to 1"):
        serve(["--stream-interval", "0"])
    assert serve(["--stream-interval", "4"]).engine.stream_interval == 4
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine:\n  max_num_seqs: many\nhttp_prot: 1\n")
    with pytest.raises(ConfigError) as err:
        serve(["--config", str(bad)])
    assert f"engine.max_num_seqs ({bad}): Input should be a valid integer" in str(err.value)
    assert f"http_prot in {bad}: Extra inputs are not permitted" in str(err.value)
    with pytest.raises(ConfigError) as err:  # a refused key is named by its source, never echoed
        serve([], {"SAE_SERVE_API_KEYS": "tiny1"})
    assert str(err.value).startswith("--api-key / SAE_SERVE_API_KEYS: API key #1 must be")
    assert "tiny1" not in str(err.value)


def train(argv, environ=None):
    return train_cli.resolve(argv, environ=environ or {})


def test_train_precedence_flag_over_variable_over_file(tmp_path):
    (tmp_path / "t.yaml").write_text("lr: 0.01\nk: 16\nbatch_size: 512\ndata: [a.txt]\nout: somewhere\n")
    env = {"SAE_TRAIN_LR": "0.02", "SAE_TRAIN_K": "24", "SAE_TRAIN_DATA": "b.txt,c.txt", "SAE_TRAIN_PROGRESS": "no",
           "SAE_TRAIN_MAX_TOKENS": "all"}
    cfg, out, _ = train(["--config", str(tmp_path / "t.yaml"), "--lr", "0.03"], env)
    assert (cfg.lr, cfg.k, cfg.batch_size, cfg.epochs) == (0.03, 24, 512, 3.0)
    assert (cfg.data, cfg.progress, cfg.max_tokens, out) == (["b.txt", "c.txt"], False, None, "somewhere")
    cfg, _, _ = train(["--config", str(tmp_path / "t.yaml"), "--data", "d.txt", "e.txt", "--progress"], env)
    assert (cfg.data, cfg.progress, cfg.lr) == (["d.txt", "e.txt"], True, 0.02)


def test_train_bad_values_name_the_flag_or_variable(capsys):
    assert train_cli.main(["--lr", "-1"]) == 2
    assert capsys.readouterr().err.startswith(
        "sae-train: error: invalid configuration: --lr: Input should be greater than 0")
    with pytest.raises(ConfigError, match=r"^SAE_TRAIN_ARCHITECTURE: invalid choice 'dense'"):
        train([], {"SAE_TRAIN_ARCHITECTURE": "dense"})
    with pytest.raises(SystemExit) as exit_:
        train(["--k", "many"])
    assert exit_.value.code == 2 and "argument --k: invalid int value: 'many'" in capsys.readouterr().err


def test_generator_refuses_options_for_missing_fields():
    from sae_runtime.config_cli import Option

    with pytest.raises(ValueError, match="no_such_field"):
        field_specs(ServeConfig, "X_", {"no_such_field": Option()})
    assert isinstance(serve_cli.build_parser(), argparse.ArgumentParser)


def test_index_precedence_flag_over_variable_over_file_and_bad_values(tmp_path, capsys):
    (tmp_path / "i.yaml").write_text("top_n: 8\nwindow: 12\ndata: [a.txt]\nout: x.sqlite\n")
    env = {"SAE_INDEX_TOP_N": "20", "SAE_INDEX_DATA": "b.txt,c.txt", "SAE_INDEX_MAX_TOKENS": "all"}
    cfg, _ = index_cli.resolve(["--config", str(tmp_path / "i.yaml"), "--top-n", "30", "-o", "y.sqlite"], env)
    assert (cfg.top_n, cfg.window, cfg.data, cfg.max_tokens, cfg.out) == (30, 12, ["b.txt", "c.txt"], None,
                                                                         "y.sqlite")
    cfg, _ = index_cli.resolve([], {})
    assert cfg.dictionary is None and cfg.out_path().name == "feature_index.sqlite"
    assert cfg.work_path().name == "feature_index.sqlite.work" and cfg.data == ["sotu"]
    assert index_cli.main(["--window", "0"]) == 2
    assert capsys.readouterr().err.startswith(
        "sae-index: error: invalid configuration: --window: Input should be greater than 0")
    with pytest.raises(ConfigError, match=r"^SAE_INDEX_TOP_K: invalid int value"):
        index_cli.resolve([], {"SAE_INDEX_TOP_K": "lots"})
