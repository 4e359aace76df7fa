"""Every bad selection is a 400 with an OpenAI-style body, decided in the API
server before the engine sees the request; the server keeps serving."""

from __future__ import annotations

import json

import pytest
import requests

ENDPOINTS = {
    "completions": ("/v1/completions", {"prompt": "the cat sat on"}),
    "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}]}),
}

# (case id, body fields, expected param, words the message must contain)
BAD = [
    ("unknown-name", {"icv": "nope:0.1"}, "icv", ["unknown vector 'nope'", "known vectors: formal, polite, small"]),
    ("unknown-in-list", {"icv": [{"name": "polite", "scale": 1}, {"name": "nope", "scale": 1}]}, "icv",
     ["unknown vector 'nope'"]),
    ("unknown-via-xargs", {"vllm_xargs": {"icv": "nope:0.1"}}, "icv", ["unknown vector 'nope'"]),
    ("no-scale", {"icv": "polite"}, "icv", ["'name:scale'"]),
    ("scale-not-number", {"icv": "polite:abc"}, "icv", ["not a number"]),
    ("empty-entry", {"icv": "polite:1,,formal:1"}, "icv", ["empty entry"]),
    ("empty-string", {"icv": ""}, "icv", ["empty entry"]),
    ("empty-list", {"icv": []}, "icv", ["selects no vector"]),
    ("inf-string", {"icv": "polite:inf"}, "icv", ["must be finite"]),
    ("nan-list", {"icv": [{"name": "polite", "scale": "nan"}]}, "icv", ["must be finite"]),
    ("overflow-list", {"icv": [{"name": "polite", "scale": 1e999}]}, "icv", ["must be finite"]),
    ("five-vectors", {"icv": "a:1,b:1,c:1,d:1,e:1"}, "icv", ["at most 4 vectors"]),
    ("int", {"icv": 5}, "icv", ["got int"]),
    ("object", {"icv": {"name": "polite", "scale": 1}}, "icv", ["got dict"]),
    ("bool-scale", {"icv": [{"name": "polite", "scale": True}]}, "icv", ["must be a number"]),
    ("int-name", {"icv": [{"name": 3, "scale": 1}]}, "icv", ["invalid vector name 3"]),
    ("extra-key", {"icv": [{"name": "polite", "scale": 1, "layer": 2}]}, "icv", ['{"name": str, "scale": number}']),
    ("path-name", {"icv": "../polite:1"}, "icv", ["invalid vector name '../polite'"]),
    ("disagree", {"icv": "polite:1", "vllm_xargs": {"icv": "polite:2"}}, "icv", ["disagree"]),
    ("xargs-not-object", {"icv": "polite:1", "vllm_xargs": ["icv"]}, "vllm_xargs", ["must be an object"]),
    ("reserved-resolved", {"vllm_xargs": {"icv_resolved": "polite@0:1.0"}}, "vllm_xargs", ["reserved"]),
    ("reserved-capture", {"vllm_xargs": {"icv_capture": "x"}}, "vllm_xargs", ["reserved"]),
    ("other-model", {"icv": "small:1"}, "icv", ["'small' has 4 layers x 64 hidden size", "3 x 128"]),
]


def _good_request_works(server, endpoint: str) -> None:
    path, base = ENDPOINTS[endpoint]
    r = server.post(path, {"model": server.model, "max_tokens": 2, **base, "icv": "polite:0.5"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("case, fields, param, words", BAD, ids=[c[0] for c in BAD])
def test_bad_selection_is_400(icv_server, endpoint, stream, case, fields, param, words):
    path, base = ENDPOINTS[endpoint]
    # json.dumps writes 1e999 as Infinity, which Python's parser (ours) accepts
    body = json.dumps({"model": icv_server.model, "max_tokens": 2, "stream": stream, **base, **fields})
    r = requests.post(icv_server.url + path, data=body, timeout=60,
                      headers={**icv_server.headers, "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert error["type"] == "BadRequestError" and error["code"] == 400 and error["param"] == param
    for word in words:
        assert word in error["message"]
    assert "(parameter=" not in error["message"]
    assert str(icv_server.vector_dir) not in error["message"]  # no server paths
    _good_request_works(icv_server, endpoint)


def test_unauthenticated_requests_learn_nothing(icv_server):
    """vLLM's --api-key check runs before ours: no vector names leak."""
    for path, body in [("/v1/completions", {"model": icv_server.model, "prompt": "x", "icv": "nope:1"}),
                       ("/v1/icv", None)]:
        r = (requests.post(icv_server.url + path, json=body, timeout=30) if body
             else requests.get(icv_server.url + path, timeout=30))
        assert r.status_code == 401
        assert "polite" not in r.text


def test_bodies_we_do_not_own_pass_through(icv_server):
    # malformed JSON and vllm_xargs of a wrong type without `icv` are vLLM's to answer
    r = requests.post(icv_server.url + "/v1/completions", data=b'{"icv": ', timeout=30,
                      headers={**icv_server.headers, "Content-Type": "application/json"})
    assert r.status_code in (400, 422), r.text
    # an escaped key is still our field
    raw = '{"model": "%s", "prompt": "x", "max_tokens": 1, "\\u0069cv": "nope:1"}' % icv_server.model
    r = requests.post(icv_server.url + "/v1/completions", data=raw, timeout=30,
                      headers={**icv_server.headers, "Content-Type": "application/json"})
    assert r.status_code == 400 and "unknown vector 'nope'" in r.json()["error"]["message"]
    _good_request_works(icv_server, "completions")
