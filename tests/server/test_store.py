"""The management API's view of the vector directory, without an engine:
special files (FIFO, directory, oversize) never hang or break a listing,
links are saved over and deleted as links, and ``POST /v1/icv`` refuses bad
names and oversize demonstrations before any tokenizing."""

from __future__ import annotations

import os
import threading
import time
from argparse import Namespace
from types import SimpleNamespace

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from icv_vllm.server.errors import ICVHTTPError
from icv_vllm.server.store import VectorStore
from icv_vllm.vectors.vector import ICVector

LAYERS, HIDDEN = 3, 8


def _vector(seed: int, layers: int = LAYERS, hidden: int = HIDDEN) -> ICVector:
    g = torch.Generator().manual_seed(seed)
    return ICVector(torch.randn(layers, hidden, generator=g), model="m", method="mean", num_pairs=1)


def _fake_vllm_config(directory, pin_dir):
    """What ``Admission`` reads of vLLM's config, for a Llama of LAYERS x HIDDEN."""
    text = SimpleNamespace(num_hidden_layers=LAYERS, hidden_size=HIDDEN)
    model = SimpleNamespace(hf_text_config=text, architectures=["LlamaForCausalLM"], model="m")
    return SimpleNamespace(model_config=model, device_config=SimpleNamespace(device_type="cpu"),
                           additional_config={"icv_vllm": {"dir": str(directory), "pin_dir": str(pin_dir)}})


@pytest.fixture
def directory(tmp_path):
    d = tmp_path / "vectors"
    d.mkdir()
    _vector(1).save(d / "good.safetensors")
    _vector(2, layers=LAYERS + 1).save(d / "shape.safetensors")
    os.mkfifo(d / "fifo.safetensors")
    (d / "adir.safetensors").mkdir()
    with open(d / "huge.safetensors", "wb") as f:
        f.truncate(1 << 30)  # sparse: 1 GiB by its size, nothing on disk
    (d / "junk.safetensors").write_bytes(b"not a safetensors file")
    os.symlink("good.safetensors", d / "link.safetensors")
    os.symlink("gone.safetensors", d / "dangling.safetensors")
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    os.symlink("../outside.safetensors", d / "escape.safetensors")
    return d


@pytest.fixture
def client(directory, tmp_path, monkeypatch):
    from icv_vllm.server.app import install

    monkeypatch.setenv("ICV_VLLM_ALLOW_RUNTIME_UPDATES", "1")
    app = FastAPI()
    install(app, Namespace(additional_config={"icv_vllm": {"dir": str(directory)}}))
    app.state.vllm_config = _fake_vllm_config(directory, tmp_path / "pinned")
    return TestClient(app)


