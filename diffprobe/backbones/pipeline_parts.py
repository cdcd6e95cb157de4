"""What every diffusers family's loader shares: reading a pipeline's parts, configs and scheduler,
checking what the libraries only warn about, and one-line errors for offline hub ids.

The dispatcher (diffusers_pipeline.py) and every family module import from here; nothing here
imports a family, so no import runs in a circle.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import DiffprobeError
from .pickles import refuse_code
from .registry import display, folder_needs


def offline_error(target: str, error: Exception) -> DiffprobeError:
    whole = " ".join(str(error).split()) or type(error).__name__  # the hub's whole message, on the one line
    if type(error).__name__ == "GatedRepoError" or "gated repo" in str(error).lower():  # SD3, FLUX.1-dev
        return DiffprobeError(
            f"{target} is a gated model: accept its licence on its hub page, then `huggingface-cli login` (or set HF_TOKEN) "
            f"where there is internet, or download it there (`huggingface-cli download {target} --local-dir DIR`) and pass diffusers:DIR"
        )
    return DiffprobeError(
        f"cannot load diffusers model {target!r}: it is not a local folder, and the Hugging Face hub cannot serve it "
        f"(offline? {whole}): "
        f"download the pipeline where there is internet (`huggingface-cli download {target} --local-dir DIR`) "
        "and pass diffusers:DIR"
    )



def hub_json(target: str, filename: str) -> dict | None:
    """A JSON file of a hub repo; None if the repo has no such file; offline is a clear error."""
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(target, filename)).read_text())
    except Exception as e:  # network, offline mode, missing repo: one clear line
        if type(e).__name__ in ("EntryNotFoundError", "RemoteEntryNotFoundError"):
            return None
        raise offline_error(target, e) from None



def load_part(cls: Callable, target: str, local: bool, sub: str, what: str, **kw: Any):
    """One component of a pipeline (`cls.from_pretrained(target, subfolder=sub)`), or a clear error."""
    if local and not (Path(target) / sub).is_dir():
        raise DiffprobeError(
            f"{target} has no {sub}/ folder: a {display(what)} pipeline folder needs {folder_needs(what)} "
            "(as pipeline.save_pretrained writes them)"
        )
    try:
        return from_pretrained_checked(cls, target, sub, f"{sub}/ of {target}", local, **kw)
    except (OSError, EnvironmentError, ValueError) as e:
        if not local:
            raise offline_error(target, e) from None
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DiffprobeError(f"cannot load {sub}/ of {target} as {cls.__name__}: {first}") from None


def read_json(path: Path) -> dict:
    """A pipeline's JSON file (config.json, model_index.json, scheduler_config.json), or one line naming it."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DiffprobeError(f"{path} is not valid JSON ({e}): restore it from the pipeline's source "
                             "(or save the pipeline again with save_pretrained)") from None  # fmt: skip
    if not isinstance(data, dict):
        raise DiffprobeError(f"{path} must hold a JSON object (as save_pretrained writes it), found {type(data).__name__}")
    return data


def _quiet_loaders():
    """diffusers and transformers log what they could not load as warnings and go on; the check
    after loading turns that into an error, so their warnings would only repeat it."""
    import contextlib

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    stack = contextlib.ExitStack()
    for lib in (diffusers_logging, transformers_logging):
        level = lib.get_verbosity()
        lib.set_verbosity_error()
        stack.callback(lib.set_verbosity, level)
    return stack


@contextlib.contextmanager
def no_transformers_bars():
    """transformers draws a progress bar per load; ours is the only one the CLI should show."""
    from transformers.utils import logging as transformers_logging

    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            transformers_logging.enable_progress_bar()


_SIZE_MISMATCH = re.compile(r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from checkpoint, "
                            r"the shape in current model is torch\.Size\((\[[^\]]*\])\)")  # fmt: skip


