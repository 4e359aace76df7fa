"""In-server extraction against a stand-in engine: capture requests go in
a bounded window, stop (aborted, nothing written) when the client leaves or the
server shuts down, and the route wires it all together."""

from __future__ import annotations

import asyncio
import os
from argparse import Namespace
from types import SimpleNamespace

import httpx
import pytest
from fastapi import FastAPI

from icv_vllm.frontend.admission import CAPTURE_IDS
from icv_vllm.frontend.capture_client import capture_residual_streams
from icv_vllm.server.abandon import until_abandoned
from icv_vllm.server.errors import ICVHTTPError

from .test_store import HIDDEN, LAYERS, _fake_vllm_config


class FakeTokenizer:
    def __call__(self, text: str) -> dict:
        return {"input_ids": [1] + [2 + len(w) for w in text.split()]}


class FakeEngine:
    """``generate`` + ``collective_rpc`` as the capture client uses them."""

    def __init__(self, step_s: float = 0.01):
        self.step_s = step_s
        self.in_flight = self.max_in_flight = 0
        self.aborted: list[str] = []
        self.captured: dict = {}
        self.rpc_calls = 0
        self.vllm_config = SimpleNamespace(model_config=SimpleNamespace(max_model_len=64, model="m"),
                                           parallel_config=SimpleNamespace(data_parallel_size=1))
        self.renderer = SimpleNamespace(get_tokenizer=FakeTokenizer)
        self.errored = False

    async def generate(self, prompt, params, request_id, data_parallel_rank=None):
        assert data_parallel_rank is None  # one engine: vLLM's own routing
        capture_id = params.extra_args["icv_capture"]
        assert CAPTURE_IDS.take(capture_id) is True  # what admission does: once only
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.step_s)
            n = float(len(prompt["prompt_token_ids"]))
            self.captured[capture_id] = [[n + layer] * HIDDEN for layer in range(LAYERS + 1)]
            yield "one token"
        except asyncio.CancelledError:
            self.aborted.append(request_id)
            raise
        finally:
            self.in_flight -= 1

    async def collective_rpc(self, method, args):
        assert method == "icv_take_captures"
        self.rpc_calls += 1
        return [{c: self.captured.pop(c) for c in args[0] if c in self.captured}]


class TwoEngines:
    """Data parallelism as vLLM's DP client does it: ``data_parallel_rank``
    picks an engine (else round robin), ``collective_rpc`` asks every engine
    and answers with the first one's result; each engine's workers refuse ids
    they never recorded unless told ``absent_ok``."""

    def __init__(self):
        self.engines = [FakeEngine(step_s=0.001), FakeEngine(step_s=0.001)]
        self.vllm_config = SimpleNamespace(model_config=SimpleNamespace(max_model_len=64, model="m"),
                                           parallel_config=SimpleNamespace(data_parallel_size=2))
        self.renderer = SimpleNamespace(get_tokenizer=FakeTokenizer)
        self.errored = False
        self.next = 0
        self.routed: list[int | None] = []

    async def generate(self, prompt, params, request_id, data_parallel_rank=None):
        self.routed.append(data_parallel_rank)
        index = data_parallel_rank if data_parallel_rank is not None else self.next
        self.next = (self.next + 1) % 2
        async for out in self.engines[index].generate(prompt, params, request_id):
            yield out

    async def collective_rpc(self, method, args):
        assert method == "icv_take_captures"
        capture_ids, absent_ok = args
        answers = []
        for engine in self.engines:
            if not absent_ok and any(c not in engine.captured for c in capture_ids):
                raise RuntimeError("icv capture was not recorded")
            answers.append((await engine.collective_rpc(method, args))[0])
        return answers


def test_under_data_parallelism_every_capture_goes_to_the_first_engine():
    engine = TwoEngines()
    ids = [[1] * (i + 1) for i in range(10)]
    streams = asyncio.run(capture_residual_streams(engine, ids, window=4, collect_every=4))
    assert [float(s[0, 0]) for s in streams] == [float(i + 1) for i in range(10)]
    assert engine.routed == [0] * 10
    assert engine.engines[1].max_in_flight == 0 and not engine.engines[0].captured


def test_a_window_bounds_what_is_in_flight():
    engine = FakeEngine()
    ids = [[1] * (i + 1) for i in range(20)]
    streams = asyncio.run(capture_residual_streams(engine, ids, window=8, collect_every=8))
    assert tuple(streams.shape) == (20, LAYERS + 1, HIDDEN)
    assert [float(s[0, 0]) for s in streams] == [float(i + 1) for i in range(20)]  # in order
    assert engine.max_in_flight == 8 and engine.rpc_calls == 3 and not engine.captured


