"""Cold vs warm start time of the demo server (``icv-vllm serve``, compiled).

For each mode, a fresh temporary cache (VLLM_CACHE_ROOT and
TORCHINDUCTOR_CACHE_DIR both inside it) is used by --starts servers in turn:
the first start is cold, the others are warm restarts. Each start is timed
from process start to /health 200 and to the first completion; the server is
then stopped (SIGTERM, then SIGKILL of its process group after 60 s).

Modes: ``default`` leaves VLLM_USE_AOT_COMPILE unset, so ``icv-vllm serve``
sets it to 0 on the CPU; ``aot`` sets VLLM_USE_AOT_COMPILE=1 (vLLM's own
default with torch >= 2.10).

    .venv/bin/python benchmarks/restart_time.py                       # both modes, 3 starts each
    .venv/bin/python benchmarks/restart_time.py --modes default --starts 2
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
AOT_RELOAD_FAILED = "Compiling model again due to a load failure"
ENGINE_INIT = re.compile(r"init engine \(profile, create kv cache, warmup model\) took ([0-9.]+) s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the server leads its own group
        proc.wait()


def one_start(args, env: dict, log: Path) -> dict:
    port = free_port()
    cmd = [str(ROOT / ".venv/bin/icv-vllm"), "serve", args.model, "--icv-dir", args.icv_dir,
           "--served-model-name", "SmolLM2-135M-Instruct", "--host", "127.0.0.1",
           "--port", str(port), "--max-model-len", "2048"]
    url = f"http://127.0.0.1:{port}"
    load = os.getloadavg()[0]
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=ROOT)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited ({proc.returncode}); see {log}")
            if time.monotonic() - start > args.timeout:
                raise RuntimeError(f"no /health 200 within {args.timeout} s; see {log}")
            try:
                if requests.get(url + "/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.25)
        health = time.monotonic() - start
        reply = requests.post(url + "/v1/completions", timeout=300, json={
            "model": "SmolLM2-135M-Instruct", "prompt": "Hello, my name is", "max_tokens": 8, "temperature": 0,
            "icv": "polite:0.02"})
        reply.raise_for_status()
        first = time.monotonic() - start
    finally:
        stop(proc)
    text = log.read_text(errors="replace")
    init = ENGINE_INIT.search(text)
    return {"health_s": health, "first_completion_s": first,
            "engine_init_s": float(init[1]) if init else None, "load": load,
            "text": reply.json()["choices"][0]["text"], "aot_reload_failed": AOT_RELOAD_FAILED in text}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=".cache/models/SmolLM2-135M-Instruct")
    p.add_argument("--icv-dir", default=".cache/icv")
    p.add_argument("--modes", nargs="+", default=["default", "aot"], choices=["default", "aot"])
    p.add_argument("--starts", type=int, default=3, help="starts per mode (first one is cold)")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--logs", default=None, help="keep server logs in this folder")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the server
    logs = Path(args.logs or tempfile.mkdtemp(prefix="restart_logs_"))
    logs.mkdir(parents=True, exist_ok=True)
    rows = []
    for mode in args.modes:
        with tempfile.TemporaryDirectory(prefix=f"restart_{mode}_") as cache:
            env = dict(os.environ, VLLM_CACHE_ROOT=f"{cache}/vllm",
                       TORCHINDUCTOR_CACHE_DIR=f"{cache}/inductor", HF_HUB_OFFLINE="1",
                       VLLM_NO_USAGE_STATS="1",
                       VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"))
            env.pop("VLLM_USE_AOT_COMPILE", None)
            if mode == "aot":
                env["VLLM_USE_AOT_COMPILE"] = "1"
            for i in range(args.starts):
                kind = "cold" if i == 0 else "warm"
                r = one_start(args, env, logs / f"{mode}_{i}.log")
                rows.append((mode, kind, r))
                print(f"{mode:8s} {kind}: /health {r['health_s']:6.1f} s, first completion "
                      f"{r['first_completion_s']:6.1f} s, engine init (vLLM's log) {r['engine_init_s']} s, AOT reload failed: {r['aot_reload_failed']}, "
                      f"load average {r['load']:.1f}", flush=True)
    print("\n| mode | start | /health 200 (s) | first completion (s) | engine init incl. compile (s) "
          "| load average |\n|---|---|---|---|---|---|")
    for mode, kind, r in rows:
        label = "VLLM_USE_AOT_COMPILE=0 (serve default)" if mode == "default" else "VLLM_USE_AOT_COMPILE=1"
        print(f"| {label} | {kind} | {r['health_s']:.1f} | {r['first_completion_s']:.1f} | {r['engine_init_s']} | {r['load']:.1f} |")
    texts = {r["text"] for _, _, r in rows}
    print(f"\ngreedy completions identical across all starts: {len(texts) == 1} {sorted(texts)!r}")
    print(f"server logs: {logs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
