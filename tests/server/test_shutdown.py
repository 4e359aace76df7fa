"""SIGTERM during an in-server extraction: the server exits within seconds,
writes nothing, and no client is left waiting. Its own short-lived server
(about 25 s on 2 CPU cores), since the test ends it."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time

import requests

from .conftest import launch, stop, wait_healthy

EXIT_WITHIN_S = 20


def test_sigterm_stops_an_extraction_promptly(tiny_llama_dir, tmp_path):
    vector_dir = tmp_path / "vectors"
    vector_dir.mkdir()
    proc, server = launch(tiny_llama_dir, vector_dir, tmp_path / "server.log")
    try:
        wait_healthy(proc, server)
        rng = random.Random(0)
        words = "the cat dog sat ran on a mat with care thank you please could would kindly".split()
        # about 180 tokens per text, 1024 texts: half a minute of work for this server
        pairs = [{"input": " ".join(rng.choices(words, k=100)), "target": " ".join(rng.choices(words, k=100))}
                 for _ in range(512)]
        results: dict = {}

        def call(key, fn):
            try:
                results[key] = fn()
            except requests.RequestException as e:  # a connection closed by the exiting server
                results[key] = e

        def extract():
            return server.post("/v1/icv", {"name": "never", "pairs": pairs, "method": "mean"}).status_code

        def stream():
            r = requests.post(server.url + "/v1/completions", headers=server.headers, stream=True, timeout=120,
                              json={"model": server.model, "prompt": "the", "max_tokens": 240,
                                    "ignore_eos": True, "stream": True})
            return sum(1 for _ in r.iter_lines())

        threads = [threading.Thread(target=call, args=("extract", extract), daemon=True),
                   threading.Thread(target=call, args=("stream", stream), daemon=True)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        start = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)  # what a process manager sends: to the server only
        try:
            proc.wait(timeout=EXIT_WITHIN_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the server did not exit within {EXIT_WITHIN_S}s of SIGTERM") from None
        exited_after = time.monotonic() - start
        for t in threads:
            t.join(timeout=10)
        assert not any(t.is_alive() for t in threads), f"a client is still waiting: {results}"
        assert results["extract"] != 200, results
        assert not (vector_dir / "never.safetensors").exists()
        assert exited_after < EXIT_WITHIN_S
    finally:
        stop(proc)
