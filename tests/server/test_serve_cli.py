"""``icv-vllm serve`` sets VLLM_USE_AOT_COMPILE=0 on the CPU unless the user
set it (no engine starts: vLLM's run_server is replaced by a recorder)."""

from __future__ import annotations

import importlib

import pytest

from icv_vllm.cli import serve

ENV = serve.AOT_COMPILE_ENV


@pytest.mark.parametrize("environ, on_cpu, expected, logged", [
    ({}, True, "0", True),                  # CPU, unset: the default is applied
    ({ENV: "1"}, True, "1", False),         # an explicit user value is kept
    ({ENV: "0"}, True, "0", False),
    ({ENV: ""}, True, "", False),           # even an empty one (vLLM reads it as off)
    ({}, False, None, False),               # not the CPU: vLLM's own default stays
])
def test_default_compile_cache(environ, on_cpu, expected, logged):
    note = serve._default_compile_cache(environ, on_cpu=on_cpu)
    assert environ.get(ENV) == expected
    assert bool(note) == logged
    if note:
        assert note.startswith(f"{ENV}=0") and "override" in note


@pytest.fixture
def fake_run(monkeypatch, tmp_path):
    """main() up to vLLM's run_server, which records the environment instead of serving."""
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    for name in ("ICV_VLLM_DIR", "VLLM_PLUGINS", ENV):
        monkeypatch.setenv(name, "")  # so that monkeypatch restores what main() sets
        monkeypatch.delenv(name)
    seen = {"logged": []}

    async def run_server(args):
        seen["value"] = serve.os.environ.get(ENV)

    from icv_vllm.server.vllm_hooks import RUN_SERVER

    monkeypatch.setattr(importlib.import_module(RUN_SERVER.module), RUN_SERVER.attribute, run_server)
    monkeypatch.setattr("icv_vllm.server.app.patch_vllm_app", lambda: None)
    monkeypatch.setattr("icv_vllm.plugin.register", lambda: None)
    monkeypatch.setattr(serve, "_default_compile_cache",
                        lambda real=serve._default_compile_cache: real(on_cpu=True))
    monkeypatch.setattr(serve.logger, "info", lambda msg, *a: seen["logged"].append(msg % a))
    argv = ["some-model", "--icv-dir", str(tmp_path)]
    return monkeypatch, seen, argv


def test_serve_sets_the_default_before_the_server_starts(fake_run):
    monkeypatch, seen, argv = fake_run
    assert serve.main(argv) == 0
    assert seen["value"] == "0"
    assert [m for m in seen["logged"] if m.startswith(f"{ENV}=0 (set by icv-vllm serve")]


def test_serve_keeps_an_explicit_user_value(fake_run):
    monkeypatch, seen, argv = fake_run
    monkeypatch.setenv(ENV, "1")
    assert serve.main(argv) == 0
    assert seen["value"] == "1"
    assert not [m for m in seen["logged"] if ENV in m]
