"""Every bad selection is a 400 with an OpenAI-style body, decided in the API
server before the engine sees the request; the server keeps serving."""

from __future__ import annotations

import json
import os
import time

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
    ("no-scale", {"icv": "polite"}, "icv", ["no recommended scale", "icv-vllm tune"]),
    ("scale-not-number", {"icv": "polite:abc"}, "icv", ["not a number"]),
    ("empty-entry", {"icv": "polite:1,,formal:1"}, "icv", ["empty entry"]),
    ("empty-string", {"icv": ""}, "icv", ["empty entry"]),
    ("empty-list", {"icv": []}, "icv", ["selects no vector"]),
    ("inf-string", {"icv": "polite:inf"}, "icv", ["is not a number: 'inf'"]),
    ("nan-string-in-list", {"icv": [{"name": "polite", "scale": "nan"}]}, "icv", ["must be a number"]),
    ("nan-list", '"icv": [{"name": "polite", "scale": NaN}]', "icv", ["must be finite"]),
    ("overflow-list", {"icv": [{"name": "polite", "scale": 1e999}]}, "icv", ["must be finite"]),
    ("five-vectors", {"icv": "a:1,b:1,c:1,d:1,e:1"}, "icv", ["at most 4 vectors"]),
    ("int", {"icv": 5}, "icv", ["got int"]),
    ("object", {"icv": {"name": "polite", "scale": 1}}, "icv", ["got dict"]),
    ("bool-scale", {"icv": [{"name": "polite", "scale": True}]}, "icv", ["must be a number"]),
    ("int-name", {"icv": [{"name": 3, "scale": 1}]}, "icv", ["invalid vector name 3"]),
    ("extra-key", {"icv": [{"name": "polite", "scale": 1, "layer": 2}]}, "icv", ['{"name": str, "scale": number, "layers"', "(only name required)"]),
    ("path-name", {"icv": "../polite:1"}, "icv", ["invalid vector name '../polite'"]),
    ("disagree", {"icv": "polite:1", "vllm_xargs": {"icv": "polite:2"}}, "icv", ["disagree"]),
    ("xargs-not-object", {"icv": "polite:1", "vllm_xargs": ["icv"]}, "vllm_xargs", ["must be an object"]),
    ("reserved-resolved", {"vllm_xargs": {"icv_resolved": "polite@0:1.0"}}, "vllm_xargs", ["reserved"]),
    ("reserved-capture", {"vllm_xargs": {"icv_capture": "x"}}, "vllm_xargs", ["reserved"]),
    ("reserved-ticket", {"icv": "polite:1", "vllm_xargs": {"icv_ticket": "x"}}, "vllm_xargs", ["reserved"]),
    ("other-model", {"icv": "small:1"}, "icv", ["'small' has 4 layers x 64 hidden size", "3 x 128"]),
    # lenient spellings the grammar refuses
    ("underscore-digits", {"icv": "polite:1_000"}, "icv", ["not a number"]),
    ("full-width-digit", {"icv": "polite:\uff11"}, "icv", ["not a number"]),
    ("underflow-string", {"icv": "polite:1e-400"}, "icv", ["must be 0 or between 1e-30 and 1000", "1e-400"]),
    ("too-large-string", {"icv": "polite:1e39"}, "icv", ["must be 0 or between 1e-30 and 1000", "1e39"]),
    ("newline-name-list", {"icv": [{"name": "polite\n", "scale": 1}]}, "icv", ["invalid vector name 'polite\\n'"]),
    ("underflow-list", '"icv": [{"name": "polite", "scale": 1e-400}]', "icv", ["got 1e-400"]),
    ("long-int-list", {"icv": [{"name": "polite", "scale": 10 ** 300}]}, "icv", ["integer of over 100 digits"]),
    ("huge-int-list", '"icv": [{"name": "polite", "scale": 1%s}]' % ("0" * 5000), "icv",
     ["integer of over 100 digits"]),
    ("beam-search", {"icv": "polite:1", "use_beam_search": True}, "use_beam_search", ["use_beam_search"]),
]


def _good_request_works(server, endpoint: str, session=None) -> None:
    path, base = ENDPOINTS[endpoint]
    post = session.post if session is not None else requests.post
    r = post(server.url + path, json={"model": server.model, "max_tokens": 2, **base, "icv": "polite:0.5"},
             headers=server.headers, timeout=60)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("case, fields, param, words", BAD, ids=[c[0] for c in BAD])