def from_pretrained_checked(cls: Any, target: str, sub: str | None, where: str, local: bool, **kw: Any):
    """`cls.from_pretrained(target, subfolder=sub)`, refusing what the libraries only warn about: weights
    that do not fit the config (missing keys they would initialise randomly, foreign keys, other shapes),
    and `.bin` pickles that carry code (checked before the library unpickles them)."""
    if local:
        folder = Path(target) / sub if sub else Path(target)
        for path in sorted(folder.glob("*.bin")):
            refuse_code(path)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):  # a tokenizer: no weights to check
        return cls.from_pretrained(target, subfolder=sub, **kw)
    try:
        with _quiet_loaders():
            model, info = cls.from_pretrained(target, subfolder=sub, output_loading_info=True, **kw)
    except RuntimeError as e:  # a tensor of another shape than the config's
        found = _SIZE_MISMATCH.search(str(e))
        if not found:
            raise
        raise DiffprobeError(f"{where}: tensor {found[1]} has shape {found[2]} in the weights, but the config "
                             f"(config.json) makes it {found[3]}: the weights and config.json belong to different models") from None
    problems = []
    for kind, what in (("missing_keys", "missing from the weights (they would be random)"),
                       ("unexpected_keys", "in the weights but not in the model of config.json")):  # fmt: skip
        keys = sorted(info.get(kind) or [])
        if keys:
            problems.append(f"{len(keys)} key(s) {what}: {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}")
    mismatched = list(info.get("mismatched_keys") or [])
    if mismatched:
        key, *shapes = mismatched[0]
        problems.append(f"{len(mismatched)} tensor(s) of another shape than the config's, e.g. {key} "
                        f"(weights {list(shapes[0])}, config {list(shapes[1])})" if len(shapes) == 2 else f"{len(mismatched)} tensor(s) "
                        f"of another shape than the config's, e.g. {key}")  # fmt: skip
    if problems:
        raise DiffprobeError(f"{where}: the weights do not match config.json ({'; '.join(problems)}): the folder mixes files of "
                             "different models; restore them from the pipeline's source")  # fmt: skip
    return model


def architecture_config(model: torch.nn.Module) -> dict[str, Any]:
    """The model's config as JSON, without where it was loaded from (`_name_or_path`): the config
    is part of the backbone's fingerprint, and a copied or moved folder holds the same model."""
    config = json.loads(json.dumps(dict(model.config), default=str))
    config.pop("_name_or_path", None)
    return config


def check_prompt_model_options(family: str, class_label: Any, subfolder: str | None, denoiser: str) -> None:
    """The load options a prompt-conditioned pipeline refuses: a class label, another denoiser subfolder."""
    if class_label is not None:
        raise DiffprobeError(f"{family} is conditioned on a prompt, not a class label: drop class_label, use prompt=TEXT")
    if subfolder not in (None, denoiser):
        raise DiffprobeError(f"subfolder={subfolder!r}: a {family} pipeline folder keeps its denoiser in {denoiser}/")


def read_scheduler_config(target: str, local: bool) -> dict | None:
    """The pipeline's scheduler/scheduler_config.json, or None when it has none."""
    if local:
        path = Path(target) / "scheduler" / "scheduler_config.json"
        return read_json(path) if path.is_file() else None
    return hub_json(target, "scheduler/scheduler_config.json")


def prediction_type(target: str, local: bool) -> str:
    """What the denoiser predicts, from the pipeline's scheduler config ("epsilon" when it says nothing)."""
    try:
        config = read_scheduler_config(target, local) or {}
    except DiffprobeError:
        if local:
            raise
        config = {}  # a hub scheduler config out of reach: the schedule loader has already refused or been told the schedule
    kind = config.get("prediction_type", "epsilon")
    if kind not in ("epsilon", "v_prediction"):
        raise DiffprobeError(f"{target}: scheduler prediction_type {kind!r} is not supported (epsilon or v_prediction)")
    return kind


MAX_IMAGE_SIZE = 8192


def check_image_size(requested: Any, native: int, factor: int, what: str) -> int:
    """The pixel image size: the pipeline's own, or `requested`, which `factor` must divide."""
    if requested is None:
        return native
    try:
        size = int(requested)
    except (TypeError, ValueError):
        raise DiffprobeError(f"image_size must be an integer number of pixels, got {requested!r}") from None
    if size > MAX_IMAGE_SIZE:  # a typo, not a model: its latents alone would not fit in memory
        raise DiffprobeError(f"image size {size}: expected at most {MAX_IMAGE_SIZE} pixels a side (released models read "
                             "256 to 1024): choose a smaller size, or leave it out for the model's own")  # fmt: skip
    if size <= 0 or size % factor:
        raise DiffprobeError(
            f"image size {size} is not a multiple of {factor}, which this {what} needs: "
            f"choose e.g. {max(factor, size // factor * factor)} or {(size // factor + 1) * factor}"
        )
    return size


def as_int(value: Any, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DiffprobeError(f"{name} must be an integer, got {value!r}") from None
