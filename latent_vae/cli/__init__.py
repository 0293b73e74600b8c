"""``latent-vae``: one command, one subcommand per module in this package.

Each subcommand module defines ``HELP`` (one line), ``DESCRIPTION`` (the --help text),
``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import pkgutil
import re
import sys
from typing import List, Optional

from ..errors import USER_ERRORS


def add_tiling_arguments(group, what: str) -> None:
    """--tiled, --tile-size, --tile-overlap, as ``latent_vae.models.tiling.configure_tiling`` takes them."""
    group.add_argument("--tiled", action="store_true",
                       help=f"diffusers' tiled {what} (AutoencoderKL only): large images in bounded memory")
    group.add_argument("--tile-size", type=int,
                       help="tile size in pixels, a multiple of the downsampling factor (default: 512)")
    group.add_argument("--tile-overlap", type=float, default=0.25,
                       help="overlap of neighbouring tiles, fraction of a tile (default: 0.25)")


class SuggestingParser(argparse.ArgumentParser):
    """argparse that names the nearest flag, subcommand or choice when one is mistyped (difflib)."""

    def parse_known_args(self, args=None, namespace=None):
        parsed, extras = super().parse_known_args(args, namespace)
        if extras and self.prog == "latent-vae":
            # Unknown flags of a subcommand surface here, at the top level: suggest from that subcommand's own.
            command = getattr(parsed, "command", None)
            sub = self._subcommand_parser(command) or self
            unknown = [e for e in extras if e.startswith("-")]
            if unknown:
                sub.error(f"unrecognized arguments: {' '.join(extras)}" + sub._flag_hint(unknown))
        return parsed, extras

    def _subcommand_parser(self, command: Optional[str]) -> Optional[argparse.ArgumentParser]:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and command in action.choices:
                return action.choices[command]
        return None

    def _flag_hint(self, unknown: List[str]) -> str:
        flags = [flag for flag in self._option_string_actions if flag.startswith("--")]
        hints = []
        for token in (t.split("=", 1)[0] for t in unknown):
            close = difflib.get_close_matches(token, flags, n=1, cutoff=0.6)
            if close:
                hints.append(close[0] if len(unknown) == 1 else f"{close[0]} (for {token})")
        return f"; did you mean {', '.join(hints)}?" if hints else ""

    def error(self, message: str):
        choice = re.search(r"invalid choice: '?([^' ]+)'? \(choose from (.*)\)", message)
        if choice:
            options = [c.strip(" '") for c in choice.group(2).split(",")]
            close = difflib.get_close_matches(choice.group(1), options, n=1, cutoff=0.5)
            if close:
                message += f"; did you mean '{close[0]}'?"
        super().error(message)


# The order of `latent-vae --help`: the workflow first; any other command follows alphabetically.
ORDER = ("train", "distill", "encode", "stats", "decode", "eval", "compare", "probe", "export", "import", "interpolate",
         "sample", "visualize", "score")


def _subcommands():
    names = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    commands = {name.rstrip("_").replace("_", "-"): name for name in names}
    for command in sorted(commands, key=lambda c: (ORDER.index(c) if c in ORDER else len(ORDER), c)):
        yield command, importlib.import_module(f"{__name__}.{commands[command]}")


def build_parser() -> argparse.ArgumentParser:
    parser = SuggestingParser(
        prog="latent-vae",
        description="Train KL, VQ and tiny (TAESD-style) image tokenizers for latent diffusion and use them as stock "
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
    except USER_ERRORS as err:
        if os.environ.get("LATENT_VAE_DEBUG"):
            raise
        print(f"latent-vae {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"latent-vae {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if "torch.distributed" in sys.modules:  # the command ran collectives: leave the group cleanly
            from ..distributed import release_process_group

            release_process_group()
