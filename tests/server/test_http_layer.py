"""The HTTP layer without an engine: body translation, the middleware on a
stand-in app, the disabled management API, and ``icv-vllm serve`` argument
errors. Fast: no model is loaded."""

from __future__ import annotations

import json
import threading
import time
from argparse import Namespace

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from icv_vllm.server.errors import ICVHTTPError
from icv_vllm.spec import format_spec
from icv_vllm.server.request_icv import translate_body


# -- translate_body ----------------------------------------------------------------

@pytest.mark.parametrize("body, xargs", [
    ({"icv": "a:0.1"}, {"icv": "a:0.1"}),
    ({"icv": " a : 1 , b:-2e-1"}, {"icv": "a:1.0,b:-0.2"}),
    ({"icv": [{"name": "a", "scale": 1}]}, {"icv": "a:1.0"}),
    ({"vllm_xargs": {"icv": "a:1", "other": 3}}, {"icv": "a:1.0", "other": 3}),
    ({"icv": "a:1", "vllm_xargs": {"icv": [{"name": "a", "scale": 1.0}]}}, {"icv": "a:1.0"}),
])
def test_translation_is_canonical(body, xargs):
    out = translate_body({"prompt": "p", **body})
    assert out.body == {"prompt": "p", "vllm_xargs": xargs}
    assert out.spec == xargs["icv"]


def test_untouched_and_null():
    assert translate_body({"prompt": "p"}) is None
    assert translate_body({"prompt": "p", "vllm_xargs": {"seed_tag": 1}}) is None
    assert translate_body({"vllm_xargs": "not ours"}) is None  # vLLM reports it
    out = translate_body({"prompt": "p", "icv": None})
    assert out.body == {"prompt": "p"} and out.spec is None
    out = translate_body({"prompt": "p", "vllm_xargs": {"icv": None, "k": 1}})
    assert out.body == {"prompt": "p", "vllm_xargs": {"k": 1}} and out.spec is None


@pytest.mark.parametrize("body, param, words", [
    ({"icv": "a:1", "vllm_xargs": {"icv": "a:2"}}, "icv", "disagree"),
    ({"icv": "a:1", "vllm_xargs": {"icv": "b:1"}}, "icv", "disagree"),
    ({"icv": "a:1", "vllm_xargs": 3}, "vllm_xargs", "vllm_xargs must be an object"),
    ({"vllm_xargs": {"icv_resolved": "a@x:1"}}, "vllm_xargs", "'icv_resolved' is reserved"),
    ({"vllm_xargs": {"icv_capture": "x"}}, "vllm_xargs", "'icv_capture' is reserved"),
    ({"vllm_xargs": {"icv_ticket": "x"}, "icv": "a:1"}, "vllm_xargs", "'icv_ticket' is reserved"),
    ({"icv": "a;layers=x"}, "icv", "invalid icv"),
    ({"vllm_xargs": {"icv": "a:x"}}, "icv", "invalid vllm_xargs.icv"),
    ({"icv": "a:1", "use_beam_search": True}, "use_beam_search", "use_beam_search"),
    ({"vllm_xargs": {"icv": "a:1"}, "use_beam_search": True}, "use_beam_search", "use_beam_search"),
])
def test_translation_errors(body, param, words):
    with pytest.raises(ICVHTTPError) as info:
        translate_body(body)
    assert info.value.status == 400 and words in info.value.message and info.value.param == param


def test_beam_search_without_a_selection_is_not_ours():
    assert translate_body({"prompt": "p", "use_beam_search": True}) is None
    out = translate_body({"prompt": "p", "use_beam_search": True, "icv": None})
    assert out.spec is None


# -- bodies Python's json cannot take as they are ----------------------------------------

