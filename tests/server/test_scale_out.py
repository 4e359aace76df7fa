"""Scale-out through vLLM's own machinery: ``icv-vllm serve`` with
``--api-server-count 2 --data-parallel-size 2`` (two API server processes,
two engine cores, one server start for all the live checks), plus the parts
that need no server: how many API servers a command line gets, the spawned
processes' entry point, and the directory write lock that makes management
writes from several processes safe.

The live server is compared with a Hugging Face reference (the solo greedy
output: no vLLM, no batching). Which processes served: every API server
process writes its own Prometheus file (vLLM's multiprocess mode, here in a
folder the test chooses), and the engine-core metrics carry the engine index.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from icv_vllm.vectors.vector import ICVector

from .conftest import API_KEY, MAX_MODEL_LEN, PAIRS, Server, _free_port, stop, wait_healthy, write_random_vector

MAX_TOKENS = 8
SCALE = 4.0
CONCURRENT = 16
PROMPT = "the cat sat on the mat and looked at the"


# -- no server ------------------------------------------------------------------------------

def _parse(argv):
    from icv_vllm.cli import serve

    return serve.build_parser().parse_args(["some-model", *argv])


@pytest.mark.parametrize("argv, expected", [
    ([], 1),
    (["--api-server-count", "2"], 2),
    (["--data-parallel-size", "2"], 2),            # vLLM's default: one API server per engine
    (["--data-parallel-size", "2", "--api-server-count", "1"], 1),
    (["--data-parallel-size", "2", "--data-parallel-rank", "1"], 1),  # external load balancer
])
def test_api_server_count_as_vllm_serve(argv, expected):
    from icv_vllm.cli import serve

    assert serve.api_server_count(_parse(argv)) == expected


@pytest.mark.parametrize("argv, words", [
    (["--api-server-count", "0"], "at least one API server"),
    (["--data-parallel-size", "2", "--data-parallel-multi-port-external-lb"], "--data-parallel-rank"),
])
def test_unsupported_layouts_are_refused(argv, words):
    from icv_vllm.cli import serve

    with pytest.raises(serve.ServeError, match=words):
        serve._check_supported(_parse(argv))


def test_several_api_servers_start_in_the_icv_entry_point(monkeypatch, tmp_path):
    """main() with --api-server-count 2 runs vLLM's run_multi_api_server, and
    vLLM's process manager then starts every API server in our target."""
    import importlib

    from icv_vllm.cli import serve
    from icv_vllm.server import api_servers, vllm_hooks

    manager = vllm_hooks.API_SERVER_MANAGER.get()
    monkeypatch.setattr(manager, "__init__", manager.__init__)  # restored after the test
    for name in ("ICV_VLLM_DIR", "VLLM_PLUGINS", serve.AOT_COMPILE_ENV, serve.RAY_PREFIXES_ENV):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    seen = {}
    module = importlib.import_module(vllm_hooks.RUN_MULTI_API_SERVER.module)
    monkeypatch.setattr(module, vllm_hooks.RUN_MULTI_API_SERVER.attribute,
                        lambda args: seen.setdefault("count", args.api_server_count))
    monkeypatch.setattr("icv_vllm.plugin.register", lambda: None)
    assert serve.main(["some-model", "--icv-dir", str(tmp_path), "--api-server-count", "2"]) == 0
    assert seen["count"] == 2
    # what vLLM's APIServerProcessManager now passes to each spawned process
    captured = {}

    def original_init(self, listen_address, sock, args, num_servers, input_listeners, output_listeners,
                      target_server_fn=None, **kwargs):
        captured["target"] = target_server_fn

    assert getattr(manager.__init__, "__icv_wrapped__", False)
    monkeypatch.setattr(manager, "__init__", original_init)
    vllm_hooks.patch_api_server_processes(api_servers.api_server_process)
    manager.__init__(object(), "addr", None, None, 2, [], [])
    assert captured["target"] is api_servers.api_server_process
    # a target of vLLM's own: refused loudly, not silently replaced
    with pytest.raises(vllm_hooks.VLLMServerHookError, match="ICV routes"):
        manager.__init__(object(), "addr", None, None, 2, [], [], target_server_fn=print)


