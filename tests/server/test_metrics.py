"""``/metrics`` of a running ``icv-vllm serve`` (the session's server): a
steered request, refused requests and the next step move the icv_vllm_
counters as they should. The engine core's numbers come from another process
(vLLM's scheduler stats), so they are polled until they arrive."""

from __future__ import annotations

import json
import secrets
import time

from prometheus_client.parser import text_string_to_metric_families

from icv_vllm.metrics import REFUSAL_REASONS

from .conftest import write_random_vector


def scrape(server) -> dict:
    """{(sample name, sorted label items): value} for icv_vllm_ samples."""
    reply = server.get("/metrics")
    assert reply.status_code == 200
    out = {}
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            if sample.name.startswith("icv_vllm_") and not sample.name.endswith("_created"):
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def get(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(server, check, timeout_s: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(server)
        if check(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)


def test_metrics_follow_steered_and_refused_requests(icv_server):
    config = json.loads((icv_server.model_dir / "config.json").read_text())
    name = f"metrics-probe-{secrets.token_hex(4)}"  # a content no earlier request shipped
    path = icv_server.vector_dir / f"{name}.safetensors"
    write_random_vector(path, config["num_hidden_layers"], config["hidden_size"], 7, str(icv_server.model_dir))
    try:
        before = scrape(icv_server)
        reply = icv_server.post("/v1/completions", {
            "model": icv_server.model, "prompt": f"{secrets.token_hex(6)} the cat sat on", "max_tokens": 4,
            "temperature": 0, "ignore_eos": True, "icv": f"{name}:2.0;positions=all"})
        assert reply.status_code == 200, reply.text
        usage = reply.json()["usage"]
        for body, status in ((f"nope-{name}:1", 400), ("small:1", 400), ("polite:abc", 400)):
            refused = icv_server.post("/v1/completions", {"model": icv_server.model, "prompt": "a", "max_tokens": 1,
                                                          "icv": body})
            assert refused.status_code == status, refused.text

        def engine_counted(s):  # vLLM records a step's stats right after its outputs: poll until they are in
            return all(get(s, sample, **labels) - get(before, sample, **labels) >= least for sample, labels, least in (
                ("icv_vllm_vectors_shipped_total", {"engine": "0"}, 1),
                ("icv_vllm_steered_tokens_total", {"engine": "0", "position": "prompt"}, usage["prompt_tokens"]),
                ("icv_vllm_steered_tokens_total", {"engine": "0", "position": "generated"},
                 usage["completion_tokens"] - 1)))
        after = wait_for(icv_server, engine_counted)
    finally:
        path.unlink()

    def delta(name_, **labels):
        return get(after, name_, **labels) - get(before, name_, **labels)

    # front end (API server process)
    assert delta("icv_vllm_steered_requests_total") == 1
    assert get(after, "icv_vllm_vector_requests_total", vector=name) == 1
    assert delta("icv_vllm_admission_refusals_total", reason="unknown_vector") == 1
    assert delta("icv_vllm_admission_refusals_total", reason="shape_mismatch") == 1
    assert delta("icv_vllm_admission_refusals_total", reason="invalid_selection") == 1
    reasons = {dict(labels)["reason"] for (sample, labels) in after if sample == "icv_vllm_admission_refusals_total"}
    assert reasons == set(REFUSAL_REASONS)
    # engine core (its own process; through vLLM's scheduler stats)
    assert delta("icv_vllm_vectors_shipped_total", engine="0") == 1
    assert delta("icv_vllm_steered_tokens_total", engine="0", position="prompt") == usage["prompt_tokens"]
    # the last sampled token is never scheduled as an input
    assert delta("icv_vllm_steered_tokens_total", engine="0", position="generated") == usage["completion_tokens"] - 1
    assert delta("icv_vllm_vector_load_failures_total", engine="0") == 0

    # the next step with tokens tells the workers to drop the content no request needs
    plain = icv_server.post("/v1/completions", {"model": icv_server.model, "prompt": "a", "max_tokens": 1})
    assert plain.status_code == 200, plain.text
    dropped = get(after, "icv_vllm_vectors_dropped_total", engine="0")
    final = wait_for(icv_server, lambda s: get(s, "icv_vllm_vectors_dropped_total", engine="0") > dropped)
    assert get(final, "icv_vllm_vectors_dropped_total", engine="0") >= dropped + 1
    assert get(final, "icv_vllm_vectors_held", engine="0") == 0
    assert get(final, "icv_vllm_bank_slots_in_use", engine="0") == 0
