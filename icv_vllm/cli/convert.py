"""``icv-vllm convert IN OUT``: llama.cpp / repeng GGUF control vector <-> vector file.

The direction comes from the suffixes: ``.gguf`` -> ``.safetensors`` imports a
control vector (method ``gguf``, ``add`` mode by default, zero rows for the
layers it does not steer); ``.safetensors`` -> ``.gguf`` exports one in
llama.cpp's layout (``direction.N`` = decoder layer ``N``; llama.cpp cannot
hold layer 0, so a nonzero row 0 needs ``--drop-layer-0``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .extract import positive_int

GGUF, SAFETENSORS = ".gguf", ".safetensors"


def add_parser(commands) -> None:
    p = commands.add_parser(
        "convert",
        help="convert between llama.cpp/repeng GGUF control vectors and icv-vllm vector files",
        description=(
            "Convert a llama.cpp or repeng GGUF control vector (.gguf) to an icv-vllm vector file "
            "(.safetensors), or back; the direction comes from the suffixes. direction.N of the GGUF "
            "is row N (decoder layer N, 0-based); an imported vector is served in 'add' mode by "
            "default, as llama.cpp applies it (h += scale * v after each steered layer)."
        ),
    )
    p.add_argument("input", metavar="IN", help="the file to convert (.gguf or .safetensors)")
    p.add_argument("output", metavar="OUT", help="the file to write (.safetensors or .gguf)")
    p.add_argument("--num-layers", type=positive_int, default=None,
                   help="gguf -> safetensors: the model's decoder layers (rows of the vector; default: the "
                        "highest direction + 1; the server pads to the served model's layers either way)")
    p.add_argument("--model-hint", default=None,
                   help="safetensors -> gguf: controlvector.model_hint (llama.cpp does not read it; default: "
                        "the hint of an imported vector, else the vector's model)")
    p.add_argument("--drop-layer-0", action="store_true",
                   help="safetensors -> gguf: write a vector whose layer-0 row is nonzero without that row "
                        "(llama.cpp's layout cannot hold layer 0; without this flag it is an error)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.set_defaults(run=run)


def _error(message: str) -> int:
    print(f"icv-vllm convert: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from ..vectors.file_format import ICVFileError
    from ..vectors.gguf_format import LayerZeroError, gguf_to_safetensors, safetensors_to_gguf

    src, dst = Path(args.input), Path(args.output)
    kinds = (src.suffix.lower(), dst.suffix.lower())
    if kinds not in ((GGUF, SAFETENSORS), (SAFETENSORS, GGUF)):
        return _error(f"cannot tell what to convert: IN and OUT must be one .gguf and one .safetensors "
                      f"file (got {src.name!r} -> {dst.name!r})")
    if not src.is_file():
        return _error(f"{src}: {'no such file' if not os.path.lexists(src) else 'not a regular file'}")
    if os.path.lexists(dst) and not args.force:
        return _error(f"{dst} exists; pass --force to overwrite it")
    try:
        if dst.resolve() == src.resolve():
            return _error("IN and OUT are the same file")
    except OSError:
        pass
    if kinds[0] == GGUF:
        if args.model_hint is not None or args.drop_layer_0:
            return _error("--model-hint and --drop-layer-0 apply to safetensors -> gguf only")
        try:
            vector = gguf_to_safetensors(src, dst, num_layers=args.num_layers)
        except ICVFileError as e:
            return _error(str(e))
        if vector.ignored_keys:
            print(f"note: ignored GGUF metadata (llama.cpp ignores it too): {', '.join(vector.ignored_keys)}",
                  file=sys.stderr)
        layers = vector.layout.directions
        print(f"wrote {dst}: {vector.num_layers} layers x {vector.hidden_size}, {len(layers)} steered "
              f"(layers {_ranges(layers)}), default mode add, model hint {vector.layout.model_hint!r}")
        return 0
    if args.num_layers is not None:
        return _error("--num-layers applies to gguf -> safetensors only (a vector file has its layer count)")
    try:
        layout, header, dropped = safetensors_to_gguf(src, dst, model_hint=args.model_hint, drop_layer_0=args.drop_layer_0)
    except LayerZeroError as e:
        return _error(f"{e}: pass --drop-layer-0")
    except ICVFileError as e:
        return _error(str(e))
    if header.default_mode != "add":
        print(f"note: {src.name} is an ICV-mode vector ({header.method}); llama.cpp adds a control vector "
              f"(h += scale * v), which is icv-vllm's 'add' mode, not the ICV transform: expect other "
              f"strengths than with mode 'icv'", file=sys.stderr)
    print(f"wrote {dst}: {len(layout.directions)} directions (layers {_ranges(layout.directions)}) x "
          f"{header.hidden_size}{' (nonzero layer 0 dropped)' if dropped else ''}, model hint {layout.model_hint!r}")
    return 0


def _ranges(layers) -> str:
    """1,2,3,5 -> '1-3, 5'"""
    out, run_start, prev = [], None, None
    for x in sorted(layers):
        if run_start is None:
            run_start = prev = x
        elif x == prev + 1:
            prev = x
        else:
            out.append(f"{run_start}-{prev}" if prev != run_start else f"{run_start}")
            run_start = prev = x
    if run_start is not None:
        out.append(f"{run_start}-{prev}" if prev != run_start else f"{run_start}")
    return ", ".join(out)
