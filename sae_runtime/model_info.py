"""What the server needs to know about a model checkpoint before any engine starts.

Read from the checkpoint's files with transformers' config classes, so that every
architecture's own spelling (``n_layer``/``n_embd`` for GPT-2, a ``text_config`` inside a
multimodal Gemma 3 config) comes out as the same few numbers. The API process uses this to
check dictionaries against the model before Ray or vLLM start, and to know whether chat
completions can be served.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/[^/]+/?$")


class ModelNotFoundError(FileNotFoundError):
    """A model given by path or hub id is not on this machine."""


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    """The checkpoint directory."""
    name: str
    """The served model name: ``ORG/NAME`` for a hub cache snapshot, else the folder name."""
    architecture: str
    """The checkpoint's architecture class name (``config.json`` ``architectures[0]``)."""
    num_layers: int
    """Number of decoder layers."""
    hidden_size: int
    """Width of the residual stream (a dictionary's ``d_in``)."""
    has_chat_template: bool
    """Whether the tokenizer carries a chat template (else chat completions are refused)."""


def served_name(model_dir: Path) -> str:
    """``google/gemma-2-2b`` for ``.../models--google--gemma-2-2b/snapshots/<rev>``, else the folder name."""
    match = _SNAPSHOT.search(model_dir.resolve().as_posix())
    if match is None:
        match = _SNAPSHOT.search(model_dir.as_posix())
    return f"{match['org']}/{match['name']}" if match else model_dir.resolve().name


def resolve_model_path(model: str | Path) -> Path:
    """A model directory from a path, or from a hub id (``ORG/NAME``) found in the local
    Hugging Face cache. Nothing is downloaded."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    text = str(model)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not path.exists():
        from huggingface_hub import snapshot_download
        from huggingface_hub.constants import HF_HUB_CACHE

        try:
            return Path(snapshot_download(text, local_files_only=True))
        except Exception:
            raise ModelNotFoundError(
                f"model {text!r} is neither a directory nor in the local Hugging Face cache "
                f"({HF_HUB_CACHE}); nothing is downloaded at run time: fetch it on a machine "
                f"with network (`huggingface-cli download {text}`) or pass a checkpoint directory"
            ) from None
    raise ModelNotFoundError(f"model directory {text!r} does not exist")


def read_model_info(model: str | Path, name: str | None = None) -> ModelInfo:
    """Read a checkpoint's shape and chat support; ``name`` overrides the served name."""
    path = resolve_model_path(model)
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path}: not a model checkpoint (no config.json)")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise ValueError(f"{path}: cannot read config.json: {exc}") from None
    text = config.get_text_config()
    architectures = getattr(config, "architectures", None) or [type(config).__name__]
    return ModelInfo(
        path=path,
        name=name or served_name(path),
        architecture=architectures[0],
        num_layers=int(text.num_hidden_layers),
        hidden_size=int(text.hidden_size),
        has_chat_template=has_chat_template(path),
    )


def has_chat_template(model_dir: Path) -> bool:
    """Whether the tokenizer files of ``model_dir`` define a chat template."""
    if (model_dir / "chat_template.jinja").is_file() or (model_dir / "chat_template.json").is_file():
        return True
    tok_cfg = model_dir / "tokenizer_config.json"
    if tok_cfg.is_file():
        try:
            return bool(json.loads(tok_cfg.read_text()).get("chat_template"))
        except (OSError, ValueError):
            return False
    return False
