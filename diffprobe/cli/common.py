"""Argument groups several commands share, each turned into the library's own value objects.

One name per concept across commands: --blocks, --t, --pool, --noise-seed (ε), --seed (initialisation
and shuffling), --class-label, --val-fraction/--split-seed, --device. Old spellings stay for one
release as deprecated aliases that say what to write instead.
"""

from __future__ import annotations

import argparse
import logging
import shlex
from typing import Any, Sequence

from ..errors import DiffprobeError

log = logging.getLogger("diffprobe")
SWITCH = {"auto": "auto", "on": True, "off": False}


def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def blocks_arg(text: str) -> list[int | str] | str:
    """all, or block numbers and module paths: 19,24 or 19,up_blocks.1.attentions.0."""
    if text.strip().lower() == "all":
        return "all"
    from ..features.plan import parse_taps

    try:
        return list(parse_taps(text))
    except DiffprobeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def one_tap(text: str) -> int | str:
    """One block number or module path."""
    taps = blocks_arg(text)
    if taps == "all" or len(taps) != 1:
        raise argparse.ArgumentTypeError(f"expected one block number or module path, got {text!r}")
    return taps[0]


def deprecated(p: argparse.ArgumentParser, old: str, new: str, **kwargs: Any) -> None:
    """`old` still works for one release, with a warning naming `new`."""

    class Alias(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            log.warning("%s is deprecated and will be removed: use %s", old, new)
            setattr(namespace, self.dest, values)

    p.add_argument(old, action=Alias, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs)


# ------------------------------------------------------------------ backbones
def parse_model_options(model_flags: str | None, options: Sequence[str], preset: str | None) -> dict[str, Any]:
    """`--model-flags="--image_size 64 --num_channels 192"` (guided-diffusion's own spelling)
    and `-o key=value` pairs become keyword options of load_backbone."""
    out: dict[str, Any] = {}
    if model_flags:
        words = shlex.split(model_flags)
        if len(words) % 2:
            raise DiffprobeError(f"--model-flags must be '--name value' pairs, got {model_flags!r}")
        for name, value in zip(words[::2], words[1::2]):
            if not name.startswith("--"):
                raise DiffprobeError(f"--model-flags: expected --name before {value!r}, got {name!r}")
            out[name[2:]] = value
    for item in options:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DiffprobeError(f"-o {item!r}: expected key=value")
        out[key] = value
    if preset:
        out["preset"] = preset
    return out


def add_backbone_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="adm:PATH.pt | adm:random | diffusers:FOLDER_OR_HUB_ID")
    p.add_argument("--preset", help="ADM preset (e.g. 256x256_diffusion_uncond); see `diffprobe presets`")
    p.add_argument("--model-flags", help='guided-diffusion flags as on its command line: --model-flags="--image_size 64 --num_channels 192"')
    p.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE", help="one backbone option (repeatable)")
    p.add_argument("--prompt", help="Stable Diffusion models: the prompt the U-Net reads (default: the empty prompt)")
    p.add_argument("--image-size", type=int, help="latent models: pixel size to read at (default: the pipeline's; a multiple of the VAE factor)")


# Checked before any model is built: 640000 px would first try to allocate a 640000² image
# (a traceback from torch), and 0 or -64 read as "not a multiple of 4".
def check_image_size(size: int | None) -> None:
    """The flag's range, for every family, before a backbone loads (the latent models check it again, from Python too)."""
    from ..backbones.pipeline_parts import MAX_IMAGE_SIZE

    if size is None:
        return
    if size < 1:
        raise DiffprobeError(f"--image-size {size}: expected a positive side length in pixels, e.g. 512 (or omit it for the model's own)")
    if size > MAX_IMAGE_SIZE:
        raise DiffprobeError(f"--image-size {size}: expected at most {MAX_IMAGE_SIZE} pixels a side (released models read "
                             "256 to 1024): choose a smaller size, or omit it for the model's own")  # fmt: skip


