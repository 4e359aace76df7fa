"""``POST /v1/icv/{name}/tune`` on the session's ``icv-vllm serve`` (tiny
Llama): the sweep runs through the live engine, stores
``recommended_scale`` (the file otherwise unchanged), answers the table;
behind the API key and the runtime-updates switch; clear 400/404s; a
disconnect stops it with nothing stored; a bare name then uses the
recommendation."""

from __future__ import annotations

import shutil
import time
from argparse import Namespace

import pytest
import requests
import torch

from icv_vllm.tuning import Measurement, recommend
from icv_vllm.vectors.file_format import load_icv, read_icv_header

from .conftest import write_random_vector

PROMPTS = ["Describe how to make a cup of tea.", "Explain what a rainbow is.", "List the steps to plant a tree."]
BODY = {"prompts": PROMPTS, "scales": [0.01, 0.1, 1.0, 3.0], "max_tokens": 8, "max_ppl_increase": 0.5}


@pytest.fixture
def tunable(icv_server):
    """A fresh vector ``tunable`` (random, for the served model), removed afterwards."""
    path = icv_server.vector_dir / "tunable.safetensors"
    shutil.copyfile(icv_server.vector_dir / "polite.safetensors", path)
    yield path
    path.unlink(missing_ok=True)


def _complete(server, icv) -> requests.Response:
    return server.post("/v1/completions", {"model": server.model, "prompt": "the cat sat on", "max_tokens": 8,
                                           "temperature": 0.0, "ignore_eos": True, "icv": icv})


def test_tune_stores_the_recommendation(icv_server, tunable):
    tensor_before = load_icv(tunable)[0]
    r = icv_server.post("/v1/icv/tunable/tune", BODY)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert (answer["object"], answer["name"], answer["prompts"], answer["max_tokens"]) == ("icv.tune", "tunable", 3, 8)
    assert [p["scale"] for p in answer["points"]] == BODY["scales"]
    for row in [answer["baseline"], *answer["points"]]:
        assert row["perplexity"] > 1.0 and 0 < row["tokens"] <= 3 * 8 and row["effect"] is not None
    assert answer["points"][-1]["ppl_increase"] > 0.5  # λ = 3 wrecks the tiny model: the bound bites
    recommended = answer["recommended_scale"]
    assert recommended is not None and recommended < 3.0 and answer["stored"] is True
    base = answer["baseline"]
    rebuilt = recommend(Measurement(0.0, base["perplexity"], base["tokens"], base["effect"], base["effect_samples"]),
                        [Measurement(p["scale"], p["perplexity"], p["tokens"], p["effect"], p["effect_samples"])
                         for p in answer["points"]], 0.5)
    assert rebuilt.recommended_scale == recommended

    header = read_icv_header(tunable)
    assert header.recommended_scale == recommended
    assert (header.method, header.num_pairs, header.model) == ("mean", 1, icv_server.model)
    assert torch.equal(load_icv(tunable)[0], tensor_before)
    listed = {v["name"]: v for v in icv_server.get("/v1/icv").json()["data"]}
    assert listed["tunable"]["usable"] is True

    # the same sweep, deterministic (greedy), with bound 0: nothing qualifies unless a λ costs nothing
    r = icv_server.post("/v1/icv/tunable/tune", {**BODY, "scales": [3.0], "max_ppl_increase": 0, "dry_run": False})
    assert r.status_code == 200, r.text
    none = r.json()
    assert none["recommended_scale"] is None and none["stored"] is False
    assert "nothing stored" in none["message"]
    assert read_icv_header(tunable).recommended_scale == recommended  # the earlier value stays


def test_dry_run_stores_nothing(icv_server, tunable):
    before = tunable.read_bytes()
    r = icv_server.post("/v1/icv/tunable/tune", {**BODY, "scales": [0.01, 3.0], "prompts": PROMPTS[:1],
                                                 "max_tokens": 4, "dry_run": True})
    assert r.status_code == 200, r.text
    assert r.json()["stored"] is False and r.json()["recommended_scale"] == 0.01
    assert tunable.read_bytes() == before