def test_json_literals_that_do_not_survive_parsing():
    from icv_vllm.server.json_body import HugeInt, UnderflowFloat, load_body

    value, huge = load_body(b'{"a": [1e-400, -0.0e7, 0.5, 1e999]}')
    assert not huge and value["a"][2] == 0.5 and value["a"][3] == float("inf")
    assert isinstance(value["a"][0], UnderflowFloat) and value["a"][0].literal == "1e-400"
    assert not isinstance(value["a"][1], UnderflowFloat)  # a real zero
    value, huge = load_body(b'{"a": -1' + b"0" * 5000 + b', "b": 12}')
    assert huge and isinstance(value["a"], HugeInt) and value["a"] < 0 and value["b"] == 12
    with pytest.raises(ICVHTTPError, match="nested too deeply"):
        load_body(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(ValueError):
        load_body(b"{broken")


@pytest.mark.parametrize("raw, words", [
    (b'{"icv": [{"name": "a", "scale": 1e-400}]}', "got 1e-400"),
    (b'{"vllm_xargs": {"icv": [{"name": "a", "scale": -1e-999}]}}', "got -1e-999"),
    (b'{"icv": [{"name": "a", "scale": 1' + b"0" * 300 + b'}]}', "integer of over 100 digits"),
    (b'{"icv": [{"name": "a", "scale": 1' + b"0" * 5000 + b'}]}', "integer of over 100 digits"),
])
def test_scales_lost_in_parsing_are_refused(raw, words):
    from icv_vllm.server.json_body import load_body

    with pytest.raises(ICVHTTPError) as info:
        translate_body(*load_body(raw))
    assert info.value.param == "icv" and words in info.value.message


def test_a_body_we_cannot_reencode_is_refused():
    from icv_vllm.server.json_body import load_body

    with pytest.raises(ICVHTTPError, match="integer literal too long"):
        translate_body(*load_body(b'{"icv": "a:1", "seed": 1' + b"0" * 5000 + b"}"))
    # a non-zero-looking 0.0 elsewhere is the client's own 0.0: forwarded as such
    out = translate_body(*load_body(b'{"icv": "a:1", "temperature": 1e-400}'))
    assert json.loads(json.dumps(out.body))["temperature"] == 0.0


@pytest.mark.parametrize("body, count", [
    ({"prompt": "x"}, 1), ({"prompt": [1, 2, 3]}, 1), ({"prompt": ["x", "y"]}, 2),
    ({"prompt": [[1], [2], [3]]}, 3), ({"messages": []}, 1), ({"prompt": "x", "prompt_embeds": ["a", "b"]}, 3),
])
def test_engine_requests_of_a_body(body, count):
    from icv_vllm.server.request_icv import engine_requests

    assert engine_requests(body) == count


# -- routes that do not serve vectors ------------------------------------------------------

@pytest.mark.parametrize("body, param, words", [
    ({"icv": "a:1"}, "icv", "icv is not supported on /v1/messages"),
    ({"vllm_xargs": {"icv": "a:1"}}, "vllm_xargs", "vllm_xargs.icv is not supported"),
    ({"vllm_xargs": {"icv_resolved": "a@b:1"}}, "vllm_xargs", "'icv_resolved' is reserved"),
    ({"vllm_xargs": {"icv_ticket": "t"}}, "vllm_xargs", "'icv_ticket' is reserved"),
    ({"sampling_params": {"extra_args": {"icv": "a:1"}}}, "sampling_params", "sampling_params.extra_args.icv"),
    ({"sampling_params": {"extra_args": {"icv_capture": "c"}}}, "sampling_params", "'icv_capture' is reserved"),
])
def test_selection_elsewhere_is_refused(body, param, words):
    from icv_vllm.server.request_icv import refuse_selection_elsewhere

    with pytest.raises(ICVHTTPError) as info:
        refuse_selection_elsewhere({"model": "m", **body}, "/v1/messages")
    assert info.value.status == 400 and info.value.param == param and words in info.value.message


def test_no_selection_elsewhere_passes():
    from icv_vllm.server.request_icv import refuse_selection_elsewhere

    for body in ({"icv": None}, {"vllm_xargs": {"icv": None, "k": 1}}, {"vllm_xargs": "x"},
                 {"sampling_params": None}, ["icv"], {"input": "icv:1"}):
        refuse_selection_elsewhere(body, "/v1/embeddings")


# -- the middleware on a stand-in app -------------------------------------------------

uses_seen: list = []


def _echo_app(admitted: list, refuse: str | None = None, admit_delay: float = 0.0) -> FastAPI:
    from icv_vllm.server.middleware import ICVRequestMiddleware

    app = FastAPI()

    def admit(choices: tuple, uses: int = 1) -> str:
        spec = format_spec(choices)  # the middleware hands over the parsed selection
        if admit_delay:
            time.sleep(admit_delay)  # blocking, as file IO is: must not stall the event loop
        if refuse and refuse in spec:
            raise ICVHTTPError(400, f"unknown vector {refuse!r}", "icv")
        admitted.append((spec, threading.current_thread() is threading.main_thread()))
        uses_seen.append(uses)
        return f"ticket-{len(admitted)}"

    app.add_middleware(ICVRequestMiddleware, admit=admit)

    async def echo(request: Request):
        raw = await request.body()
        return {"raw": raw.decode(), "length": request.headers.get("content-length")}

    for path in ("/v1/completions", "/v1/chat/completions", "/v1/messages", "/v1/icv", "/inference/v1/generate",
                 "/v1/audio/transcriptions"):
        app.post(path)(echo)
    return app


def test_middleware_rewrites_generate_routes_only():
    admitted: list = []
    client = TestClient(_echo_app(admitted))
    for i, path in enumerate(("/v1/completions", "/v1/chat/completions"), start=1):
        r = client.post(path, json={"prompt": "p", "icv": [{"name": "a", "scale": 2}]})
        echoed = r.json()
        assert json.loads(echoed["raw"]) == {"prompt": "p", "vllm_xargs": {"icv": "a:2.0", "icv_ticket": f"ticket-{i}"}}
        assert int(echoed["length"]) == len(echoed["raw"].encode())
    assert admitted == [("a:2.0", False), ("a:2.0", False)]  # admitted in a worker thread
    # bodies without a selection pass byte for byte
    raw = '{"prompt":  "no vectors here"}'
    assert client.post("/v1/completions", content=raw).json()["raw"] == raw
    assert client.post("/v1/completions", content="{broken").json()["raw"] == "{broken"
    # the management API reads its own body; forms are not ours
    raw = '{"name": "icv", "pairs": []}'
    assert client.post("/v1/icv", content=raw).json()["raw"] == raw
    form = client.post("/v1/audio/transcriptions", data={"vllm_xargs": '{"icv": "a:1"}'}).json()["raw"]
    assert "icv" in form


def test_batched_completions_get_a_ticket_use_per_prompt():
    admitted: list = []
    client = TestClient(_echo_app(admitted))
    uses_seen.clear()
    r = client.post("/v1/completions", json={"prompt": ["p", "q", "r"], "icv": "a:1"})
    assert json.loads(r.json()["raw"])["vllm_xargs"] == {"icv": "a:1.0", "icv_ticket": "ticket-1"}
    assert len(admitted) == 1 and uses_seen == [3]  # admitted once, for three engine requests


def test_middleware_refuses_with_openai_error():
    client = TestClient(_echo_app([], refuse="nope"))
    r = client.post("/v1/chat/completions", json={"messages": [], "stream": True, "icv": "nope:1"})
    assert r.status_code == 400
    assert r.json() == {"error": {"message": "unknown vector 'nope'", "type": "BadRequestError",
                                  "param": "icv", "code": 400}}


def test_middleware_refuses_selections_on_other_routes():
    client = TestClient(_echo_app([]))
    for path, body in (("/v1/messages", {"icv": "a:1"}),
                       ("/inference/v1/generate", {"sampling_params": {"extra_args": {"icv": "a:1"}}})):
        r = client.post(path, json=body)
        assert r.status_code == 400 and "supported on /v1/completions and /v1/chat/completions" in r.text
    raw = '{"messages": [], "icv": null}'
    assert client.post("/v1/messages", content=raw).json()["raw"] == raw


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_deeply_nested_bodies_are_400(path):
    client = TestClient(_echo_app([]))
    for extra in ("", ', "icv": "a:1"'):
        raw = '{"prompt": "p", "x": ' + "[" * 100_000 + "]" * 100_000 + extra + "}"
        r = client.post(path, content=raw)
        assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"]
    raw = '{"prompt": "p", "x": ' + "[" * 300 + "]" * 300 + "}"  # deep but parseable: vLLM's to judge
    assert client.post(path, content=raw).json()["raw"] == raw


def test_middleware_reads_chunked_bodies():
    client = TestClient(_echo_app([]))
    chunks = [b'{"prompt": "p", ', b'"icv": "a:', b'1"}']
    r = client.post("/v1/completions", content=iter(chunks))
    assert json.loads(r.json()["raw"]) == {"prompt": "p", "vllm_xargs": {"icv": "a:1.0", "icv_ticket": "ticket-1"}}


def test_admission_does_not_block_other_clients():
    """A slow admission (blocking file IO) runs in a thread: a request without
    a selection, sent meanwhile, is answered first."""
    import asyncio

    import httpx

    app = _echo_app([], admit_delay=1.0)

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            finished = []

            async def send(name, body):
                await client.post("/v1/completions", json=body)
                finished.append(name)

            slow = asyncio.ensure_future(send("slow", {"prompt": "p", "icv": "a:1"}))
            await asyncio.sleep(0.1)
            await send("fast", {"prompt": "p"})
            await slow
            return finished

    assert asyncio.run(run()) == ["fast", "slow"]


def test_requests_in_flight_end_when_the_server_stops():
    """vLLM's shutdown stops the engine under running requests; the middleware
    cancels them once ``should_exit`` is set, so uvicorn can finish."""
    import asyncio
    from types import SimpleNamespace

    import httpx

    from icv_vllm.server.middleware import ICVRequestMiddleware

    app = FastAPI()
    app.add_middleware(ICVRequestMiddleware, admit=lambda spec, uses=1: "t")
    app.state.server = SimpleNamespace(should_exit=False)
    cancelled = []

    @app.post("/v1/completions")
    async def hang():
        try:
            await asyncio.sleep(3600)  # an engine that will never answer
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            request = asyncio.ensure_future(client.post("/v1/completions", json={"prompt": "p"}))
            await asyncio.sleep(0.3)
            app.state.server.should_exit = True
            return await asyncio.wait_for(request, 5)

    r = asyncio.run(run())
    assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"] and cancelled


# -- the management API when runtime updates are off ------------------------------------

def _installed_app(tmp_path, monkeypatch, allow: str | None) -> TestClient:
    from icv_vllm.server.app import install

    if allow is None:
        monkeypatch.delenv("ICV_VLLM_ALLOW_RUNTIME_UPDATES", raising=False)
    else:
        monkeypatch.setenv("ICV_VLLM_ALLOW_RUNTIME_UPDATES", allow)
    app = FastAPI()
    install(app, Namespace(additional_config={"icv_vllm": {"dir": str(tmp_path)}}))
    return TestClient(app)


@pytest.mark.parametrize("allow", [None, "0", "false"])
def test_management_is_off_by_default(tmp_path, monkeypatch, allow):
    client = _installed_app(tmp_path, monkeypatch, allow)
    for r in (client.get("/v1/icv"),
              client.post("/v1/icv", json={"name": "x", "pairs": [{"input": "a", "target": "b"}]}),
              client.delete("/v1/icv/x")):
        assert r.status_code == 403
        error = r.json()["error"]
        assert error["type"] == "PermissionDeniedError"
        assert "ICV_VLLM_ALLOW_RUNTIME_UPDATES=1" in error["message"]
    assert list(tmp_path.iterdir()) == []


def test_runtime_updates_switch_refuses_typos(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="ICV_VLLM_ALLOW_RUNTIME_UPDATES must be"):
        _installed_app(tmp_path, monkeypatch, "yes please")


# -- icv-vllm serve argument errors (no server starts) -----------------------------------

@pytest.fixture
def serve_env(monkeypatch):
    """cli_env_setup sets VLLM_WORKER_MULTIPROC_METHOD; keep the test process clean."""
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    monkeypatch.delenv("ICV_VLLM_DIR", raising=False)
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    return monkeypatch


@pytest.mark.parametrize("argv, env, words", [
    (["m"], {}, "--icv-dir DIR is required"),
    (["m", "--icv-dir", "{tmp}/missing"], {}, "does not exist"),
    (["m", "--icv-dir", "{tmp}", "--api-server-count", "0"], {}, "at least one API server"),  # 2: test_scale_out
    (["m", "--icv-dir", "{tmp}", "--headless"], {}, "--headless"),
    (["m", "--icv-dir", "{tmp}", "--additional-config", '{"icv_vllm": {"dir": "/elsewhere"}}'], {}, "disagree"),
    (["m", "--icv-dir", "{tmp}"], {"VLLM_PLUGINS": "other"}, "excludes icv_vllm"),
    (["m", "--icv-dir", "{tmp}"], {"ICV_VLLM_ALLOW_RUNTIME_UPDATES": "2"}, "must be 0/1"),
])
def test_serve_argument_errors(tmp_path, serve_env, capsys, argv, env, words):
    from icv_vllm.cli.serve import main

    for key, value in env.items():
        serve_env.setenv(key, value)
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("icv-vllm serve: error: ") and words in err


def test_api_server_side_imports_no_model_code():
    """Our API-server modules add no model runner, worker or model module to
    what vLLM's own server imports (checked in a fresh interpreter)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from vllm.entrypoints.launchers.cli_args import make_arg_parser\n"
        "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
        "import vllm.entrypoints.launchers.api_server.entry\n"
        "make_arg_parser(FlexibleArgumentParser())\n"
        "before = set(sys.modules)\n"
        "from icv_vllm.cli.serve import build_parser\n"
        "build_parser()\n"
        "import icv_vllm.server.app, icv_vllm.server.extraction, icv_vllm.frontend.capture_client\n"
        "from icv_vllm.plugin import register\n"
        "register()\n"
        "added = set(sys.modules) - before\n"
        "print(sorted(m for m in added if 'model_runner' in m or m.startswith("
        "('vllm.v1.worker', 'vllm.model_executor.models', 'transformers.models'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