def load_backbone_from(args: argparse.Namespace):
    from ..backbones import load_backbone

    check_image_size(getattr(args, "image_size", None))
    options = parse_model_options(args.model_flags, args.option, args.preset)
    for name in ("prompt", "image_size"):  # shorthands for -o prompt=... / -o image_size=...
        if getattr(args, name, None) is not None:
            options[name] = getattr(args, name)
    return load_backbone(args.spec, **options)


# ------------------------------------------------------------------ data
def add_data_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", help="where torchvision datasets live (default: the diffprobe cache)")
    p.add_argument("--split", default="train", help="dataset split (torchvision) or sub-folder (archives); default train")
    p.add_argument("--download", action="store_true", help="let torchvision download the dataset (needs internet)")


def add_data_args(p: argparse.ArgumentParser, required: bool = True, help: str = "") -> None:
    p.add_argument("--data", required=required, help=help or "ImageFolder dir, .tar/.tar.gz of one, or torchvision:NAME")
    add_data_source_args(p)


def open_data(args: argparse.Namespace, spec: str | None = None):
    from ..data import open_dataset

    return open_dataset(spec or args.data, root=args.data_root, split=args.split, download=args.download)


def add_test_data_args(p: argparse.ArgumentParser) -> None:
    """A test set that reports instead of the held-out report rows (features/reporting.py)."""
    p.add_argument("--test-data", help="a test set no choice sees, which then reports every result: a folder, an archive, "
                   "or torchvision:NAME (its --test-split); default: the held-out report rows of --data")  # fmt: skip
    p.add_argument("--test-split", default="test", help="the test set's split (torchvision) or sub-folder; default test")
    p.add_argument("--test-limit", type=int, help="a stratified subset of this many test images (default: all)")


def test_limit_from(args: argparse.Namespace) -> int | None:
    """--test-limit, checked (a count of test images, at least 1), or None for all of them."""
    from ..validate import positive_int

    return positive_int(args.test_limit, "--test-limit") if args.test_limit is not None else None


def open_test_data(args: argparse.Namespace):
    """The --test-data set, or None."""
    from ..data import open_dataset

    if not args.test_data:
        return None
    test_limit_from(args)  # checked before the test set is opened (a torchvision download, an archive to unpack)
    return open_dataset(args.test_data, root=args.data_root, split=args.test_split, download=args.download)


# ------------------------------------------------------------------ compute
def add_compute_args(p: argparse.ArgumentParser, precisions: Sequence[str] = ("auto", "fp32", "bf16", "fp16")) -> None:
    from ..precision import COMPILE_MODES
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if a GPU is visible, else cpu), cpu, cuda, cuda:1 ...")
    p.add_argument("--precision", default="auto", choices=list(precisions), help='number format the network runs in (auto: bf16 where this CPU/GPU runs it fast, else fp32)')
    p.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"], help='memory layout for convolutions (auto: where measured faster on this machine)')
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off", *COMPILE_MODES],
                   help="torch.compile the network (auto: on for CUDA, default mode); or a mode: max-autotune times kernel "
                        "choices, reduce-overhead replays CUDA graphs (GPU)")  # fmt: skip


def compute_from(args: argparse.Namespace):
    from ..precision import choose_compute

    return choose_compute(args.device, args.precision, SWITCH[args.channels_last], SWITCH.get(args.compile, args.compile))


# ------------------------------------------------------------------ feature plan and extraction options
def add_plan_args(p: argparse.ArgumentParser, blocks_required: bool = True, seed_alias: bool = True) -> None:
    p.add_argument("--blocks", type=blocks_arg, required=blocks_required, help="comma-separated block numbers and module paths (`diffprobe blocks SPEC --all`), or all")
    p.add_argument("--t", type=int_list, help="comma-separated timesteps, e.g. 90,150 (diffusion models; image encoders "
                   "(timm:, torchvision:, hf:) read the clean image and take none)")  # fmt: skip
    p.add_argument("--pool", type=int_list, default=[1], help="pooled grid sizes p (p×p), e.g. 1,2; default 1")
    p.add_argument("--noise-seed", type=int, default=0, help="ε depends on (noise seed, image index, draw) only")
    if seed_alias:  # commands whose --seed meant the noise seed in 0.1
        deprecated(p, "--seed", "--noise-seed", dest="noise_seed", type=int)
    p.add_argument("--draws", type=int, default=1, help="average features over this many noise draws")


