"""guided-diffusion flags, presets for the released checkpoints, and checking a checkpoint
against them.

Flags keep guided-diffusion's own names and defaults (`model_and_diffusion_defaults`), so a
user can paste the command-line flags of any released model. A checkpoint's shapes give
most of the architecture; what they cannot give (number of heads, qkv order) must come
from a preset, flags, or a JSON sidecar beside the checkpoint.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import DiffprobeError
from .adm import ADMArchitecture
from .pickles import load_torch_file, pickled_code  # noqa: F401 (pickled_code: kept importable from here)

# guided-diffusion's model_and_diffusion_defaults() (script_util.py), architecture and schedule part.
DEFAULT_FLAGS: dict[str, Any] = {
    "image_size": 64,
    "num_channels": 128,
    "num_res_blocks": 2,
    "num_heads": 4,
    "num_heads_upsample": -1,
    "num_head_channels": -1,
    "attention_resolutions": "16,8",
    "channel_mult": "",
    "dropout": 0.0,
    "class_cond": False,
    "use_checkpoint": False,
    "use_scale_shift_norm": True,
    "resblock_updown": False,
    "use_fp16": False,
    "use_new_attention_order": False,
    "learn_sigma": False,
    "diffusion_steps": 1000,
    "noise_schedule": "linear",
}
# Flags guided-diffusion accepts that change sampling or training, never the network's shape.
IGNORED_FLAGS = {"timestep_respacing", "use_kl", "predict_xstart", "rescale_timesteps", "rescale_learned_sigmas"}
NUM_IMAGENET_CLASSES = 1000

_LSUN = dict(
    attention_resolutions="32,16,8", class_cond=False, diffusion_steps=1000, dropout=0.1, image_size=256,
    learn_sigma=True, noise_schedule="linear", num_channels=256, num_head_channels=64, num_res_blocks=2,
    resblock_updown=True, use_fp16=True, use_scale_shift_norm=True,
)  # fmt: skip

# The released checkpoints' flags, from guided-diffusion's README (file name = preset name + ".pt").
PRESETS: dict[str, dict[str, Any]] = {
    "256x256_diffusion_uncond": dict(
        attention_resolutions="32,16,8", class_cond=False, diffusion_steps=1000, image_size=256,
        learn_sigma=True, noise_schedule="linear", num_channels=256, num_head_channels=64,
        num_res_blocks=2, resblock_updown=True, use_fp16=True, use_scale_shift_norm=True,
    ),
    "256x256_diffusion": dict(
        attention_resolutions="32,16,8", class_cond=True, diffusion_steps=1000, image_size=256,
        learn_sigma=True, noise_schedule="linear", num_channels=256, num_head_channels=64,
        num_res_blocks=2, resblock_updown=True, use_fp16=True, use_scale_shift_norm=True,
    ),
    "64x64_diffusion": dict(
        attention_resolutions="32,16,8", class_cond=True, diffusion_steps=1000, dropout=0.1, image_size=64,
        learn_sigma=True, noise_schedule="cosine", num_channels=192, num_head_channels=64, num_res_blocks=3,
        resblock_updown=True, use_new_attention_order=True, use_fp16=True, use_scale_shift_norm=True,
    ),
    "128x128_diffusion": dict(
        attention_resolutions="32,16,8", class_cond=True, diffusion_steps=1000, image_size=128,
        learn_sigma=True, noise_schedule="linear", num_channels=256, num_heads=4, num_res_blocks=2,
        resblock_updown=True, use_fp16=True, use_scale_shift_norm=True,
    ),
    "512x512_diffusion": dict(
        attention_resolutions="32,16,8", class_cond=True, diffusion_steps=1000, image_size=512,
        learn_sigma=True, noise_schedule="linear", num_channels=256, num_head_channels=64,
        num_res_blocks=2, resblock_updown=True, use_fp16=False, use_scale_shift_norm=True,
    ),
    "lsun_bedroom": dict(_LSUN),
    "lsun_cat": dict(_LSUN),
    "lsun_horse": dict(_LSUN),
    "lsun_horse_nodropout": dict(_LSUN, dropout=0.0),
}  # fmt: skip


def _parse_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in {"true", "false", "1", "0", "yes", "no"}:
        return value.lower() in {"true", "1", "yes"}
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise DiffprobeError(f"flag {name}={value!r}: expected True or False")


def _parse_int_list(name: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, str):
        parts = [p for p in value.split(",") if p.strip()]
    else:
        parts = list(value)
    try:
        return tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        raise DiffprobeError(f"flag {name}={value!r}: expected comma-separated integers such as 32,16,8") from None


def default_channel_mult(image_size: int) -> tuple[float, ...]:
    """guided-diffusion's channel multipliers when `channel_mult` is empty."""
    table = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
    if image_size not in table:
        raise DiffprobeError(
            f"image_size {image_size} has no default channel_mult in guided-diffusion; pass channel_mult, e.g. 1,2,2"
        )
    return table[image_size]


