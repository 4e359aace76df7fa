"""A real ``icv-vllm serve`` on 127.0.0.1 for the whole session: tiny Llama,
``--enforce-eager``, float32 (so in-server extraction can be compared with the
offline extractor), ``--api-key`` (so the tests also see that vLLM's key
check covers our routes), runtime updates on.

The server's log goes to a file; its tail is attached to every failing test.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

API_KEY = "sk-icv-test"
STARTUP_TIMEOUT_S = 240
MAX_MODEL_LEN = 256
# Demonstrations for vectors built in the server and offline (tests compare both).
PAIRS = [
    {"input": "you are so rude and I do not like it", "target": "thank you very much for your help"},
    {"input": "shut up and listen to me", "target": "could you please stop shouting"},
    {"input": "that was a stupid idea", "target": "would you mind closing the door"},
    {"input": "the cat ignored the dog", "target": "the cat thanked the dog with care"},
]

_log_path: Path | None = None


@dataclass(frozen=True)
class Server:
    url: str  # http://127.0.0.1:PORT
    model: str
    vector_dir: Path
    log_path: Path
    model_dir: Path

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {API_KEY}"}

    def post(self, path: str, body, **kwargs) -> requests.Response:
        return requests.post(self.url + path, json=body, headers=self.headers, timeout=120, **kwargs)

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(self.url + path, headers=self.headers, timeout=60, **kwargs)

    def delete(self, path: str, **kwargs) -> requests.Response:
        return requests.delete(self.url + path, headers=self.headers, timeout=60, **kwargs)

    def openai(self):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(path: Path, lines: int = 80) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def write_random_vector(path: Path, num_layers: int, hidden_size: int, seed: int, model: str) -> None:
    import torch

    from icv_vllm.vectors.vector import ICVector

    g = torch.Generator().manual_seed(seed)
    ICVector(torch.randn(num_layers, hidden_size, generator=g), model=model, method="mean", num_pairs=1).save(path)


@pytest.fixture(scope="session")
def icv_server(tiny_llama_dir, tmp_path_factory):
    global _log_path
    import json

    root = tmp_path_factory.mktemp("icv-server")
    vector_dir = root / "vectors"
    vector_dir.mkdir()
    config = json.loads((Path(tiny_llama_dir) / "config.json").read_text())
    layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    write_random_vector(vector_dir / "polite.safetensors", layers, hidden, 1, str(tiny_llama_dir))
    write_random_vector(vector_dir / "formal.safetensors", layers, hidden, 2, str(tiny_llama_dir))
    # a vector of another model: listed, but refused by requests
    write_random_vector(vector_dir / "small.safetensors", layers + 1, hidden // 2, 3, "other-model")

    _log_path = root / "server.log"
    proc, server = launch(Path(tiny_llama_dir), vector_dir, _log_path)
    try:
        wait_healthy(proc, server)
        yield server
    finally:
        stop(proc)


def launch(model_dir: Path, vector_dir: Path, log_path: Path, extra_env: dict | None = None):
    """Start ``icv-vllm serve`` (see the module docstring); returns (process, Server)."""
    port = _free_port()
    env = dict(
        os.environ,
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        VLLM_NO_USAGE_STATS="1",
        VLLM_DISABLE_COMPILE_CACHE="1",
        HF_HUB_OFFLINE="1",
        ICV_VLLM_ALLOW_RUNTIME_UPDATES="1",
        **(extra_env or {}),
    )
    env.pop("ICV_VLLM_DIR", None)
    cmd = [
        sys.executable, "-c", "import sys; from icv_vllm.cli import main; sys.exit(main())",
        "serve", str(model_dir), "--icv-dir", str(vector_dir),
        "--host", "127.0.0.1", "--port", str(port), "--api-key", API_KEY,
        "--enforce-eager", "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN),
        "--seed", "0", "--distributed-executor-backend", "uni",  # no separate worker process: faster start
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc, Server(f"http://127.0.0.1:{port}", str(model_dir), vector_dir, log_path, model_dir)


def wait_healthy(proc: subprocess.Popen, server: Server, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            pytest.fail(f"icv-vllm serve exited with {proc.returncode}:\n{_log_tail(server.log_path)}")
        try:
            if requests.get(server.url + "/health", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"icv-vllm serve not healthy after {timeout_s}s:\n{_log_tail(server.log_path)}")
        time.sleep(0.5)


def stop(proc: subprocess.Popen, timeout_s: float = 30) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and _log_path is not None and "icv_server" in getattr(item, "fixturenames", ()):
        report.sections.append(("icv-vllm serve log (tail)", _log_tail(_log_path)))
