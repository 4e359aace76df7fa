"""Residual streams recorded for in-server extraction (worker side).

A capture request is an ordinary one-token request tagged with a capture id
(``extra_args["icv_capture"]``); at its last prompt token every decoder
layer's full output (MLP output + residual) is recorded, and the engine
client collects them by RPC (``icv_take_captures``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

import torch

MAX_PENDING_CAPTURES = 4096


class CaptureRecorder:
    def __init__(self, num_layers: int, embed: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
                 held_layers=None):
        self._num_layers = num_layers
        self._held = list(range(num_layers) if held_layers is None else held_layers)
        self._embed = embed
        self._device = device
        self._captures: OrderedDict[str, dict] = OrderedDict()
        self.step_captures: list[tuple[str, int]] = []  # (capture id, token index in the step)

    def begin(self, capture_id: str, last_token_id: int) -> None:
        self._captures[capture_id] = {"token": int(last_token_id), "layers": {}}
        while len(self._captures) > MAX_PENDING_CAPTURES:
            self._captures.popitem(last=False)

    def record(self, hidden_states: torch.Tensor, residual: torch.Tensor | None, layer: int) -> None:
        for capture_id, index in self.step_captures:
            stream = hidden_states[index].float()
            if residual is not None:
                stream = stream + residual[index].float()
            self._captures[capture_id]["layers"][layer] = stream.cpu()

    def take(self, capture_ids: list[str], absent_ok: bool = False) -> dict[str, Any]:
        """Pop finished captures as {id: [[embedding], [layer 0], ...]} rows
        (plain lists: they cross process boundaries through vLLM's RPC).
        absent_ok: skip ids this worker never recorded (under data parallelism
        another engine core ran them; the caller checks that every id came
        back); a capture recorded for only some layers is an error either way."""
        out: dict[str, Any] = {}
        if len(self._held) != self._num_layers:
            raise RuntimeError(
                f"in-server extraction needs every decoder layer in one worker; this worker runs layers "
                f"{self._held[0]}-{self._held[-1]} of {self._num_layers} (pipeline parallelism): extract "
                "offline with `icv-vllm extract` and copy the file into the vector directory")
        for capture_id in capture_ids:
            entry = self._captures.pop(capture_id, None)
            if entry is None and absent_ok:
                continue
            missing = None if entry is None else [l for l in range(self._num_layers) if l not in entry["layers"]]
            if entry is None or missing:
                raise RuntimeError(
                    f"icv capture {capture_id!r} was not recorded"
                    + (f" for layers {missing}" if missing else "")
                    + ": in-server extraction needs the steering op to run in Python each "
                    "step (CPU backend, or --enforce-eager on CUDA)")
            with torch.inference_mode():
                ids = torch.tensor([entry["token"]], device=self._device)
                embedding = self._embed(ids)[0].float().cpu()
            rows = [embedding] + [entry["layers"][l] for l in range(self._num_layers)]
            out[capture_id] = torch.stack(rows).tolist()
        return out