def normalize_flags(flags: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults filled in, types checked; unknown names are an error (a typo must not pass)."""
    unknown = sorted(set(flags) - set(DEFAULT_FLAGS) - IGNORED_FLAGS)
    if unknown:
        raise DiffprobeError(
            f"unknown guided-diffusion flag(s) {', '.join(unknown)}; known flags: {', '.join(sorted(DEFAULT_FLAGS))}"
        )
    out = dict(DEFAULT_FLAGS)
    out.update({k: v for k, v in flags.items() if k in DEFAULT_FLAGS})
    for key, default in DEFAULT_FLAGS.items():
        if isinstance(default, bool):
            out[key] = _parse_bool(key, out[key])
        elif isinstance(default, int):
            try:
                out[key] = int(out[key])
            except (TypeError, ValueError):
                raise DiffprobeError(f"flag {key}={out[key]!r}: expected an integer") from None
    out["dropout"] = float(out["dropout"])
    if out["noise_schedule"] not in ("linear", "cosine"):
        raise DiffprobeError(f"noise_schedule={out['noise_schedule']!r}: expected linear or cosine")
    return out


def architecture_from_flags(flags: Mapping[str, Any]) -> ADMArchitecture:
    f = normalize_flags(flags)
    image_size = f["image_size"]
    if isinstance(f["channel_mult"], str) and f["channel_mult"] == "":
        channel_mult: tuple[float, ...] = default_channel_mult(image_size)
    elif isinstance(f["channel_mult"], str):
        channel_mult = tuple(float(c) for c in f["channel_mult"].split(","))
    else:
        channel_mult = tuple(float(c) for c in f["channel_mult"])
    resolutions = _parse_int_list("attention_resolutions", f["attention_resolutions"])
    for r in resolutions:
        if r <= 0 or image_size % r:
            raise DiffprobeError(f"attention_resolutions entry {r} does not divide image_size {image_size}")
    if f["num_head_channels"] == -1 and f["num_heads"] <= 0:
        raise DiffprobeError("set num_heads > 0 or num_head_channels > 0")
    widths = sorted({int(f["num_channels"] * m) for m in channel_mult})
    if f["num_channels"] <= 0 or any(w % 32 for w in widths):
        # guided-diffusion normalises with GroupNorm(32, channels): a width that 32 does not divide cannot be built
        raise DiffprobeError(f"num_channels {f['num_channels']} with channel_mult {','.join(f'{m:g}' for m in channel_mult)} "
                             f"gives levels of {', '.join(map(str, widths))} channels: ADM's GroupNorm has 32 groups, so each "
                             "must be a positive multiple of 32 (e.g. num_channels 32, 64, 128)")  # fmt: skip
    return ADMArchitecture(
        image_size=image_size,
        in_channels=3,
        model_channels=f["num_channels"],
        out_channels=6 if f["learn_sigma"] else 3,
        num_res_blocks=f["num_res_blocks"],
        attention_ds=tuple(image_size // r for r in resolutions),
        channel_mult=channel_mult,
        dropout=f["dropout"],
        num_classes=NUM_IMAGENET_CLASSES if f["class_cond"] else None,
        num_heads=f["num_heads"],
        num_heads_upsample=f["num_heads"] if f["num_heads_upsample"] == -1 else f["num_heads_upsample"],
        num_head_channels=f["num_head_channels"],
        use_scale_shift_norm=f["use_scale_shift_norm"],
        resblock_updown=f["resblock_updown"],
        use_new_attention_order=f["use_new_attention_order"],
    )


# ---------------------------------------------------------------- reading checkpoints


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A released `.pt` (plain state_dict, loaded with weights_only=True) or a `.safetensors`."""
    path = Path(path)
    if not path.is_file():
        raise DiffprobeError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise DiffprobeError(f"cannot read safetensors checkpoint {path}: {e}") from None
    obj = load_torch_file(path, "checkpoint", "download or copy it again")
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # diffprobe's own pretrain checkpoints wrap it with their config
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DiffprobeError(f"{path} is not a state_dict: expected a dict of parameter name -> tensor")
    return obj


def sidecar_flags(path: str | Path) -> dict[str, Any] | None:
    """Flags stored beside a checkpoint: `<name>.json` holding {"flags": {...}} (or the flags)."""
    side = Path(path).with_suffix(".json")
    if not side.is_file():
        return None
    try:
        data = json.loads(side.read_text())
    except json.JSONDecodeError as e:
        raise DiffprobeError(f"cannot parse flags file {side}: {e}") from None
    flags = data.get("flags", data) if isinstance(data, dict) else None
    if not isinstance(flags, dict):
        raise DiffprobeError(f"flags file {side} must hold a JSON object of guided-diffusion flags")
    return flags


def preset_for_filename(path: str | Path) -> str | None:
    stem = Path(path).stem
    return stem if stem in PRESETS else None


def infer_shape_flags(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The flags a checkpoint's shapes determine.

    Not among them: image_size (convolutions fit any size), the number of attention heads and
    the qkv order. Attention is returned as downsampling factors under `_attention_ds`.
    """
    keys = set(state)
    for needed in ("input_blocks.0.0.weight", "time_embed.0.weight", "out.2.weight", "middle_block.0.in_layers.0.weight"):
        if needed not in keys:
            raise DiffprobeError(f"not an ADM (guided-diffusion) checkpoint: key {needed} is missing")

    def count(prefix: str) -> int:
        return 1 + max(int(m.group(1)) for k in keys if (m := re.match(prefix + r"\.(\d+)\.", k)))

    n_out = count("output_blocks")
    # Each level but the top one ends its decoder part with an upsampler: a ResBlock (resblock_updown)
    # or an `Upsample` conv placed after the level's first ResBlock (and its attention, if any).
    up_blocks = [
        j for j in range(n_out)
        if any(re.match(rf"output_blocks\.{j}\.[12]\.(in_layers|conv)\.", k) for k in keys)
    ]  # fmt: skip
    levels = len(up_blocks) + 1
    num_res_blocks = n_out // levels - 1
    model_channels = state["time_embed.0.weight"].shape[0] // 4
    mults, attention_ds, ds = [], [], 1
    for level in range(levels):
        base = level * (num_res_blocks + 1) + 1
        mults.append(state[f"input_blocks.{base}.0.out_layers.3.weight"].shape[0] / model_channels)
        if f"input_blocks.{base}.1.qkv.weight" in keys:
            attention_ds.append(ds)
        ds *= 2
    first_res_out = state["input_blocks.1.0.out_layers.3.weight"].shape[0]
    return {
        "num_channels": model_channels,
        "channel_mult": ",".join(_fmt_mult(m) for m in mults),
        "num_res_blocks": num_res_blocks,
        "resblock_updown": f"input_blocks.{num_res_blocks + 1}.0.in_layers.0.weight" in keys,
        "use_scale_shift_norm": state["input_blocks.1.0.emb_layers.1.weight"].shape[0] == 2 * first_res_out,
        "learn_sigma": state["out.2.weight"].shape[0] == 6,
        "class_cond": "label_emb.weight" in keys,
        "_attention_ds": tuple(attention_ds),
    }


def _fmt_mult(m: float) -> str:
    return str(int(m)) if float(m).is_integer() else str(m)


FLAGS_HINT = "Use the flags it was trained with (a preset, its .json, or drop the options to infer them from its shapes)"


def check_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str, config: str,
                     hint: str = FLAGS_HINT) -> None:  # fmt: skip
    """Raise one error naming every key and shape that differs between model and checkpoint."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if not (missing or unexpected or shapes):
        return

    def listing(names: list[str], describe, what: str) -> str:
        # Counts and the first few keys: a preset of the wrong size differs in hundreds of keys.
        shown = ", ".join(describe(n) for n in names[:2])
        return f"{len(names)} {what} (e.g. {shown}{', ...' if len(names) > 2 else ''})"

    parts = []
    if shapes:
        parts.append(listing(shapes, lambda k: f"{k}: checkpoint {list(got[k])}, model {list(expected[k])}", "shapes differ"))
    if missing:
        parts.append(listing(missing, str, "keys missing from the checkpoint"))
    if unexpected:
        parts.append(listing(unexpected, str, "checkpoint keys not in the model"))
    raise DiffprobeError(
        f"checkpoint {source} does not match {config}: " + "; ".join(parts) + ". " + hint
    )
