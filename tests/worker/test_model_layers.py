"""Layer wrapping without an engine: which modules get wrapped, the forms of
feed-forward output, and that a model is never half steered. Numerics of
every family are compared with HF end to end in tests/plugin/test_model_coverage.py."""

import pytest
import torch
from torch import nn

from icv_vllm.model_families import BY_ARCHITECTURE
from icv_vllm.worker import model_layers
from icv_vllm.worker.model_layers import UnsupportedModelError, install_steering
from icv_vllm.worker.runtime import RUNTIME


class MLP(nn.Module):
    def forward(self, x):
        return x * 2


def named(name: str, base=nn.Module):
    return type(name, (base,), {})


@pytest.fixture
def calls(monkeypatch):
    seen = []
    monkeypatch.setattr(RUNTIME, "apply", lambda h, layer: seen.append(("steer", layer, tuple(h.shape))))
    monkeypatch.setattr(RUNTIME, "observe", lambda h, r, layer: seen.append(("observe", layer, r is None)))
    return seen


def vl_model(layer_name="Qwen2DecoderLayer"):
    """Shaped like vLLM's Qwen2-VL: vision blocks, then the language model's layers."""
    Layer = named(layer_name)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = nn.Module()
            self.visual.blocks = nn.ModuleList([named("Qwen2VisionBlock")() for _ in range(2)])
            self.language_model = nn.Module()
            self.language_model.model = nn.Module()
            self.language_model.model.layers = nn.ModuleList([Layer() for _ in range(3)])
            for l in self.language_model.model.layers:
                l.mlp = MLP()

    Layer.forward = lambda self, positions, h, residual: (self.mlp(h), h)
    return Model()


def test_vision_language_model_steers_its_language_layers(calls):
    model = vl_model()
    family = BY_ARCHITECTURE["Qwen2VLForConditionalGeneration"]
    assert install_steering(model, family, 3) == [0, 1, 2]
    out, _ = model.language_model.model.layers[1](None, torch.ones(4, 8), None)
    assert calls == [("steer", 1, (4, 8)), ("observe", 1, False)]
    assert install_steering(model, family, 3) == [0, 1, 2]  # idempotent


def test_half_steered_model_is_an_error():
    with pytest.raises(UnsupportedModelError, match=r"found steerable layers \[0, 1, 2\], expected 0..3"):
        install_steering(vl_model(), BY_ARCHITECTURE["Qwen2VLForConditionalGeneration"], 4)


def test_instance_forward_and_output_bias_blocks(calls, monkeypatch):
    """A block whose instance carries its own forward (HF kernel decorators do
    this) is wrapped there; an (output, bias) block is shifted on output + bias."""
    Layer = named("FalconDecoderLayer")
    layer = Layer()
    layer.mlp = MLP()
    bias = torch.full((8,), 5.0)
    seen_values = []
    layer.mlp.forward = lambda x: (x * 2, bias)
    monkeypatch.setattr(RUNTIME, "apply", lambda h, i: seen_values.append(h.clone()))
    Layer.forward = lambda self, positions, h: h + self.mlp(h)[0]
    model = nn.Module()
    model.transformer = nn.Module()
    model.transformer.h = nn.ModuleList([layer])
    install_steering(model, BY_ARCHITECTURE["FalconForCausalLM"], 1)
    value, returned_bias = layer.mlp(torch.ones(3, 8))
    assert torch.equal(seen_values[0], torch.full((3, 8), 7.0))  # the shift saw output + bias
    assert torch.equal(value, torch.full((3, 8), 2.0)) and returned_bias is bias  # bias removed again
    assert model_layers._rows(torch.ones(1, 3, 8)).shape == (3, 8)  # Transformers backend: [1, T, D]


def test_a_pipeline_stage_steers_its_own_layers(calls, monkeypatch):
    """With --pipeline-parallel-size 2, vLLM puts PPMissingLayer (an Identity)
    where another stage's layers are; a stage steers exactly its range, as
    vLLM's get_pp_indices splits the layers."""
    from types import SimpleNamespace

    import vllm.distributed as distributed
    import vllm.distributed.utils as distributed_utils

    from icv_vllm.worker.runtime import _layers_of_this_rank

    class Model(nn.Module):
        def __init__(self, held):
            super().__init__()
            Layer = named("LlamaDecoderLayer")
            Layer.forward = lambda self, positions, h, residual: (self.mlp(h), h)
            self.layers = nn.ModuleList([Layer() if i in held else nn.Identity() for i in range(5)])
            for i in held:
                self.layers[i].mlp = MLP()

    runner = SimpleNamespace(vllm_config=SimpleNamespace(parallel_config=SimpleNamespace(pipeline_parallel_size=2)))
    family = BY_ARCHITECTURE["LlamaForCausalLM"]
    for rank, expected in ((0, range(0, 3)), (1, range(3, 5))):
        monkeypatch.setattr(distributed, "get_pp_group", lambda: SimpleNamespace(rank_in_group=rank))
        held = _layers_of_this_rank(runner, 5)
        assert held == expected == range(*distributed_utils.get_pp_indices(5, rank, 2))
        assert install_steering(Model(held), family, 5, held) == list(expected)
    with pytest.raises(UnsupportedModelError, match=r"found steerable layers \[0, 1, 2\], expected 3..4"):
        install_steering(Model(range(0, 3)), family, 5, range(3, 5))