def test_bad_selection_is_400(icv_server, endpoint, stream, case, fields, param, words):
    path, base = ENDPOINTS[endpoint]
    # json.dumps writes 1e999 as Infinity, which Python's parser (ours) accepts;
    # a str is spliced in as written (literals json.dumps cannot produce)
    body = json.dumps({"model": icv_server.model, "max_tokens": 2, "stream": stream, **base,
                       **(fields if isinstance(fields, dict) else {})})
    if isinstance(fields, str):
        body = body[:-1] + ", " + fields + "}"
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


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_bodies_python_cannot_parse_keep_the_connection(icv_server, stream):
    """A scale of thousands of digits, or JSON nested 100,000 deep, is a 400;
    the next request on the same keep-alive connection is served."""
    with requests.Session() as session:
        headers = {**icv_server.headers, "Content-Type": "application/json"}
        for extra, param, words in (
                ('"icv": [{"name": "polite", "scale": 1%s}]' % ("0" * 5000), "icv", "integer of over 100 digits"),
                ('"icv": "polite:1", "seed": 1%s' % ("0" * 5000), None, "integer literal too long"),
                ('"x": %s%s' % ("[" * 100_000, "]" * 100_000), None, "nested too deeply"),
                ('"x": %s%s, "icv": "polite:1"' % ("[" * 100_000, "]" * 100_000), None, "nested too deeply")):
            body = '{"model": "%s", "prompt": "x", "max_tokens": 2, "stream": %s, %s}' % (
                icv_server.model, json.dumps(stream), extra)
            r = session.post(icv_server.url + "/v1/completions", data=body, headers=headers, timeout=60)
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == param and words in r.json()["error"]["message"]
            _good_request_works(icv_server, "completions", session)


@pytest.fixture
def special_files(icv_server):
    """A FIFO, a directory and a 1 GiB (sparse) file named like vectors; removed after."""
    paths = {name: icv_server.vector_dir / f"{name}.safetensors" for name in ("fifo", "adir", "huge")}
    os.mkfifo(paths["fifo"])
    paths["adir"].mkdir()
    with open(paths["huge"], "wb") as f:
        f.truncate(1 << 30)
    try:
        yield paths
    finally:
        paths["fifo"].unlink(missing_ok=True)
        paths["adir"].rmdir()
        paths["huge"].unlink(missing_ok=True)


def test_special_files_are_refused_quickly(icv_server, special_files):
    expected = {"fifo": "is a FIFO", "adir": "is a directory", "huge": "is 1073741824 bytes"}
    for endpoint, (path, base) in ENDPOINTS.items():
        for stream in (False, True):
            for name, words in expected.items():
                start = time.monotonic()
                r = icv_server.post(path, {"model": icv_server.model, "max_tokens": 2, "stream": stream, **base,
                                           "icv": f"{name}:1"})
                assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
                assert time.monotonic() - start < 5
    r = icv_server.get("/v1/icv")
    listed = {v["name"]: v for v in r.json()["data"]}
    for name, words in expected.items():
        assert listed[name]["usable"] is False and words in listed[name]["error"]
    _good_request_works(icv_server, "chat")


def test_other_routes_refuse_a_selection(icv_server):
    r = icv_server.post("/v1/messages", {"model": icv_server.model, "max_tokens": 2, "icv": "nope:1",
                                         "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400, r.text
    assert "supported on /v1/completions and /v1/chat/completions only" in r.json()["error"]["message"]
    r = icv_server.post("/inference/v1/generate", {"model": icv_server.model, "token_ids": [1, 2],
                                                    "sampling_params": {"extra_args": {"icv_resolved": "a@b:1"}}})
    assert r.status_code == 400 and "reserved" in r.json()["error"]["message"], r.text


def test_batched_completion_with_a_selection(icv_server):
    """Several prompts in one body: one engine request each, all steered."""
    body = {"model": icv_server.model, "prompt": ["the cat", "the dog"], "max_tokens": 4, "temperature": 0.0,
            "ignore_eos": True}
    plain = icv_server.post("/v1/completions", body)
    steered = icv_server.post("/v1/completions", {**body, "icv": "polite:4"})
    assert plain.status_code == steered.status_code == 200, steered.text
    texts = [c["text"] for c in sorted(steered.json()["choices"], key=lambda c: c["index"])]
    assert len(texts) == 2 and texts != [c["text"] for c in sorted(plain.json()["choices"], key=lambda c: c["index"])]


def test_reserved_keys_whatever_the_request_id(icv_server):
    """Capture and admission keys are never the client's to set, even with a
    request id that looks like the server's own capture requests."""
    headers = {**icv_server.headers, "X-Request-Id": "icv-capture-0123456789abcdef"}
    for key in ("icv_capture", "icv_resolved", "icv_ticket"):
        r = requests.post(icv_server.url + "/v1/completions", headers=headers, timeout=60,
                          json={"model": icv_server.model, "prompt": "x", "max_tokens": 1,
                                "vllm_xargs": {key: "0123456789abcdef"}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "vllm_xargs", r.text