def test_cancelling_aborts_what_runs_and_starts_no_more():
    engine = FakeEngine(step_s=3600)

    async def run():
        task = asyncio.ensure_future(capture_residual_streams(engine, [[1, 2]] * 20, window=8))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert len(engine.aborted) == 8 and engine.in_flight == 0
    assert engine.rpc_calls == 0  # nothing finished, nothing to collect


def test_a_failed_request_aborts_the_rest_and_frees_finished_captures():
    engine = FakeEngine(step_s=0.05)
    generate = engine.generate

    async def failing(prompt, params, request_id, data_parallel_rank=None):
        if len(prompt["prompt_token_ids"]) == 3:
            await asyncio.sleep(0.3)  # the others finish first
            raise RuntimeError("refused by admission")
        async for out in generate(prompt, params, request_id, data_parallel_rank):
            yield out

    engine.generate = failing
    with pytest.raises(RuntimeError, match="refused by admission"):
        asyncio.run(capture_residual_streams(engine, [[1], [1, 2], [1, 2, 3], [1, 2, 3, 4]], window=8))
    assert engine.rpc_calls == 1 and not engine.captured


def _receive_after(seconds: float | None):
    async def receive():
        if seconds is None:
            await asyncio.sleep(3600)
        await asyncio.sleep(seconds)
        return {"type": "http.disconnect"}
    return receive


@pytest.mark.parametrize("disconnect_s, stop, words", [
    (0.1, False, "the client disconnected"),
    (None, True, "the server is shutting down"),
])
def test_abandoned_work_is_cancelled(disconnect_s, stop, words):
    cancelled = []

    async def work():
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def run():
        return await until_abandoned(work(), _receive_after(disconnect_s), lambda: stop, "extraction of 'x'")

    with pytest.raises(ICVHTTPError) as info:
        asyncio.run(asyncio.wait_for(run(), 5))
    assert info.value.status == 503 and words in info.value.message and cancelled


def test_finished_work_is_returned_or_raised():
    async def ok():
        return 7

    async def bad():
        raise ValueError("boom")

    assert asyncio.run(until_abandoned(ok(), _receive_after(None), lambda: False, "w")) == 7
    with pytest.raises(ValueError, match="boom"):
        asyncio.run(until_abandoned(bad(), _receive_after(None), lambda: False, "w"))


@pytest.fixture
def app(tmp_path, monkeypatch):
    from icv_vllm.server.app import install

    monkeypatch.setenv("ICV_VLLM_ALLOW_RUNTIME_UPDATES", "1")
    directory = tmp_path / "vectors"
    directory.mkdir()
    app = FastAPI()
    install(app, Namespace(additional_config={"icv_vllm": {"dir": str(directory)}}))
    app.state.vllm_config = _fake_vllm_config(directory, tmp_path / "pinned")
    app.state.directory = directory
    return app


PAIRS = [{"input": "you are rude", "target": "thank you kindly"}, {"input": "go away", "target": "please go"}]


async def _post(app: FastAPI, body: dict, during=None) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        request = asyncio.ensure_future(client.post("/v1/icv", json=body))
        if during is not None:
            await asyncio.sleep(0.3)
            during()
        return await asyncio.wait_for(request, 10)


def test_route_creates_a_vector(app):
    app.state.engine_client = FakeEngine()
    r = asyncio.run(_post(app, {"name": "made", "pairs": PAIRS, "method": "mean"}))
    assert r.status_code == 200, r.text
    assert r.json()["usable"] is True and r.json()["num_pairs"] == 2
    assert (app.state.directory / "made.safetensors").is_file()


def test_route_stops_on_shutdown_and_writes_nothing(app):
    engine = FakeEngine(step_s=3600)
    app.state.engine_client = engine
    app.state.server = SimpleNamespace(should_exit=False)
    r = asyncio.run(_post(app, {"name": "never", "pairs": PAIRS}, during=lambda: setattr(app.state.server, "should_exit", True)))
    assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
    assert engine.aborted and engine.in_flight == 0
    assert not os.path.lexists(app.state.directory / "never.safetensors")


def test_data_parallel_routing_needs_vllms_rank_parameter():
    """Checked before any capture: the real AsyncLLM.generate takes it; an
    engine client without it fails with what vLLM changed."""
    from vllm.v1.engine.async_llm import AsyncLLM

    from icv_vllm.server.extraction import check_captures_possible
    from icv_vllm.server.vllm_hooks import VLLMServerHookError, check_data_parallel_routing

    check_data_parallel_routing(SimpleNamespace(generate=AsyncLLM.generate), "in-server extraction")
    check_captures_possible(TwoEngines(), "in-server extraction")

    class OldEngine(TwoEngines):
        async def generate(self, prompt, params, request_id):
            yield None

    with pytest.raises(VLLMServerHookError, match="no longer takes data_parallel_rank.*in-server tuning"):
        check_captures_possible(OldEngine(), "in-server tuning")
    check_captures_possible(FakeEngine(), "in-server tuning")  # one engine: nothing to route