def test_directory_write_lock_serialises_saves(tmp_path):
    """Many writers of one name without overwrite (as from several API server
    processes, each with its own asyncio lock): exactly one is stored, the
    others get the 409."""
    import torch

    from icv_vllm.server.errors import ICVHTTPError
    from icv_vllm.server.store import LOCK_FILE, VectorStore

    writers = 8
    barrier = threading.Barrier(writers)
    results = []

    def save(i):
        vector = ICVector(torch.full((2, 4), float(i)), model="m", method="mean", num_pairs=1)
        store = VectorStore(tmp_path)  # one store each: no shared Python lock
        barrier.wait()
        try:
            store.save("same", vector, overwrite=False)
            results.append(("saved", i))
        except ICVHTTPError as e:
            results.append((e.status, i))

    threads = [threading.Thread(target=save, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    saved = [i for r, i in results if r == "saved"]
    assert len(saved) == 1 and sorted(r for r, _ in results if r != "saved") == [409] * (writers - 1)
    assert float(ICVector.load(tmp_path / "same.safetensors").tensor[0, 0]) == float(saved[0])
    assert VectorStore(tmp_path).names() == ["same"]  # the lock file is not a vector
    assert (tmp_path / LOCK_FILE).exists()


def test_directory_write_lock_is_held_across_processes(tmp_path):
    import subprocess
    import sys

    from icv_vllm.server.store import LOCK_FILE, directory_write_lock

    probe = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR)\n"
             "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); print('free')\n"
             "except BlockingIOError:\n    print('held')\n")
    with directory_write_lock(tmp_path):
        held = subprocess.run([sys.executable, "-c", probe, str(tmp_path / LOCK_FILE)],
                              capture_output=True, text=True, timeout=60)
    free = subprocess.run([sys.executable, "-c", probe, str(tmp_path / LOCK_FILE)],
                          capture_output=True, text=True, timeout=60)
    assert (held.stdout.strip(), free.stdout.strip()) == ("held", "free"), (held.stderr, free.stderr)


# -- one live server: two API server processes, two engine cores ---------------------------