def test_bare_name_uses_the_recommendation(icv_server, tunable):
    """Needs the selection grammar where a scale is optional (spec.py /
    admission.py: ``name`` alone -> the file's recommended_scale)."""
    from icv_vllm.spec import ICVSpecError, parse_spec

    try:
        parse_spec("tunable")
    except ICVSpecError:
        pytest.skip("the bare-name selection (scale from recommended_scale) has not landed in spec.py yet")
    r = _complete(icv_server, "tunable")
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "no recommended scale" in message and "icv-vllm tune" in message
    r = icv_server.post("/v1/icv/tunable/tune", {**BODY, "prompts": PROMPTS[:2], "max_tokens": 4})
    assert r.status_code == 200 and r.json()["stored"], r.text
    recommended = r.json()["recommended_scale"]
    bare, explicit = _complete(icv_server, "tunable"), _complete(icv_server, f"tunable:{recommended!r}")
    assert bare.status_code == explicit.status_code == 200, (bare.text, explicit.text)
    assert bare.json()["choices"][0]["text"] == explicit.json()["choices"][0]["text"]


@pytest.mark.parametrize("path, body, status, param, words", [
    ("/v1/icv/nope/tune", {}, 404, "name", "no vector named 'nope'"),
    ("/v1/icv/small/tune", {}, 400, "name", "4 layers x 64"),
    ("/v1/icv/polite/tune", {"scales": [0]}, 400, "scales", "must be positive"),
    ("/v1/icv/polite/tune", {"max_ppl_increase": "a lot"}, 400, "max_ppl_increase", "finite number >= 0"),
    ("/v1/icv/polite/tune", {"prompts": ["x" * 2000], "max_tokens": 200}, 400, "prompts", "--max-model-len"),
    ("/v1/icv/polite/tune", {"layers": [1]}, 400, "layers", "unknown field 'layers'"),
    ("/v1/icv/polite/tune", [1], 400, None, "body must be a JSON object"),
    ("/v1/icv/a%20b/tune", {}, 400, "name", "invalid vector name"),
])
def test_bad_tune_requests(icv_server, path, body, status, param, words):
    before = (icv_server.vector_dir / "polite.safetensors").read_bytes()
    r = icv_server.post(path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert str(icv_server.vector_dir) not in error["message"]
    assert (icv_server.vector_dir / "polite.safetensors").read_bytes() == before


def test_gguf_vector_is_refused(icv_server):
    path = icv_server.vector_dir / "cv.gguf"
    path.write_bytes(b"GGUF")
    try:
        r = icv_server.post("/v1/icv/cv/tune", {})
        assert r.status_code == 400 and "icv-vllm convert" in r.json()["error"]["message"], r.text
    finally:
        path.unlink()


def test_needs_the_api_key(icv_server):
    r = requests.post(icv_server.url + "/v1/icv/polite/tune", json={}, timeout=30)
    assert r.status_code == 401


def _requests_in_engine(server) -> float:
    """running + waiting requests, from vLLM's /metrics."""
    text = requests.get(server.url + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting")):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_disconnect_stops_the_sweep_and_stores_nothing(icv_server, tunable):
    before = tunable.read_bytes()
    big = {"prompts": PROMPTS * 5, "scales": [0.001 * 2 ** i for i in range(12)], "max_tokens": 64}
    with pytest.raises(requests.ReadTimeout):  # 195 generations: far from done when the client leaves
        requests.post(icv_server.url + "/v1/icv/tunable/tune", json=big, headers=icv_server.headers, timeout=2.0)
    deadline = time.monotonic() + 5.0  # the server notices within abandon.POLL_S and aborts its requests
    while _requests_in_engine(icv_server) > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _requests_in_engine(icv_server) == 0
    r = _complete(icv_server, "polite:0.1")
    assert r.status_code == 200, r.text
    assert tunable.read_bytes() == before


# -- the switch, without an engine ---------------------------------------------------------------------

@pytest.mark.parametrize("allow", [None, "0"])
def test_tune_is_off_with_the_management_api(tmp_path, monkeypatch, allow):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from icv_vllm.server.app import install

    if allow is None:
        monkeypatch.delenv("ICV_VLLM_ALLOW_RUNTIME_UPDATES", raising=False)
    else:
        monkeypatch.setenv("ICV_VLLM_ALLOW_RUNTIME_UPDATES", allow)
    write_random_vector(tmp_path / "v.safetensors", 3, 8, 0, "m")
    before = (tmp_path / "v.safetensors").read_bytes()
    app = FastAPI()
    install(app, Namespace(additional_config={"icv_vllm": {"dir": str(tmp_path)}}))
    r = TestClient(app).post("/v1/icv/v/tune", json={})
    assert r.status_code == 403 and "ICV_VLLM_ALLOW_RUNTIME_UPDATES=1" in r.json()["error"]["message"]
    assert (tmp_path / "v.safetensors").read_bytes() == before
