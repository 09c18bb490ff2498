"""Hook point names.

The server can only hook one thing: the residual stream between decoder layers. Its
canonical name is ``layers.{L}``, the stream *after* decoder layer ``L`` (0-based), which
is what layer ``L+1`` reads. Dictionaries trained elsewhere name the same place
differently, so names are parsed here once and every other module works with the
canonical form.

Accepted spellings (all map to ``layers.L``):

- ``layers.L`` and ``model.layers.L`` (EleutherAI sparsify / Hugging Face module paths;
  the output of a decoder layer module is its residual stream),
- ``blocks.L.hook_resid_post`` (SAELens / TransformerLens),
- ``blocks.{L+1}.hook_resid_pre`` (the stream entering block L+1 is the one leaving
  block L).

One more hook point comes before every layer: the stream entering layer 0, i.e. the
embeddings as the model hands them to its first layer (scaled, for Gemma; token plus
position embeddings, for GPT-2). Its canonical name is ``embeddings``, its index ``-1``;
``blocks.0.hook_resid_pre`` is its SAELens alias.
"""

from __future__ import annotations

import re

EMBEDDINGS = "embeddings"
"""Canonical name of the stream entering layer 0 (layer index -1)."""

_PATTERNS: list[tuple[re.Pattern[str], int]] = [
    # (pattern, offset added to the captured block index)
    (re.compile(r"(?:model\.)?layers\.(\d+)"), 0),
    (re.compile(r"blocks\.(\d+)\.hook_resid_post"), 0),
    (re.compile(r"blocks\.(\d+)\.hook_resid_pre"), -1),
]


def parse_hook_point(name: str) -> int:
    """Return the layer index ``L`` of a residual-stream hook point name.

    ``-1`` is the stream entering layer 0 (``embeddings``). Raises ``ValueError``
    naming the accepted forms for anything else (attention or MLP outputs, ``hook_z``),
    since the server can only hook the residual stream.
    """
    if not isinstance(name, str):
        raise ValueError(f"hook point must be a string, got {type(name).__name__}")
    text = name.strip()
    if text == EMBEDDINGS:
        return -1
    for pattern, offset in _PATTERNS:
        match = pattern.fullmatch(text)
        if match is not None:
            return int(match.group(1)) + offset
    raise ValueError(
        f"unsupported hook point {name!r}: expected 'layers.L' (residual stream after "
        "decoder layer L, 0-based), 'embeddings' (the stream entering layer 0), or "
        "SAELens' 'blocks.L.hook_resid_post' / 'blocks.L.hook_resid_pre'"
    )


def hook_point_name(layer: int) -> str:
    """Canonical name of the hook point with index ``layer`` (``-1``: ``embeddings``)."""
    return EMBEDDINGS if layer == -1 else f"layers.{layer}"


def canonical_hook_point(name: str) -> str:
    """Canonical spelling (``layers.L`` or ``embeddings``) of any accepted hook point name."""
    return hook_point_name(parse_hook_point(name))


def saelens_hook_name(name: str) -> str:
    """SAELens' (TransformerLens') name of a hook point: what ``metadata.hook_name`` holds.

    ``layers.L`` -> ``blocks.L.hook_resid_post``; ``embeddings`` -> ``blocks.0.hook_resid_pre``
    (TransformerLens has no ``resid_post`` before block 0). Any accepted spelling goes in.
    """
    layer = parse_hook_point(name)
    return "blocks.0.hook_resid_pre" if layer == -1 else f"blocks.{layer}.hook_resid_post"


def validate_hook_point(name: str, num_layers: int) -> str:
    """Check that ``name`` is a hook point of a model with ``num_layers`` decoder layers.

    Returns the canonical name; raises ``ValueError`` if it does not parse or the layer
    does not exist.
    """
    layer = parse_hook_point(name)
    if layer >= num_layers:
        raise ValueError(
            f"hook point {name!r} is layer {layer}, but the model has {num_layers} "
            f"decoder layers (valid: embeddings, layers.0 .. layers.{num_layers - 1})"
        )
    return hook_point_name(layer)
