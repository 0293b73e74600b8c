"""``latent-vae``: one command, one subcommand per module in this package.

Each subcommand module defines ``HELP`` (one line), ``DESCRIPTION`` (the --help text),
``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from typing import List, Optional


def user_errors() -> tuple:
    """Errors a user can fix: reported in one line, without a traceback (LATENT_VAE_DEBUG=1 shows it).

    Imported lazily so that ``--help`` stays fast.
    """
    from ..checkpoint import CheckpointError
    from ..config import ConfigError
    from ..data import DataError
    from ..images import ImageReadError
    from ..losses.perceptual import PerceptualWeightsUnavailable

    return (ConfigError, DataError, PerceptualWeightsUnavailable, CheckpointError, ImageReadError,
            FileNotFoundError, PermissionError, NotADirectoryError)


def _subcommands():
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            yield info.name.rstrip("_").replace("_", "-"), importlib.import_module(f"{__name__}.{info.name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latent-vae",
        description="Train KL and VQ image tokenizers for latent diffusion and use them as stock "
                    "diffusers AutoencoderKL / VQModel. Run `latent-vae <command> --help` for details.",
        epilog="Multi-GPU: accelerate launch -m latent_vae <command> ...",
    )
    commands = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, module in _subcommands():
        sub = commands.add_parser(name, help=module.HELP, description=module.DESCRIPTION,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(handler=module.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except user_errors() as err:
        if os.environ.get("LATENT_VAE_DEBUG"):
            raise
        print(f"latent-vae {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"latent-vae {args.command}: interrupted", file=sys.stderr)
        return 130