def _within(seconds: float, fn):
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it blocks."""
    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault("value", fn()), daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"blocked for more than {seconds}s"
    return out["value"], time.monotonic() - start


def test_listing_survives_special_files(client):
    r, elapsed = _within(10, lambda: client.get("/v1/icv"))
    assert r.status_code == 200, r.text
    listed = {v["name"]: v for v in r.json()["data"]}
    assert listed["good"]["usable"] is True and listed["good"]["num_layers"] == LAYERS
    assert listed["link"]["usable"] is True and listed["link"]["digest"] == listed["good"]["digest"]
    expected = {"fifo": "is a FIFO", "adir": "is a directory", "huge": "is 1073741824 bytes",
                "junk": "not a readable safetensors file", "shape": "4 layers x 8 hidden size",
                "dangling": "does not exist", "escape": "outside the vector directory"}
    for name, words in expected.items():
        assert listed[name]["usable"] is False and words in listed[name]["error"], listed[name]
    assert all(str(client.app.state.icv_server.directory) not in v.get("error", "") for v in listed.values())
    assert elapsed < 5


def test_delete_removes_a_link_not_its_target(client, directory):
    r = client.delete("/v1/icv/link")
    assert r.status_code == 200, r.text
    assert not os.path.lexists(directory / "link.safetensors")
    assert (directory / "good.safetensors").is_file()
    r = client.delete("/v1/icv/dangling")
    assert r.status_code == 200 and not os.path.lexists(directory / "dangling.safetensors")
    r = client.delete("/v1/icv/escape")  # the link goes, the file it pointed at stays
    assert r.status_code == 200 and (directory.parent / "outside.safetensors").exists()


def test_delete_special_files(client, directory):
    r = client.delete("/v1/icv/adir")
    assert r.status_code == 409 and "is a directory" in r.json()["error"]["message"]
    assert (directory / "adir.safetensors").is_dir()
    assert _within(10, lambda: client.delete("/v1/icv/fifo"))[0].status_code == 200
    assert not os.path.lexists(directory / "fifo.safetensors")


def test_save_replaces_a_link_not_its_target(directory):
    store = VectorStore(directory)
    before = (directory / "good.safetensors").read_bytes()
    with pytest.raises(ICVHTTPError) as info:
        store.save("link", _vector(3), overwrite=False)
    assert info.value.status == 409
    store.save("link", _vector(3), overwrite=True)
    assert not (directory / "link.safetensors").is_symlink()
    assert (directory / "good.safetensors").read_bytes() == before
    store.save("escape", _vector(4), overwrite=True)
    assert (directory.parent / "outside.safetensors").read_bytes() == b"x"
    with pytest.raises(ICVHTTPError) as info:
        store.save("adir", _vector(5), overwrite=True)
    assert info.value.status == 409 and "is a directory" in info.value.message


@pytest.mark.parametrize("body, status, param, words", [
    ({"name": "a\n", "pairs": [{"input": "a", "target": "b"}]}, 400, "name", "invalid vector name"),
    ({"name": "x\n\n", "pairs": [{"input": "a", "target": "b"}]}, 400, "name", "invalid vector name"),
    ({"name": "x", "pairs": [{"input": "a " * 9000, "target": "b"}]}, 400, "pairs",
     "pairs[0].input is 18000 characters; at most 16384"),
    ({"name": "x", "pairs": [{"input": "a " * 4000, "target": "b " * 4000}] * 70}, 400, "pairs",
     "1120000 characters; at most 1000000"),
])
def test_create_refuses_before_tokenizing(client, directory, body, status, param, words):
    """No engine is attached: reaching tokenization would be a 500."""
    r = client.post("/v1/icv", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert not (directory / "x.safetensors").exists()


def test_create_refuses_oversize_bodies(client):
    r = client.post("/v1/icv", content=b"[" + b" " * (9 << 20) + b"]",
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    r = client.post("/v1/icv", content=b"[" * 100_000, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


# -- llama.cpp control vectors (name.gguf) -----------------------------------------------------

def _cvec(path, layers=(1, 2)):
    from ..gguf_files import layer_numbered

    return layer_numbered(path, layers, HIDDEN)


@pytest.fixture
def gguf_store(directory):
    _cvec(directory / "happy.gguf")
    _cvec(directory / "good.gguf")  # next to good.safetensors: ambiguous
    (directory / "broken.gguf").write_bytes(b"GGUF")
    os.mkfifo(directory / "pipe.gguf")
    return VectorStore(directory)


def test_gguf_vectors_are_listed_with_their_mode(gguf_store, directory):
    listed, _ = _within(10, lambda: {v["name"]: v for v in gguf_store.list()})
    happy = listed["happy"]
    assert happy["usable"] is True, happy
    assert (happy["format"], happy["mode"], happy["method"], happy["num_pairs"], happy["model"]) == (
        "gguf", "add", "gguf", None, "llama")
    assert (happy["num_layers"], happy["hidden_size"]) == (3, HIDDEN)  # highest direction + 1
    import hashlib
    assert happy["digest"] == hashlib.sha256((directory / "happy.gguf").read_bytes()).hexdigest()[:16]
    assert (listed["link"]["format"], listed["link"]["mode"]) == ("safetensors", "icv")
    assert listed["good"]["usable"] is False and "both good.safetensors and good.gguf" in listed["good"]["error"]
    assert listed["broken"]["usable"] is False and "not a GGUF file" in listed["broken"]["error"]
    assert listed["pipe"]["usable"] is False and "is a FIFO" in listed["pipe"]["error"]
    assert all(str(directory) not in v.get("error", "") for v in listed.values())


def test_gguf_delete_and_save(gguf_store, directory):
    assert gguf_store.exists("happy")
    with pytest.raises(ICVHTTPError) as info:  # saving over a .gguf would leave two files under one name
        gguf_store.save("happy", _vector(7), overwrite=True)
    assert info.value.status == 409 and "happy.gguf" in info.value.message
    assert not (directory / "happy.safetensors").exists()
    assert gguf_store.is_gguf("happy") and "delete it first" in gguf_store.conflict("happy").message
    assert gguf_store.delete("happy") == {"object": "icv", "name": "happy", "deleted": True}
    assert not (directory / "happy.gguf").exists() and not gguf_store.exists("happy")
    with pytest.raises(ICVHTTPError) as info:
        gguf_store.info("happy")
    assert info.value.status == 404
    with pytest.raises(ICVHTTPError) as info:  # both files: DELETE does not guess which one is meant
        gguf_store.delete("good")
    assert info.value.status == 409 and "both good.safetensors and good.gguf" in info.value.message
    assert (directory / "good.gguf").exists() and (directory / "good.safetensors").exists()
    assert _within(10, lambda: gguf_store.delete("pipe"))[0]["deleted"] is True
    (directory / "adir.gguf").mkdir()
    (directory / "adir.safetensors").rmdir()
    with pytest.raises(ICVHTTPError) as info:
        gguf_store.delete("adir")
    assert info.value.status == 409 and "adir.gguf in the vector directory is a directory" in info.value.message
