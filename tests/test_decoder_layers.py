"""Placing the SAE step in a model's decoder layers (sae_runtime/worker/decoder_layers.py).

Unit tests on small torch modules shaped like vLLM's models; the real engine on every
family is tests/test_architectures.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sae_runtime.worker import residual_op
from sae_runtime.worker.decoder_layers import (
    TESTED_ARCHITECTURES,
    UnsupportedModelError,
    find_decoder_layers,
    hook_decoder_layers,
    hooked_layers,
)


class PairLayer(nn.Module):
    """Like vLLM's Llama layer: forward(positions, hidden_states, residual) -> (hidden, residual)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Linear(4, 4)

    def forward(self, positions, hidden_states, residual):
        residual = hidden_states if residual is None else hidden_states + residual
        return self.w(residual), residual


class StreamLayer(nn.Module):
    """Like GPT-2's block: forward(hidden_states) -> stream."""

    def __init__(self):
        super().__init__()
        self.w = nn.Linear(4, 4)

    def forward(self, hidden_states):
        return hidden_states + self.w(hidden_states)


class OddLayer(StreamLayer):
    def forward(self, hidden_states):
        return hidden_states, hidden_states, None


class Model(nn.Module):
    def __init__(self, layer_cls, n=3):
        super().__init__()
        self.vision_tower = nn.ModuleList([nn.Linear(4, 4) for _ in range(n)])  # must not be taken
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([layer_cls() for _ in range(n)])

    def forward(self, x):
        if isinstance(self.model.layers[0], PairLayer):
            h, r = x, None
            for layer in self.model.layers:
                h, r = layer(None, h, r)
            return h + r
        for layer in self.model.layers:
            x = layer(x)
        return x


@pytest.fixture
def recorded():
    """Install a step function that records calls and adds 1000 at hook point 1."""
    calls = []

    def step(layer, hidden, residual):
        calls.append((layer, residual is None))
        return hidden + 1000.0 if layer == 1 else None

    residual_op.set_step_function(step)
    yield calls
    residual_op.set_step_function(None)


@pytest.mark.parametrize("layer_cls", [PairLayer, StreamLayer])
def test_every_hook_point_runs_and_an_edit_reaches_the_next_layer(layer_cls, recorded):
    torch.manual_seed(0)
    model = Model(layer_cls)
    x = torch.randn(5, 4)
    with torch.no_grad():
        plain = model(x)
        assert hook_decoder_layers(model, 3, "TestForCausalLM") == "model.layers"
        residual_op.set_step_function(None)
        assert torch.equal(model(x), plain)  # no step function: the layers are unchanged
        residual_op.set_step_function(lambda L, h, r: (recorded.append((L, r is None)), None)[1])
        assert torch.equal(model(x), plain)
        hooked = [L for L, _ in recorded]
        assert hooked == [-1, 0, 1, 2]  # the embeddings, then after each layer
        # Pair layers pass their residual to the op except at layer 0's input (None there).
        assert [r for _, r in recorded] == ([True, False, False, False] if layer_cls is PairLayer else [True] * 4)
        recorded.clear()
        residual_op.set_step_function(lambda L, h, r: h + 1000.0 if L == 1 else None)
        edited = model(x)
    assert (edited - plain).abs().max() > 1.0  # the edit at layer 1 changed what layer 2 read
    assert hooked_layers(model) is model.model.layers


def test_layer_classes_are_wrapped_once(recorded):
    model = Model(StreamLayer)
    hook_decoder_layers(model, 3)
    hook_decoder_layers(model, 3)  # again: no second wrapper

    class Sub(StreamLayer):
        pass

    sub = Model(Sub)
    hook_decoder_layers(sub, 3)  # inherits an already wrapped forward: not wrapped again
    with torch.no_grad():
        sub(torch.randn(2, 4))
    assert [L for L, _ in recorded] == [-1, 0, 1, 2]


def test_models_that_cannot_be_hooked_are_refused_by_name():
    with pytest.raises(UnsupportedModelError) as info:
        hook_decoder_layers(Model(StreamLayer, n=3), 5, "StrangeForCausalLM")
    message = str(info.value)
    assert "StrangeForCausalLM" in message and "no list of 5 decoder layers" in message
    assert all(a in message for a in TESTED_ARCHITECTURES)
    odd = Model(OddLayer)
    hook_decoder_layers(odd, 3, "OddForCausalLM")
    with pytest.raises(UnsupportedModelError, match="OddForCausalLM decoder layer OddLayer returned tuple of 3"):
        odd(torch.randn(2, 4))
    with pytest.raises(UnsupportedModelError, match="plugin did not hook"):
        hooked_layers(Model(StreamLayer))


def test_the_decoder_list_is_found_by_shape_outside_other_towers():
    model = Model(StreamLayer)
    path, layers = find_decoder_layers(model, 3)
    assert path == "model.layers" and layers is model.model.layers