@pytest.fixture(scope="module")
def scaled_server(tiny_llama_dir, tmp_path_factory):
    import os
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("icv-scale-out")
    vector_dir = root / "vectors"
    vector_dir.mkdir()
    config = json.loads((Path(tiny_llama_dir) / "config.json").read_text())
    write_random_vector(vector_dir / "polite.safetensors", config["num_hidden_layers"], config["hidden_size"],
                        1, str(tiny_llama_dir))
    prom_dir = root / "prometheus"
    prom_dir.mkdir()
    log_path = root / "server.log"
    port = _free_port()
    env = dict(
        os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_NO_USAGE_STATS="1", VLLM_DISABLE_COMPILE_CACHE="1",
        HF_HUB_OFFLINE="1", ICV_VLLM_ALLOW_RUNTIME_UPDATES="1",
        VLLM_CPU_OMP_THREADS_BIND="0|1",  # one core per engine core
        PROMETHEUS_MULTIPROC_DIR=str(prom_dir),  # a fresh folder: per-process files the test can read
    )
    env.pop("ICV_VLLM_DIR", None)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    cmd = [
        sys.executable, "-c", "import sys; from icv_vllm.cli import main; sys.exit(main())",
        "serve", str(tiny_llama_dir), "--icv-dir", str(vector_dir),
        "--host", "127.0.0.1", "--port", str(port), "--api-key", API_KEY,
        "--enforce-eager", "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--seed", "0",
        "--api-server-count", "2", "--data-parallel-size", "2",
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", str(tiny_llama_dir), vector_dir, log_path, Path(tiny_llama_dir))
    try:
        wait_healthy(proc, server)
        yield server, prom_dir
    finally:
        stop(proc)


def _reference(tiny_llama_dir, vector_dir, prompt_ids):
    from ..plugin.hf_reference import HFReference

    reference = HFReference(str(tiny_llama_dir))
    tensor = ICVector.load(vector_dir / "polite.safetensors").tensor
    return (reference.greedy(prompt_ids, [(tensor, SCALE)], MAX_TOKENS),
            reference.greedy(prompt_ids, [], MAX_TOKENS))


def _complete(server: Server, prompt_ids, icv=None) -> requests.Response:
    body = {"model": server.model, "prompt": prompt_ids, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    if icv is not None:
        body["icv"] = icv
    return server.post("/v1/completions", body)


def _per_process(prom_dir: Path, metric: str) -> dict[str, float]:
    """{file's pid: value} of a counter, from vLLM's multiprocess files."""
    from prometheus_client.mmap_dict import MmapedDict

    out: dict[str, float] = {}
    for path in prom_dir.glob("counter_*.db"):
        d = MmapedDict(str(path), read_mode=True)
        try:
            total = sum(v for k, v, _ in d.read_all_values() if json.loads(k)[1] == metric)
        finally:
            d.close()
        if total:
            out[path.stem.removeprefix("counter_")] = total
    return out


def _engine_tokens(server: Server) -> dict[str, float]:
    text = server.get("/metrics").text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("icv_vllm_steered_tokens_total{"):
            engine = line.split('engine="')[1].split('"')[0]
            out[engine] = out.get(engine, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def test_every_process_serves_steering_like_solo(scaled_server, tiny_llama_dir):
    from transformers import AutoTokenizer

    server, prom_dir = scaled_server
    prompt_ids = AutoTokenizer.from_pretrained(tiny_llama_dir)(PROMPT)["input_ids"]
    steered, plain = _reference(tiny_llama_dir, server.vector_dir, prompt_ids)
    assert steered != plain  # the vector changes the greedy output

    with ThreadPoolExecutor(CONCURRENT) as pool:  # a new connection each: spread over both API servers
        responses = list(pool.map(lambda i: _complete(server, prompt_ids, f"polite:{SCALE}" if i % 4 else None),
                                  range(CONCURRENT)))
    for i, r in enumerate(responses):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == (steered if i % 4 else plain), i

    processes = _per_process(prom_dir, "icv_vllm_steered_requests_total")
    assert len(processes) == 2 and sum(processes.values()) == CONCURRENT - CONCURRENT // 4, processes
    engines = _engine_tokens(server)
    assert set(engines) == {"0", "1"} and all(v > 0 for v in engines.values()), engines


def test_bad_selections_are_400_in_every_process(scaled_server):
    server, prom_dir = scaled_server
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda s: _complete(server, [1, 2, 3], s), ["nosuch:1", "polite:nan"] * 6))
    for r in responses:
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "icv"
    assert len(_per_process(prom_dir, "icv_vllm_admission_refusals_total")) == 2


def test_management_routes_in_every_process(scaled_server, tiny_llama_dir):
    server, prom_dir = scaled_server
    config = json.loads((Path(tiny_llama_dir) / "config.json").read_text())
    for _ in range(8):
        r = server.get("/v1/icv")
        assert r.status_code == 200 and [v["name"] for v in r.json()["data"]] == ["polite"], r.text
        assert requests.get(server.url + "/v1/icv", timeout=30).status_code == 401  # --api-key covers it
    # deleting a file written meanwhile: the next listing, from either process, no longer has it
    write_random_vector(server.vector_dir / "extra.safetensors", config["num_hidden_layers"],
                        config["hidden_size"], 2, str(tiny_llama_dir))
    assert server.delete("/v1/icv/extra").json() == {"object": "icv", "name": "extra", "deleted": True}
    for _ in range(4):
        assert [v["name"] for v in server.get("/v1/icv").json()["data"]] == ["polite"]
        assert server.delete("/v1/icv/extra").status_code == 404


def test_capture_routes_work_under_data_parallelism(scaled_server, tiny_llama_dir):
    """In-server extraction and tuning record residual streams; with two
    engine cores every capture goes to the first one (whose answer vLLM's
    collective RPC returns). Through either API server process, the vector
    equals offline extraction, and a tune sweep answers."""
    import torch

    from icv_vllm.vectors.extraction import extract_icv

    server, _ = scaled_server
    offline = extract_icv(str(tiny_llama_dir), [(p["input"], p["target"]) for p in PAIRS], progress=False)
    scale = float(offline.tensor.abs().max())
    try:
        for k in range(4):  # several requests: both API server processes serve some
            r = server.post("/v1/icv", {"name": f"made-{k}", "pairs": PAIRS})
            assert r.status_code == 200, r.text
            served = ICVector.load(server.vector_dir / f"made-{k}.safetensors")
            # vLLM's CPU kernels and transformers' differ in summation order only
            torch.testing.assert_close(served.tensor, offline.tensor, rtol=0, atol=1e-5 * scale)
        for _ in range(2):
            r = server.post("/v1/icv/made-0/tune", {"prompts": ["hello there", "the cat sat on"], "max_tokens": 4,
                                                    "scales": [0.5, 2.0], "dry_run": True})
            assert r.status_code == 200, r.text
            answer = r.json()
            assert answer["stored"] is False and all(p["effect"] is not None for p in answer["points"]), answer
    finally:
        for k in range(4):
            (server.vector_dir / f"made-{k}.safetensors").unlink(missing_ok=True)


@pytest.mark.parametrize("before, after", [
    (None, "ICV_VLLM_"),
    ("LMCACHE_", "LMCACHE_,ICV_VLLM_"),
    ("ICV_VLLM_,X_", "ICV_VLLM_,X_"),
])
def test_ray_actors_get_the_icv_settings(before, after):
    from icv_vllm.cli import serve

    environ = {} if before is None else {serve.RAY_PREFIXES_ENV: before}
    serve._copy_to_ray_actors(environ)
    assert environ[serve.RAY_PREFIXES_ENV] == after
