"""The HTTP layer without an engine: body translation, the middleware on a
stand-in app, the disabled management API, and ``icv-vllm serve`` argument
errors. Fast: no model is loaded."""

from __future__ import annotations

import json
from argparse import Namespace

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from icv_vllm.server.errors import ICVHTTPError
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


@pytest.mark.parametrize("body, words", [
    ({"icv": "a:1", "vllm_xargs": {"icv": "a:2"}}, "disagree"),
    ({"icv": "a:1", "vllm_xargs": {"icv": "b:1"}}, "disagree"),
    ({"icv": "a:1", "vllm_xargs": 3}, "vllm_xargs must be an object"),
    ({"vllm_xargs": {"icv_resolved": "a@x:1"}}, "reserved"),
    ({"icv": "a"}, "invalid icv"),
    ({"vllm_xargs": {"icv": "a:x"}}, "invalid vllm_xargs.icv"),
])
def test_translation_errors(body, words):
    with pytest.raises(ICVHTTPError) as info:
        translate_body(body)
    assert info.value.status == 400 and words in info.value.message


# -- the middleware on a stand-in app -------------------------------------------------

def _echo_app(resolved: list, refuse: str | None = None) -> FastAPI:
    from icv_vllm.server.middleware import ICVRequestMiddleware

    app = FastAPI()

    def resolve(spec: str) -> None:
        if refuse and refuse in spec:
            raise ICVHTTPError(400, f"unknown vector {refuse!r}", "icv")
        resolved.append(spec)

    app.add_middleware(ICVRequestMiddleware, resolve=resolve)

    @app.post("/v1/completions")
    @app.post("/v1/chat/completions")
    @app.post("/v1/other")
    async def echo(request: Request):
        raw = await request.body()
        return {"raw": raw.decode(), "length": request.headers.get("content-length")}

    return app


def test_middleware_rewrites_generate_routes_only():
    resolved: list[str] = []
    client = TestClient(_echo_app(resolved))
    for path in ("/v1/completions", "/v1/chat/completions"):
        r = client.post(path, json={"prompt": "p", "icv": [{"name": "a", "scale": 2}]})
        echoed = r.json()
        assert json.loads(echoed["raw"]) == {"prompt": "p", "vllm_xargs": {"icv": "a:2.0"}}
        assert int(echoed["length"]) == len(echoed["raw"].encode())
    assert resolved == ["a:2.0", "a:2.0"]
    # other routes and bodies without a selection pass byte for byte
    raw = '{"prompt": "p",  "icv": "a:1"}'
    assert client.post("/v1/other", content=raw).json()["raw"] == raw
    raw = '{"prompt":  "no vectors here"}'
    assert client.post("/v1/completions", content=raw).json()["raw"] == raw
    assert client.post("/v1/completions", content="{broken").json()["raw"] == "{broken"


def test_middleware_refuses_with_openai_error():
    client = TestClient(_echo_app([], refuse="nope"))
    r = client.post("/v1/chat/completions", json={"messages": [], "stream": True, "icv": "nope:1"})
    assert r.status_code == 400
    assert r.json() == {"error": {"message": "unknown vector 'nope'", "type": "BadRequestError",
                                  "param": "icv", "code": 400}}


def test_middleware_reads_chunked_bodies():
    client = TestClient(_echo_app([]))
    chunks = [b'{"prompt": "p", ', b'"icv": "a:', b'1"}']
    r = client.post("/v1/completions", content=iter(chunks))
    assert json.loads(r.json()["raw"]) == {"prompt": "p", "vllm_xargs": {"icv": "a:1.0"}}


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
    (["m", "--icv-dir", "{tmp}", "--api-server-count", "2"], {}, "one API server process"),
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
        "import icv_vllm.server.app, icv_vllm.server.extraction, icv_vllm.plugin.capture\n"
        "from icv_vllm.plugin import register\n"
        "register()\n"
        "added = set(sys.modules) - before\n"
        "print(sorted(m for m in added if 'model_runner' in m or m.startswith("
        "('vllm.v1.worker', 'vllm.model_executor.models', 'transformers.models'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
