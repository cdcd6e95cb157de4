"""The `diffprobe` command: parses arguments into the library's objects and calls it; no logic of its own.

One module per stage registers its subcommands: features (blocks, presets, extract, store),
probing (probe, predict), studies (sweep, transfer, cka, baseline, demo), generate (pretrain,
sample, fid, export, card).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from typing import Sequence

from .. import __version__
from .._io import describe_os_error
from ..errors import DiffprobeError
from ..generate import Stopped
from . import features, generate, probing, studies


class HelpWithDefaults(argparse.HelpFormatter):
    """Help that shows each option's default, unless its text already says it or it has none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        empty = action.default is None or action.default is False or action.default == [] or action.default == argparse.SUPPRESS
        if not action.option_strings or "default" in text.lower() or empty:  # (0 is a default worth showing: not `in (False, …)`)
            return text
        return text + " (default: %(default)s)"


def _with_defaults(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = HelpWithDefaults
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _with_defaults(child)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffprobe", description="Diffusion models as image classifiers: extract and probe block features.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars and no information lines: warnings and errors only "
                        "(TQDM_DISABLE=1 in the environment hides the bars too)")  # fmt: skip
    parser.add_argument("--version", action="version", version=f"diffprobe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for stage in (features, probing, studies, generate):
        stage.register(sub)
    _with_defaults(parser)
    return parser


def _rank() -> int | None:
    """This process's rank under torchrun (None when it runs alone)."""
    import os

    return int(os.environ["RANK"]) if os.environ.get("WORLD_SIZE", "1") != "1" and "RANK" in os.environ else None


@contextlib.contextmanager
def console(quiet: bool, verbose: bool):
    """Logs and progress bars for one command: under torchrun only rank 0 draws bars and prints
    information (other ranks: warnings, prefixed with their rank); --quiet: warnings only, no bars;
    not a terminal (a log file, a pipe): a bar line every 30 s instead of a stream of redraws.
    tqdm reads TQDM_* settings once, at import, so the bars are set here, for this command only."""
    import tqdm.std

    rank = _rank()
    quiet = quiet or bool(rank)
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    prefix = f"diffprobe[rank {rank}]: " if rank is not None else "diffprobe: "
    logging.basicConfig(level=level, format=prefix + "%(message)s")  # a no-op where logging is set up already
    root = logging.getLogger()
    root_level = root.level
    root.setLevel(level)
    # huggingface_hub prints through its own handler and also passes each line up to ours: every
    # retry and error came out twice. Its own handler keeps them (diffusers and transformers do the same).
    hub_logger = logging.getLogger("huggingface_hub")
    hub_propagates, hub_logger.propagate = hub_logger.propagate, False
    original = tqdm.std.tqdm.__init__
    piped = not sys.stderr.isatty()

    def init(self, *a, **k):
        if quiet:
            k["disable"] = True
        elif piped:
            k["mininterval"] = max(k.get("mininterval", 0.1), 30.0)
            k["maxinterval"] = max(k.get("maxinterval", 10.0), 60.0)
        original(self, *a, **k)

    postfix = tqdm.std.tqdm.set_postfix

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):  # a new postfix redraws at once: not in a log file
        return postfix(self, ordered_dict, refresh=refresh and not piped, **kwargs)

    tqdm.std.tqdm.__init__, tqdm.std.tqdm.set_postfix = init, set_postfix
    try:
        yield
    finally:
        tqdm.std.tqdm.__init__, tqdm.std.tqdm.set_postfix = original, postfix
        root.setLevel(root_level)
        hub_logger.propagate = hub_propagates


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with console(args.quiet, args.verbose):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
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
