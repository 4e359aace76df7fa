"""``icv-vllm extract``: demonstration pairs (JSONL) -> vector file."""

from __future__ import annotations

import argparse
import sys


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_parser(commands) -> None:
    p = commands.add_parser(
        "extract",
        help="extract an in-context vector from demonstration pairs",
        description=(
            "Extract an ICV: for each pair, the difference of the residual streams at the last "
            "token of target and input, then mean + first principal component (method pca) or "
            "the mean (method mean). Writes a safetensors vector file."
        ),
    )
    p.add_argument("--model", required=True, help="model folder (Hugging Face format) or hub id")
    p.add_argument("--pairs", required=True, help='JSONL file, one {"input": ..., "target": ...} per line')
    p.add_argument("--out", required=True, help="vector file to write (.safetensors)")
    p.add_argument("--method", choices=("pca", "mean"), default="pca", help="default: pca, as in the paper")
    p.add_argument("--batch-size", type=positive_int, default=8, help="texts per forward pass (default 8)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument(
        "--no-clean", dest="clean", action="store_false",
        help="keep punctuation (by default it is removed, as in the authors' code)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def _error(message: str) -> int:
    print(f"icv-vllm extract: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from ..vectors.pairs import PairsError, read_pairs_jsonl

    try:
        pairs = read_pairs_jsonl(args.pairs)
    except PairsError as e:
        return _error(str(e))

    from ..vectors.extraction import extract_icv

    try:
        vector = extract_icv(
            args.model, pairs, method=args.method, batch_size=args.batch_size,
            device=args.device, progress=not args.quiet, clean=args.clean,
        )
    except PairsError as e:
        return _error(str(e))
    except OSError as e:  # model folder missing or incomplete
        return _error(f"cannot load model {args.model!r}: {str(e).splitlines()[0]}")
    vector.save(args.out)
    print(
        f"wrote {args.out}: {vector.num_layers} layers x {vector.hidden_size}, "
        f"method {vector.method}, {vector.num_pairs} pairs"
    )
    return 0