def plan_from(args: argparse.Namespace):
    from ..features.plan import FeaturePlan

    return FeaturePlan(t=args.t or (), blocks=args.blocks, pools=args.pool, noise_seed=args.noise_seed, draws=args.draws)


def add_extract_args(p: argparse.ArgumentParser, blocks_required: bool = True) -> None:
    add_plan_args(p, blocks_required)
    p.add_argument("--limit", type=int, help="a stratified subset of this many images (with --held-out: of the training images)")
    p.add_argument("--held-out", type=int, help="also a stratified subset of this many of the dataset's held-out images "
                   "(--val-fraction, --split-seed), apart from --limit's: more images to select and report on")  # fmt: skip
    p.add_argument("--subset-seed", type=int, default=0, help='seed of the stratified --limit/--held-out subset (which images)')
    p.add_argument("--class-label", type=int, help="class to condition on (class-conditional models only)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per pass, and a new store's chunk size (default: 64 on a CPU; on a GPU the largest power of two "
                        "up to 512 that its free memory holds, measured)")  # fmt: skip
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="stored feature dtype")
    add_compute_args(p)
    p.add_argument("--workers", type=int, help="DataLoader worker processes (default: 0 on CPU, where the network needs every core; 8 on GPUs)")
    p.add_argument("--rank", type=int, help="this process's share of the chunks (default: torchrun's, else $RANK, else 0)")
    p.add_argument("--world-size", type=int, help="how many processes share the store (default: torchrun's, else $WORLD_SIZE, else 1)")
    p.add_argument("--dist-backend", default="auto", choices=["auto", "nccl", "gloo"], help="under torchrun (auto: nccl on GPUs, gloo on CPUs and where ranks outnumber a node's GPUs)")
    p.add_argument("--overwrite", action="store_true", help="discard an existing store at --out")
    p.add_argument("--augment-views", type=int, default=0,
                   help="store K random-resized-crop + flip views per image instead of the centre crop (for probe --augmented-store)")
    p.add_argument("--augment-seed", type=int, default=0, help="seed of the augmented views' crops and flips")


def extract_options_from(args: argparse.Namespace):
    from ..features.extract import ExtractOptions

    return ExtractOptions(
        batch_size=args.batch_size, dtype=args.dtype, compute=compute_from(args), limit=args.limit,
        held_out=args.held_out, subset_seed=args.subset_seed, class_label=args.class_label, rank=args.rank, world_size=args.world_size,
        dist_backend=args.dist_backend, rows_role=getattr(args, "rows", None),
        role_split=(getattr(args, "val_fraction", 0.1), getattr(args, "split_seed", 0), getattr(args, "report_share", 0.5)),
        workers=args.workers, overwrite=args.overwrite, augment_views=args.augment_views, augment_seed=args.augment_seed,
    )  # fmt: skip


def add_split_args(p: argparse.ArgumentParser, report: bool = True) -> None:
    """--val-fraction and --split-seed (the dataset-wide held-out split); with report, --report-share
    (commands that choose and report: probes, sweeps, studies; not pretrain, fid or baselines)."""
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="stratified held-out share of the dataset (the dataset-wide split, also what pretrain leaves out)")
    p.add_argument("--split-seed", type=int, default=0, help='seed of the stratified train/selection/report split')
    if not report:
        return
    p.add_argument("--report-share", type=float, default=0.5,
                   help="of the held-out images, the stratified share kept for reporting: choices (epoch, rates, cells) "
                        "are made on the rest and never see them; 0: report on the selection rows (optimistic)")


def add_fast_probe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--probe", default="logreg", choices=["logreg", "knn"], help="fast probe scoring each setting")
    add_split_args(p)
    p.add_argument("--no-controls", action="store_true", help="skip the pixels and random-weights controls")
