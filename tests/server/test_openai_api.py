"""Per-request vectors through the official ``openai`` client (``extra_body``)."""

from __future__ import annotations

import pytest

PROMPT = "the cat sat on"
MESSAGES = [{"role": "user", "content": "tell me about the old man"}]
GREEDY = {"max_tokens": 12, "temperature": 0.0}
NO_EOS = {"ignore_eos": True}  # fixed-length outputs: comparisons never hinge on an early EOS

STRING = {"icv": "polite:4.0"}
LIST = {"icv": [{"name": "polite", "scale": 4.0}]}
XARGS = {"vllm_xargs": {"icv": "polite:4"}}


def _complete(client, model, extra=None, stream=False) -> str:
    body = {**NO_EOS, **(extra or {})}
    out = client.completions.create(model=model, prompt=PROMPT, stream=stream, extra_body=body, **GREEDY)
    if stream:
        return "".join(chunk.choices[0].text for chunk in out if chunk.choices)
    return out.choices[0].text


def _chat(client, model, extra=None, stream=False) -> str:
    body = {**NO_EOS, **(extra or {})}
    out = client.chat.completions.create(model=model, messages=MESSAGES, stream=stream, extra_body=body, **GREEDY)
    if stream:
        return "".join(chunk.choices[0].delta.content or "" for chunk in out if chunk.choices)
    return out.choices[0].message.content


@pytest.fixture(scope="module")
def client(icv_server):
    return icv_server.openai()


@pytest.mark.parametrize("call", [_complete, _chat], ids=["completions", "chat"])
def test_vector_changes_output_and_all_forms_agree(icv_server, client, call):
    plain = call(client, icv_server.model)
    steered = {name: call(client, icv_server.model, extra) for name, extra in
               (("string", STRING), ("list", LIST), ("vllm_xargs", XARGS))}
    assert steered["string"] != plain
    assert steered["string"] == steered["list"] == steered["vllm_xargs"]
    # the same selection given twice, in both places, is accepted
    assert call(client, icv_server.model, {**STRING, **XARGS}) == steered["string"]
    # and a plain request after steered ones is unaffected
    assert call(client, icv_server.model) == plain


@pytest.mark.parametrize("call", [_complete, _chat], ids=["completions", "chat"])
def test_streaming_matches_non_streaming(icv_server, client, call):
    for extra in (None, STRING, LIST):
        assert call(client, icv_server.model, extra, stream=True) == call(client, icv_server.model, extra)


def test_combined_vectors_and_null(icv_server, client):
    both = _complete(client, icv_server.model, {"icv": "polite:4,formal:-3"})
    assert both == _complete(client, icv_server.model,
                             {"icv": [{"name": "polite", "scale": 4}, {"name": "formal", "scale": -3.0}]})
    assert both != _complete(client, icv_server.model, STRING)
    # "icv": null means no vector, like an omitted field
    assert _complete(client, icv_server.model, {"icv": None}) == _complete(client, icv_server.model)


def test_client_raises_bad_request_with_our_message(icv_server, client):
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        _complete(client, icv_server.model, {"icv": "nope:1.0"})
    assert "unknown vector 'nope'" in info.value.message
    assert info.value.body["param"] == "icv"
    with pytest.raises(openai.BadRequestError, match="at most 4 vectors"):
        _chat(client, icv_server.model, {"icv": "a:1,b:1,c:1,d:1,e:1"}, stream=True)
