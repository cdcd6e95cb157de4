"""Labelled image datasets, the model transform, and fixed stratified splits.

Three sources, one interface (`LabeledImages`):
  * an ImageFolder directory (root/<class>/<image>);
  * a .tar / .tar.gz of an ImageFolder, unpacked once into the cache;
  * a torchvision dataset by name (`torchvision:CIFAR10`), downloaded only with download=True.
Images are read lazily; a file that cannot be decoded is reported by its path.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tarfile
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None  # type: ignore[assignment]

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ._io import cache_dir, output_errors, publish_dir, save_npy, temp_sibling_dir
from .errors import DiffprobeError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
TORCHVISION_DATASETS = ("CIFAR10", "Flowers102", "FGVCAircraft", "OxfordIIITPet", "Food101", "DTD", "StanfordCars")


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float grayscale to 8-bit "L", scaled by the range the values
    are stored in (PIL's own convert clips them, so a 16-bit image would come out white).

    I;16*: 0..65535 -> 0..255. I: the same when its values fit 16 bits (Pillow decodes some
    16-bit files as I). F: [0, 1] -> 0..255, or kept when already in [0, 255]. Any other range
    cannot be mapped without guessing a window, so it is an error that says so.
    """
    values = np.asarray(image).astype(np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode.startswith("I;16") or (image.mode == "I" and low >= 0 and high <= 65535):
        scaled = values / 257.0
    elif image.mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255.0
    elif image.mode == "F" and low >= 0 and high <= 255:
        scaled = values
    else:
        raise ValueError(
            f"{image.mode} image with values in [{low:g}, {high:g}], which cannot be mapped to 8 bits without "
            "guessing a window: convert it to 8- or 16-bit first"
        )
    return Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; the one decoding path every dataset uses.

    Transparent pixels are composited on white (not left black); high-bit-depth grayscale is
    scaled to 8 bits, not clipped. A mode PIL cannot convert raises ValueError.
    """
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        return _high_bit_depth_to_l(image).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


MAX_PIXELS_VARIABLE = "DIFFPROBE_MAX_IMAGE_PIXELS"


def max_image_pixels() -> int | None:
    """The largest image (width × height) read_image decodes: $DIFFPROBE_MAX_IMAGE_PIXELS (0: no limit),
    else PIL's own decompression-bomb limit (about 89 million pixels)."""
    text = os.environ.get(MAX_PIXELS_VARIABLE, "").strip().replace("_", "").replace(",", "")
    if not text:
        return Image.MAX_IMAGE_PIXELS
    try:
        value = int(text)
    except ValueError:
        raise DiffprobeError(f"${MAX_PIXELS_VARIABLE}={os.environ[MAX_PIXELS_VARIABLE]!r}: expected a number of pixels, "
                             "e.g. 200000000 (0 for no limit)") from None  # fmt: skip
    return None if value <= 0 else value


@contextlib.contextmanager
def _pil_bomb_check_off() -> Iterator[None]:
    """PIL's own check, at open, raises a bare DecompressionBombError (a traceback) and ignores our
    limit; read_image applies the limit itself, from the header, before decoding anything."""
    with _PIL_LIMIT_LOCK:  # threads reading images at once must not restore each other's None
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


_PIL_LIMIT_LOCK = threading.Lock()


def read_image(path: str | Path) -> Image.Image:
    limit = max_image_pixels()
    try:
        with _pil_bomb_check_off():
            im = Image.open(path)
        with im:
            width, height = im.size
            if limit is not None and width * height > limit:
                raise DiffprobeError(
                    f"image {path} is {width}×{height} = {width * height:,} pixels, over the limit of {limit:,} (a guard "
                    f"against decompression bombs): if the file is trusted, raise it, e.g. {MAX_PIXELS_VARIABLE}="
                    f"{width * height} (0: no limit)"
                )
            im.load()
            return to_rgb(im)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        raise DiffprobeError(f"cannot read image {path}: {e}") from None


@dataclass
class LabeledImages:
    """A fixed, ordered list of labelled images. Index i is the image's identity everywhere."""

    name: str
    classes: list[str]
    labels: np.ndarray  # int64 [N]
    load: Callable[[int], Image.Image]  # index -> RGB image; raises DiffprobeError naming the file
    describe: Callable[[int], str]  # index -> a path or name for messages
    identity: dict[str, Any] = field(default_factory=dict)  # what the fingerprint is made of
    # For sources whose files can change: what the rows are (names, classes) without the bytes,
    # and one short content print per image. None where the content is fixed (torchvision).
    layout: str | None = None
    item_prints: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:  # a summary: the dataclass's own repr printed every label and image print
        return f"LabeledImages({self.name!r}, {len(self)} images, {len(self.classes)} classes: {', '.join(self.classes[:5])}{', ...' if len(self.classes) > 5 else ''})"

    def fingerprint(self) -> str:
        h = hashlib.sha256(repr(sorted(self.identity.items())).encode())
        h.update(self.labels.astype(np.int64).tobytes())
        return h.hexdigest()[:20]

    def layout_fingerprint(self) -> str:
        """Which images, in which order, with which labels; not their bytes. A store compares it
        to tell "the same dataset with a file fixed" (chunks re-checked) from another dataset."""
        if self.layout is None:
            return self.fingerprint()
        h = hashlib.sha256(self.layout.encode())
        h.update(self.labels.astype(np.int64).tobytes())
        return h.hexdigest()[:20]

    def row_prints(self, rows: np.ndarray) -> list[str]:
        """The content print of each row's image ("" where the content cannot change)."""
        if self.item_prints is None:
            return [""] * len(rows)
        return [self.item_prints[int(i)] for i in rows]


# ------------------------------------------------------------------ ImageFolder and archives


def image_folder(root: str | Path) -> LabeledImages:
    root = Path(root)
    if not root.is_dir():
        raise DiffprobeError(f"dataset folder not found: {root}")
    from torchvision.datasets.folder import find_classes, make_dataset

    try:
        classes, class_to_idx = find_classes(str(root))
        samples = make_dataset(str(root), class_to_idx, extensions=IMAGE_EXTENSIONS, allow_empty=False)
    except FileNotFoundError as e:
        raise DiffprobeError(
            f"no images in {root}: expected an ImageFolder, root/<class>/<image>{IMAGE_EXTENSIONS[0]} ({e})"
        ) from None
    paths = [p for p, _ in samples]
    labels = np.array([c for _, c in samples], dtype=np.int64)
    # Content identity without reading every byte: relative paths and file sizes.
    h, names = hashlib.sha256(), hashlib.sha256()
    prints = []
    for p in paths:
        rel, size = os.path.relpath(p, root), str(os.path.getsize(p))
        h.update(rel.encode() + b"\0" + size.encode() + b"\n")
        names.update(rel.encode() + b"\n")
        prints.append(f"{rel}\0{size}")
    return LabeledImages(
        name=root.name,
        classes=list(classes),
        labels=labels,
        load=lambda i: read_image(paths[i]),
        describe=lambda i: paths[i],
        identity={"kind": "imagefolder", "files": h.hexdigest(), "classes": list(classes)},
        layout=f"imagefolder|{names.hexdigest()}|{classes!r}",
        item_prints=prints,
    )


def _imagefolder_root(top: Path, split: str | None) -> Path:
    """Descend through single-folder wrappers (cifar10/train/...) to the folder of class folders."""
    here = top
    while True:
        subdirs = [p for p in here.iterdir() if p.is_dir()]
        files = [p for p in here.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        if split and (here / split).is_dir() and len(subdirs) > 1 and not files:
            here = here / split
        elif len(subdirs) == 1 and not files and any(p.is_dir() for p in subdirs[0].iterdir()):
            here = subdirs[0]  # a wrapper folder (its one child holds folders, not images)
        else:
            return here


def unpack_archive(archive: str | Path) -> Path:
    """Unpack a .tar(.gz) once into the cache and return the folder.

    It is unpacked into a temporary sibling and renamed into place, so the cache holds whole
    folders only. Any failure (a truncated gzip raises EOFError, a damaged one zlib.error, a full
    disk OSError, Ctrl-C) removes the temporary folder; one left by kill -9 is removed by the next
    run once its process is gone.
    """
    archive = Path(archive).resolve()
    st = archive.stat()
    key = hashlib.sha256(f"{archive}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "archives" / f"{archive.name.split('.')[0]}-{key}"
    if target.is_dir():
        return target
    with output_errors(target.parent, "cache ($DIFFPROBE_CACHE)"):
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = open(target.parent / f".{target.name}.lock", "a")
    with lock:  # one process unpacks (every torchrun rank asks at once); the others wait, then find the folder
        if fcntl is not None:  # POSIX; elsewhere each process unpacks and the first folder published wins
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if target.is_dir():
                return target
            return _unpack(archive, target)
        finally:  # no lock file stays behind; a process that opened it meanwhile just unpacks or finds the folder
            Path(lock.name).unlink(missing_ok=True)


def _unpack(archive: Path, target: Path) -> Path:
    with output_errors(target.parent, "cache ($DIFFPROBE_CACHE)"):
        tmp = temp_sibling_dir(target, "unpack")
    try:
        # The bar closes (clearing its line) before any error propagates, so the message starts clean.
        with tarfile.open(archive) as tar, tqdm(desc=f"unpacking {archive.name}", unit="file", leave=False) as bar:
            for member in tar:
                tar.extract(member, tmp, filter="data")
                bar.update(1)
            # tarfile stops at the first empty header; damage after it (garbled bytes that happen to
            # decode as zeros) would pass unseen. Reading to the end checks the rest and gzip's CRC.
            while tar.fileobj.read(1 << 20):
                pass
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, tarfile.FilterError):  # a readable archive that would write outside its folder
            name = getattr(e.tarinfo, "name", "?")
            raise DiffprobeError(f"cannot unpack {archive}: it holds an unsafe member {name!r} ({e}); diffprobe unpacks only "
                                 "files and folders that stay inside the archive's folder: rebuild the archive from the image "
                                 "folder (tar -czf data.tar.gz -C PARENT FOLDER), or unpack it yourself and pass the folder") from None  # fmt: skip
        if isinstance(e, (tarfile.TarError, EOFError, zlib.error)):
            raise DiffprobeError(f"cannot unpack {archive}: truncated or not a readable tar archive ({type(e).__name__}: {e}); "
                                 "download or copy it again") from None  # fmt: skip
        if isinstance(e, OSError):
            raise DiffprobeError(f"cannot unpack {archive} into {target.parent}: {e.strerror or e}; free space or "
                                 "set $DIFFPROBE_CACHE to a writable folder") from None  # fmt: skip
        raise
    publish_dir(tmp, target)  # False: another process won the race, and its folder is as good
    return target


def is_archive(path: str | Path) -> bool:
    return str(path).endswith((".tar", ".tar.gz", ".tgz"))


# ------------------------------------------------------------------ torchvision datasets


def _torchvision_labels(ds: Any) -> np.ndarray:
    # torchvision keeps labels under different names per dataset; read them without decoding images.
    for attr in ("targets", "_labels"):
        if hasattr(ds, attr):
            return np.asarray(getattr(ds, attr), dtype=np.int64)
    if hasattr(ds, "_samples"):
        return np.asarray([s[1] for s in ds._samples], dtype=np.int64)
    return np.asarray([ds[i][1] for i in range(len(ds))], dtype=np.int64)


def torchvision_dataset(name: str, root: str | Path, split: str = "train", download: bool = False) -> LabeledImages:
    import torchvision.datasets as tvd

    if name not in TORCHVISION_DATASETS:
        raise DiffprobeError(f"unknown torchvision dataset {name!r}; supported: {', '.join(TORCHVISION_DATASETS)}")
    cls = getattr(tvd, name)
    kwargs: dict[str, Any] = {"root": str(root), "download": download}
    if name == "CIFAR10":
        if split not in ("train", "test"):
            raise DiffprobeError("CIFAR10 splits are train and test")
        kwargs["train"] = split == "train"
    else:
        kwargs["split"] = split
    try:
        ds = cls(**kwargs)
    except (RuntimeError, FileNotFoundError) as e:
        hint = "" if download else " Pass --download (needs internet) or point --data-root at a copy."
        raise DiffprobeError(f"torchvision dataset {name} ({split}) not found under {root}.{hint} ({e})") from None
    except ValueError as e:
        raise DiffprobeError(f"torchvision dataset {name}: {e}") from None
    labels = _torchvision_labels(ds)
    classes = [str(c) for c in getattr(ds, "classes", range(int(labels.max()) + 1))]

    def load(i: int) -> Image.Image:
        try:
            return to_rgb(ds[i][0])
        except (OSError, ValueError) as e:
            raise DiffprobeError(f"cannot read image {i} of {name}: {e}") from None

    return LabeledImages(
        name=f"{name}-{split}",
        classes=classes,
        labels=labels,
        load=load,
        describe=lambda i: f"{name}[{i}]",
        identity={"kind": "torchvision", "name": name, "split": split, "n": len(labels)},
    )


def open_dataset(spec: str | Path, root: str | Path | None = None, split: str = "train", download: bool = False) -> LabeledImages:
    """`torchvision:NAME`, an ImageFolder directory, or a .tar(.gz) of one."""
    spec = str(spec)
    if spec.startswith("torchvision:"):
        return torchvision_dataset(spec.split(":", 1)[1], root or cache_dir() / "torchvision", split, download)
    path = Path(spec)
    if not path.exists():
        raise DiffprobeError(f"dataset not found: {spec} (expected a folder, a .tar/.tar.gz, or torchvision:NAME)")
    if path.is_file():
        if not is_archive(path):
            raise DiffprobeError(f"{spec} is a file but not a .tar/.tar.gz archive of an ImageFolder")
        data = image_folder(_imagefolder_root(unpack_archive(path), split))
        data.name = path.name.split(".")[0]
        return data
    return image_folder(_imagefolder_root(path, split))


# ------------------------------------------------------------------ transform, splits, torch Dataset


def model_transform(image_size: int, resize: int | None = None, interpolation: str = "bilinear") -> Callable[[Image.Image], torch.Tensor]:
    """Resize the short side (to `resize`, default the model's resolution), centre-crop to the
    model's resolution, scale to [-1, 1]. Image encoders bring their own resize and interpolation
    (timm's crop_pct, torchvision's 256 → 224, bicubic); diffusion models resize to their size."""
    from torchvision.transforms import InterpolationMode, v2

    return v2.Compose([
        v2.PILToTensor(),
        v2.Resize(resize or image_size, interpolation=InterpolationMode(interpolation), antialias=True),
        v2.CenterCrop(image_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize([0.5] * 3, [0.5] * 3),
    ])  # fmt: skip


def transform_description(image_size: int, resize: int | None = None, interpolation: str = "bilinear") -> dict[str, Any]:
    described = {"resize": resize or image_size, "crop": "center", "interpolation": f"{interpolation}-antialias", "range": [-1, 1]}
    if resize and resize != image_size:
        described["crop_size"] = image_size
    return described


def backbone_transform(backbone: Any) -> Callable[[Image.Image], torch.Tensor]:
    """The data transform a backbone reads its images through (model_transform with its resize and interpolation)."""
    return model_transform(backbone.image_size, backbone.resize_size, backbone.interpolation)


def backbone_transform_description(backbone: Any) -> dict[str, Any]:
    return transform_description(backbone.image_size, backbone.resize_size, backbone.interpolation)


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation rows: the same fraction of every class, fixed by the seed."""
    if not 0 <= val_fraction < 1:
        raise DiffprobeError(f"val_fraction {val_fraction} must be in [0, 1)")
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n_val = int(round(val_fraction * len(members)))
        is_val[rng.permutation(members)[:n_val]] = True
    return is_val


def stratified_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of n images with classes in proportion, fixed by the seed."""
    if n < 1:  # a negative n would slice from the end (193 of 200 images for -7), 0 an empty subset
        raise DiffprobeError(f"a subset of {n} images (--limit {n}): expected at least 1 (omit --limit for the whole dataset)")
    if n >= len(labels):
        return np.arange(len(labels))
    # A stream of its own ([seed, 1]): with the bare seed it would repeat stratified_split's
    # permutations, and a 10% subset would be exactly the validation split.
    rng = np.random.default_rng([seed, 1])
    order = np.concatenate([rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)])
    # Interleave classes by rank-within-class so any prefix is (nearly) balanced.
    ranks = np.concatenate([np.arange((labels == c).sum()) / (labels == c).sum() for c in np.unique(labels)])
    return np.sort(order[np.argsort(ranks, kind="stable")[:n]])


AUGMENT_SCALE = (0.35, 1.0)  # random-resized-crop area range (a common choice for small images)


def augment_description(image_size: int, views: int, seed: int) -> dict[str, Any]:
    return {**transform_description(image_size), "crop": "random-resized", "scale": list(AUGMENT_SCALE),
            "hflip": 0.5, "views": views, "augment_seed": seed}  # fmt: skip


class AugmentedViews(Dataset):
    """Row r of an augmented store: view `views[r]` of image `indices[r]`, a random-resized crop
    and flip drawn from a generator seeded by (seed, image index, view) alone, so a view is
    the same on every run, rank and resume."""

    def __init__(self, data: LabeledImages, indices: np.ndarray, views: np.ndarray, image_size: int, seed: int):
        from torchvision.transforms import v2

        self.data, self.indices, self.views, self.image_size, self.seed = data, indices, views, image_size, seed
        self.augment = v2.Compose([
            v2.PILToTensor(),
            v2.RandomResizedCrop(image_size, scale=AUGMENT_SCALE, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.5] * 3, [0.5] * 3),
        ])  # fmt: skip

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, row: int) -> tuple[torch.Tensor, int, int, str]:
        index, view = int(self.indices[row]), int(self.views[row])
        try:
            image = self.data.load(index)
        except DiffprobeError as e:
            return torch.zeros(3, self.image_size, self.image_size), -1, index, str(e)
        state = np.random.SeedSequence([self.seed, index, view]).generate_state(1, np.uint32)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(state[0]))
            x = self.augment(image)
        return x, int(self.data.labels[index]), index, ""


