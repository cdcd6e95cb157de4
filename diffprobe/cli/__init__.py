"""The `diffprobe` command: parses arguments into the library's objects and calls it; no logic of its own.

One module per stage registers its subcommands: features (blocks, presets, extract, store),
probing (probe, predict), studies (sweep, transfer, cka, baseline, demo), generate (pretrain,
sample, fid, export, card).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from .._io import describe_os_error
from ..errors import DiffprobeError
from ..generate import Stopped
from . import features, generate, probing, studies


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffprobe", description="Diffusion models as image classifiers: extract and probe block features.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for stage in (features, probing, studies, generate):
        stage.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="diffprobe: %(message)s")
    try:
        args.func(args)
    except DiffprobeError as e:
        print(f"diffprobe: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `diffprobe blocks … | head`: the reader has what it wanted
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes stdout
        return 0
    except OSError as e:  # a file system error no library check foresaw: still one line, never a traceback
        print(f"diffprobe: error: {describe_os_error(e.filename or '?', e, 'read or write')}", file=sys.stderr)
        return 2
    except Stopped as e:  # a signal asked a long run to stop; its state is saved
        print(f"diffprobe: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("diffprobe: interrupted; finished work is kept, rerun the same command to resume", file=sys.stderr)
        return 130
    return 0
