"""``/v1/icv``: list, create in the running server, use at once, delete;
in-server extraction equals the offline extractor."""

from __future__ import annotations

import pytest
import torch

from icv_vllm.vectors.vector import ICVector

from .conftest import MAX_MODEL_LEN, PAIRS


def _complete(server, icv=None) -> str:
    body = {"model": server.model, "prompt": "the cat sat on", "max_tokens": 10, "temperature": 0.0,
            "ignore_eos": True}
    if icv is not None:
        body["icv"] = icv
    r = server.post("/v1/completions", body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_list_shows_metadata(icv_server):
    r = icv_server.get("/v1/icv")
    assert r.status_code == 200, r.text
    listed = {v["name"]: v for v in r.json()["data"]}
    assert {"polite", "formal", "small"} <= set(listed)
    polite = listed["polite"]
    assert polite["usable"] is True and polite["object"] == "icv"
    assert (polite["num_layers"], polite["hidden_size"], polite["method"], polite["num_pairs"]) == (3, 128, "mean", 1)
    assert polite["model"] == icv_server.model and len(polite["digest"]) == 16
    assert listed["small"]["usable"] is False and "4 layers x 64" in listed["small"]["error"]


def test_create_use_conflict_overwrite_delete(icv_server):
    plain = _complete(icv_server)
    r = icv_server.post("/v1/icv", {"name": "fresh", "pairs": PAIRS, "method": "mean"})
    assert r.status_code == 200, r.text
    created = r.json()
    assert (created["name"], created["method"], created["num_pairs"], created["usable"]) == ("fresh", "mean", 4, True)
    assert (icv_server.vector_dir / "fresh.safetensors").is_file()
    steered = _complete(icv_server, "fresh:8")  # usable at once
    assert steered != plain

    r = icv_server.post("/v1/icv", {"name": "fresh", "pairs": PAIRS[:2]})
    assert r.status_code == 409 and r.json()["error"]["type"] == "ConflictError"
    assert "overwrite" in r.json()["error"]["message"]

    r = icv_server.post("/v1/icv", {"name": "fresh", "pairs": PAIRS[:2], "method": "pca", "overwrite": True})
    assert r.status_code == 200, r.text
    assert r.json()["digest"] != created["digest"] and r.json()["num_pairs"] == 2
    assert _complete(icv_server, "fresh:8") != steered  # the new file is used, not a cached old one

    r = icv_server.delete("/v1/icv/fresh")
    assert r.status_code == 200 and r.json() == {"object": "icv", "name": "fresh", "deleted": True}
    r = icv_server.post("/v1/completions", {"model": icv_server.model, "prompt": "x", "icv": "fresh:1"})
    assert r.status_code == 400 and "unknown vector 'fresh'" in r.json()["error"]["message"]
    r = icv_server.delete("/v1/icv/fresh")
    assert r.status_code == 404 and "known vectors: formal, polite, small" in r.json()["error"]["message"]


@pytest.mark.parametrize("method", ["mean", "pca"])
def test_in_server_extraction_equals_offline(icv_server, method):
    from icv_vllm.vectors.extraction import extract_icv

    r = icv_server.post("/v1/icv", {"name": f"cmp-{method}", "pairs": PAIRS, "method": method})
    assert r.status_code == 200, r.text
    served = ICVector.load(icv_server.vector_dir / f"cmp-{method}.safetensors")
    offline = extract_icv(str(icv_server.model_dir), [(p["input"], p["target"]) for p in PAIRS],
                          method=method, progress=False)
    assert (served.method, served.num_pairs, served.model) == (offline.method, offline.num_pairs, offline.model)
    # vLLM's CPU kernels and transformers' differ in summation order only
    scale = offline.tensor.abs().max()
    torch.testing.assert_close(served.tensor, offline.tensor, rtol=0, atol=1e-5 * float(scale))
    assert icv_server.delete(f"/v1/icv/cmp-{method}").status_code == 200


BAD_CREATE = [
    ({"pairs": PAIRS}, "name", "name is required"),
    ({"name": "../evil", "pairs": PAIRS}, "name", "invalid vector name '../evil'"),
    ({"name": "a/b", "pairs": PAIRS}, "name", "invalid vector name 'a/b'"),
    ({"name": "..", "pairs": PAIRS}, "name", "invalid vector name '..'"),
    ({"name": "", "pairs": PAIRS}, "name", "invalid vector name ''"),
    ({"name": 7, "pairs": PAIRS}, "name", "invalid vector name 7"),
    ({"name": "x"}, "pairs", "pairs is required"),
    ({"name": "x", "pairs": []}, "pairs", "no demonstration pairs"),
    ({"name": "x", "pairs": "a b"}, "pairs", "expected a list"),
    ({"name": "x", "pairs": [{"input": "a"}]}, "pairs", "pairs[0]: missing key 'target'"),
    ({"name": "x", "pairs": [{"input": "a", "target": 3}]}, "pairs", "'target' must be a string"),
    ({"name": "x", "pairs": [{"input": "a", "target": "b", "why": "c"}]}, "pairs", "unexpected key 'why'"),
    ({"name": "x", "pairs": [PAIRS[0], {"input": "?!", "target": "b"}]}, "pairs",
     "pairs[1]: 'input' is empty after removing punctuation"),
    ({"name": "x", "pairs": [{"input": "a " * MAX_MODEL_LEN, "target": "b"}]}, "pairs", "pairs[0].input is"),
    ({"name": "x", "pairs": PAIRS, "method": "svd"}, "method", "method must be one of pca, mean"),
    ({"name": "x", "pairs": PAIRS, "overwrite": "yes"}, "overwrite", "overwrite must be true or false"),
    ({"name": "x", "pairs": PAIRS, "layers": [1]}, "layers", "unknown field 'layers'"),
    ([PAIRS], None, "body must be a JSON object"),
]


@pytest.mark.parametrize("body, param, words", BAD_CREATE, ids=[f"bad{i}" for i in range(len(BAD_CREATE))])
def test_bad_create_bodies(icv_server, body, param, words):
    r = icv_server.post("/v1/icv", body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert not (icv_server.vector_dir / "x.safetensors").exists()


def test_nothing_outside_the_directory(icv_server):
    import requests

    canary = icv_server.vector_dir.parent / "canary.safetensors"
    canary.write_bytes(b"do not touch")
    before = sorted(p.name for p in icv_server.vector_dir.parent.iterdir())
    for path in ("/v1/icv/%2E%2E", "/v1/icv/..%2Fcanary", "/v1/icv/%2E%2E%2Fcanary", "/v1/icv/a%5Cb"):
        r = requests.delete(icv_server.url + path, headers=icv_server.headers, timeout=30)
        assert r.status_code in (400, 404), (path, r.text)
    r = icv_server.post("/v1/icv", {"name": "../canary", "pairs": PAIRS, "overwrite": True})
    assert r.status_code == 400
    r = icv_server.post("/v1/completions", {"model": icv_server.model, "prompt": "x", "icv": "../canary:1"})
    assert r.status_code == 400
    assert canary.read_bytes() == b"do not touch"
    assert sorted(p.name for p in icv_server.vector_dir.parent.iterdir()) == before


def test_bad_json_body(icv_server):
    import requests

    r = requests.post(icv_server.url + "/v1/icv", data=b"{not json", timeout=30,
                      headers={**icv_server.headers, "Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
