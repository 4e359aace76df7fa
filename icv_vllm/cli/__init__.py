"""The ``icv-vllm`` command.

``icv-vllm serve ...`` hands its arguments, untouched, to
``icv_vllm.cli.serve.main`` (vLLM's own flags pass through); the other
subcommands are parsed here. Subcommand modules are imported only when used,
so ``icv-vllm extract`` never imports vLLM.
"""

from __future__ import annotations

import argparse
import sys


def _build_parser() -> argparse.ArgumentParser:
    from .. import demo_model
    from . import convert, extract, tune

    parser = argparse.ArgumentParser(
        prog="icv-vllm",
        description="In-Context Vectors (Liu et al., ICML 2024) for vLLM.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser(
        "serve", add_help=False,
        help="start the OpenAI-compatible server with ICV steering (vLLM flags pass through)",
    )
    extract.add_parser(commands)
    convert.add_parser(commands)
    tune.add_parser(commands)
    demo_model.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        from .serve import main as serve_main

        return serve_main(argv[1:])
    args = _build_parser().parse_args(argv)
    return args.run(args)