class TransformedImages(Dataset):
    """torch Dataset over some indices of a LabeledImages; bad files come back as errors, not crashes.

    Returning the error (instead of raising inside a DataLoader worker, where the message is
    buried in a traceback) lets the extraction loop stop with the file's path on one line.
    """

    def __init__(self, data: LabeledImages, transform: Callable[[Image.Image], torch.Tensor], image_size: int):
        self.data, self.transform, self.image_size = data, transform, image_size

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, str]:
        try:
            x = self.transform(self.data.load(index))
            return x, int(self.data.labels[index]), index, ""
        except DiffprobeError as e:
            return torch.zeros(3, self.image_size, self.image_size), -1, index, str(e)


def images_uint8(data: LabeledImages, rows: np.ndarray, image_size: int, desc: str = "decoding images") -> torch.Tensor:
    """Decode once into a uint8 [N, 3, S, S] tensor (resize + centre crop), cached on disk, so that
    training epochs cost no decoding. CIFAR-10 is 150 MB this way; ImageNet at 64×64 ~16 GB."""
    from torchvision.transforms import v2

    rows = np.asarray(rows, dtype=np.int64)
    key = f"{data.fingerprint()}-{image_size}-{len(rows)}-{hashlib.sha256(rows.tobytes()).hexdigest()[:12]}"
    path = cache_dir() / "decoded-images" / f"{key}.npy"
    if path.is_file():
        return torch.from_numpy(np.load(path))
    resize = v2.Compose([v2.PILToTensor(), v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)])
    out = torch.empty((len(rows), 3, image_size, image_size), dtype=torch.uint8)
    for i, index in enumerate(tqdm(rows, desc=desc, unit="img", mininterval=2)):
        out[i] = resize(data.load(int(index)))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_npy(path, out.numpy())
    return out


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the same values model_transform gives."""
    return images.float().div_(127.5).sub_(1.0)
