"""Independent reference for ICV application: HF transformers, fp32, greedy,
a forward hook on every decoder layer's MLP implementing docs/method.md §2
(and §7: per-entry layers, positions, plain-add mode) token by token. Shares
no code with the plugin or the kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM


def _decoder_layers(model):
    """The decoder layers, found independently of the plugin's code: the
    ModuleList whose length is the text config's layer count."""
    count = model.config.get_text_config().num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count and "vision" not in name \
                and "visual" not in name:
            return module
    raise ValueError(f"no decoder layers found in {type(model).__name__}")


def shift(x: torch.Tensor, directions: list[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """x' = ||x|| normalize(x/||x|| + 1/K sum lam (1 + max(0, cos(x, -v))) v/||v||)."""
    norm = x.norm(dim=-1, keepdim=True)
    total = torch.zeros_like(x)
    for v, lam in directions:
        cos = F.cosine_similarity(x, -v.expand_as(x), dim=-1).unsqueeze(-1)
        total = total + lam * (1 + cos.clamp(min=0)) * F.normalize(v, dim=-1)
    return norm * F.normalize(x / norm + total / len(directions), dim=-1)


def _applies(entry, layer: int, generated: bool) -> bool:
    layers, positions = entry.get("layers"), entry.get("positions", "all")
    return ((layers is None or layer in layers)
            and positions in ("all", "generated" if generated else "prompt"))


def steer(x: torch.Tensor, entries: list[dict], layer: int, first_generated: int, mode: str) -> torch.Tensor:
    """x [1, T, D] (or [T, D]) fp32: each token gets its entries of ``mode``
    that apply at ``layer`` and its position (>= ``first_generated``: a
    generated token): ICV entries' transform (``shift``, on the MLP output),
    or add entries' lam * v (on the decoder layer's output, as llama.cpp
    applies control vectors)."""
    flat = x.reshape(-1, x.shape[-1])
    out = flat.clone()
    for t in range(flat.shape[0]):
        here = [e for e in entries if e.get("mode", "icv") == mode and _applies(e, layer, t >= first_generated)]
        if mode == "icv" and here:
            out[t] = shift(flat[t], [(e["vector"][layer].float(), e["scale"]) for e in here])
        for e in here if mode == "add" else ():
            out[t] = out[t] + e["scale"] * e["vector"][layer].float()
    return out.reshape(x.shape)


class HFReference:
    """``ff_attribute``: each decoder layer's feed-forward block in the HF model
    (``mlp`` for every supported family in transformers 5.x)."""

    def __init__(self, model_dir: str, ff_attribute: str = "mlp", model_class=AutoModelForCausalLM):
        self.model = model_class.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
        self._directions: list = []
        self._first_generated = 0
        for index, layer in enumerate(_decoder_layers(self.model)):
            getattr(layer, ff_attribute).register_forward_hook(self._hook(index))
            layer.register_forward_hook(self._hook(index, "add"))

    def _hook(self, index: int, mode: str = "icv"):
        def hook(module, inputs, output):
            if not self._directions:
                return output
            if isinstance(self._directions[0], dict):  # entries with options (docs/method.md §7)
                def apply(h):
                    return steer(h.float(), self._directions, index, self._first_generated, mode).to(h.dtype)
            elif mode == "add":
                return output
            else:
                layer_dirs = [(v[index].float(), lam) for v, lam in self._directions]

                def apply(h):
                    return shift(h.float(), layer_dirs).to(h.dtype)
            if isinstance(output, tuple):  # (hidden, router logits) in some MoE blocks
                return (apply(output[0]), *output[1:])
            return apply(output)
        return hook

    @torch.no_grad()
    def greedy(self, prompt_ids: list[int], vectors: list, max_tokens: int) -> list[int]:
        """Greedy continuation of exactly ``max_tokens`` (EOS ignored, as the
        engine runs with ignore_eos), recomputing the whole sequence each step
        (no KV cache: nothing shared with how vLLM reuses state). ``vectors``:
        (tensor, lam) pairs, or entry dicts {vector, scale, layers, positions, mode}."""
        self._directions = vectors
        self._first_generated = len(prompt_ids)
        try:
            ids = list(prompt_ids)
            out = []
            for _ in range(max_tokens):
                logits = self.model(torch.tensor([ids])).logits[0, -1]
                token = int(logits.argmax())
                out.append(token)
                ids.append(token)
            return out
        finally:
            self._directions = []
