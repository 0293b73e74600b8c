"""Command-line options and steps shared by ``interpolate``, ``sample``, ``visualize`` and ``score``.

No heavy imports at module level: the CLI imports this module to build ``--help``, which must stay fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from ..errors import ConfigError, check_positive


def check_output_files(*paths: Optional[Path]) -> None:
    """Each output file can be written, checked before a long job runs rather than after it: the
    path is not a folder, and its folder exists (or can be made) and takes a new file."""
    import tempfile

    for path in paths:
        if path is None:
            continue
        if path.is_dir():
            raise ConfigError(f"{path} is a folder: give a file path to write to")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.probe-"):
                pass
        except OSError as err:
            raise ConfigError(f"cannot write {path} ({err.strerror or err}): choose a writable path") from None


def positive_int(text: str) -> int:
    """argparse type: an integer > 0 (``errors.check_positive``), reported by argparse as a usage error."""
    value = int(text)
    try:
        check_positive("value", value)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def add_common_arguments(parser: argparse.ArgumentParser, images_help: str, images_required: bool = True,
                         resolution: int = 256) -> None:
    parser.add_argument("images", nargs="+" if images_required else "*", metavar="IMAGES",
                        help=images_help + " (image folders, searched recursively, image files, "
                        "or saved datasets; in the order given)")
    parser.add_argument("--model", required=True,
                        help="diffusers AutoencoderKL / VQModel / AutoencoderTiny folder (e.g. runs/quickstart/model) "
                             "or hub id")
    parser.add_argument("--subfolder", help="model subfolder, e.g. vae for a full pipeline repository")
    parser.add_argument("--resolution", type=positive_int, default=resolution,
                        help=f"images are resized (shorter side) and centre-cropped to this square size "
                        f"(default {resolution}; a multiple of the model's downsampling factor)")
    parser.add_argument("--device", help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--output-dir", type=Path, required=True, help="folder the files are written to")


def load_model_from_args(args: argparse.Namespace):
    """The autoencoder named by ``--model`` / ``--subfolder``, fp32, eval mode, on ``--device``."""
    from ..latent_tools.common import load_model, resolve_device

    return load_model(args.model, resolve_device(args.device), args.subfolder)


def print_unreadable(failures: Sequence, csv_path: Path) -> None:
    """One line naming the first unreadable inputs and the CSV listing all of them with reasons."""
    if failures:
        shown = ", ".join(f.key for f in failures[:5]) + (" ..." if len(failures) > 5 else "")
        print(f"unreadable inputs skipped: {len(failures)} (reasons in {csv_path}): {shown}")
