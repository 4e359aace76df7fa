"""Captures for in-server extraction: a worker that holds only some decoder
layers (a pipeline stage) refuses with a reason instead of returning partial
streams; ids it never recorded are refused unless another engine core may
have run them (data parallelism)."""

import pytest
import torch

from icv_vllm.worker.captures import CaptureRecorder


def test_a_pipeline_stage_refuses_in_server_extraction():
    recorder = CaptureRecorder(4, lambda ids: torch.zeros(len(ids), 2), torch.device("cpu"), held_layers=range(2, 4))
    with pytest.raises(RuntimeError, match=r"this worker runs layers 2-3 of 4 \(pipeline parallelism\).*icv-vllm extract"):
        recorder.take(["c1"])


def test_a_full_worker_returns_every_layer():
    recorder = CaptureRecorder(2, lambda ids: torch.ones(len(ids), 3), torch.device("cpu"))
    recorder.begin("c1", 7)
    recorder.step_captures = [("c1", 0)]
    for layer in range(2):
        recorder.record(torch.full((1, 3), float(layer)), None, layer)
    rows = recorder.take(["c1"])["c1"]
    assert rows == [[1.0] * 3, [0.0] * 3, [1.0] * 3]


def test_absent_ok_skips_ids_another_engine_ran_but_not_partial_ones():
    recorder = CaptureRecorder(2, lambda ids: torch.ones(len(ids), 3), torch.device("cpu"))
    with pytest.raises(RuntimeError, match="'elsewhere' was not recorded"):
        recorder.take(["elsewhere"])
    assert recorder.take(["elsewhere"], absent_ok=True) == {}  # under data parallelism: another engine's
    recorder.begin("half", 7)
    recorder.step_captures = [("half", 0)]
    recorder.record(torch.zeros(1, 3), None, 0)
    with pytest.raises(RuntimeError, match=r"'half' was not recorded for layers \[1\]"):
        recorder.take(["half"], absent_ok=True)
