"""`diffprobe pretrain`: train an ADM denoiser (ε-prediction) whose weights the `adm` backbone loads.

The network is the backbone's own `ADMUNet`, so what is trained here is exactly what is probed
later. Training follows guided-diffusion / improved DDPM: uniform timesteps, the simple MSE on
ε (or, with `loss_weighting="min-snr"`, each sample weighted min(SNR, γ)/SNR; plus the
variational bound when sigma is learned), AdamW with linear warmup, gradient
clipping, an EMA of the weights, random horizontal flips.

Resume is exact: every random draw of step s (batch order, flips, timesteps, noise, dropout)
is a function of (seed, s) alone, and a checkpoint holds the weights, EMA, optimiser and
scheduler state, so a run stopped and resumed gives the same loss curve as one that never
stopped (tests/test_pretrain.py checks it bit for bit).

Warm start (`init_from`; `diffprobe pretrain --init-from FILE.pt`) begins a new run from a
checkpoint's weights, e.g. the shipped `checkpoints/diffprobe-cifar10/ema.pt`, which comes
without its training state. The network is built from the checkpoint's flags (its `.json`
sidecar; flags given as well must agree, dropout excepted), the weights go into both the online
model and the EMA, and the step counter continues from the checkpoint's step, so step s draws the
batch, flips, timesteps, noise and dropout the original run would have drawn at step s (given
its --seed and --batch-size). It is not an exact continuation: the optimiser starts fresh (no
Adam moments, the learning rate warms up again over `warmup_steps`), and the online weights
start from the EMA, not from the raw weights the original run had, so the EMA's own history is
lost too (it goes on from the shipped EMA, with the decay of the recorded step). The run's config
records the source (path, sha256, step, its training so far), so `ema.json` and model cards count
steps, images seen and hours across warm starts. Once the new run has saved its own
`training-state.pt`, it resumes exactly like any other run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..backbones.adm import ADMUNet, AttentionBlock, ResBlock
from ..backbones.adm_config import architecture_from_flags, check_state_dict, normalize_flags, read_state_dict, sidecar_flags
from ..data import LabeledImages, images_uint8, stratified_split, to_model_range
from .._io import output_dir, output_errors, torch_save, write_json
from ..backbones.pickles import load_torch_file
from ..errors import DiffprobeError
from ..precision import cpu_has_fast_bf16, describe_hardware, resolve_device, upload
from ..features.noise import NoiseSchedule
from . import Stopped
from .vlb import learned_range_vlb

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "training-state.pt"
RENAMED = {"holdout_fraction": "val_fraction", "holdout_seed": "split_seed"}  # names in runs of diffprobe 0.1
LOSS_WEIGHTINGS = ("uniform", "min-snr")
DEVICE_IMAGES_SHARE = 0.25  # decoded training images up to this share of a GPU's memory are kept on it (CIFAR-10: 150 MB)

# The default training architecture: DDPM's CIFAR-10 U-Net layout (channel_mult 1,2,2,2, attention at
# 16×16, dropout 0.1) in ADM's flags, narrower by default so it trains on a CPU.
DEFAULT_PRETRAIN_FLAGS = {
    "image_size": 32, "num_channels": 64, "channel_mult": "1,2,2,2", "num_res_blocks": 2,
    "attention_resolutions": "16", "num_head_channels": 32, "dropout": 0.1, "use_scale_shift_norm": True,
    "resblock_updown": False, "learn_sigma": False, "noise_schedule": "linear", "diffusion_steps": 1000,
}  # fmt: skip


@dataclass
class PretrainConfig:
    """Everything that shapes the training trajectory (a resumed run must match it)."""

    flags: dict[str, Any]  # guided-diffusion flags of the network and schedule
    batch_size: int = 64
    lr: float = 2e-4
    warmup_steps: int = 500
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    hflip: bool = True
    seed: int = 0
    val_fraction: float = 0.1  # the validation split probes score on, never trained on
    split_seed: int = 0
    vlb_weight: float = 0.001  # improved DDPM's λ for L_vlb (used only with learn_sigma)
    # "uniform": the simple MSE on ε; "min-snr": each sample weighted min(SNR(t), γ)/SNR(t)
    # (Hang et al. 2023, Min-SNR-γ for ε-prediction), which down-weights the easy low-noise steps.
    loss_weighting: str = "uniform"
    snr_gamma: float = 5.0
    data_fingerprint: str = ""
    train_rows: int = 0
    init_from: dict[str, Any] | None = None  # a warm start's source: WarmStart.record()

    def trajectory(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Settings added since runs were first saved; runs (and warm-start segments) that predate them trained
# with these defaults.
ADDED_SETTINGS = {f.name: f.default for f in dataclasses.fields(PretrainConfig) if f.name in ("loss_weighting", "snr_gamma")}


@dataclass
class RunState:
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # one row per logged step
    wall_seconds: float = 0.0
    # The losses (and seconds) since the last logged row: a run stopped between two rows resumes
    # the same average, so loss.csv is the same whatever step it stopped at.
    window: list[float] = field(default_factory=list)
    window_seconds: float = 0.0
    hardware: list[str] = field(default_factory=list)  # what it trained on, one entry per change (a resume elsewhere)


def training_rows(labels: np.ndarray, config: PretrainConfig) -> np.ndarray:
    """Dataset indices trained on: all but the stratified validation split of the whole dataset."""
    is_val = stratified_split(labels, config.val_fraction, config.split_seed)
    return np.flatnonzero(~is_val)


# ------------------------------------------------------------------------------ the model


def zero_init_like_adm(model: ADMUNet) -> ADMUNet:
    """guided-diffusion zero-initialises the last layer of every residual branch and the output
    convolution, so the untrained network is the identity on its skip paths."""
    for module in model.modules():
        if isinstance(module, ResBlock):
            nn.init.zeros_(module.out_layers[-1].weight)
            nn.init.zeros_(module.out_layers[-1].bias)
        elif isinstance(module, AttentionBlock):
            nn.init.zeros_(module.proj_out.weight)
            nn.init.zeros_(module.proj_out.bias)
    nn.init.zeros_(model.out[-1].weight)
    nn.init.zeros_(model.out[-1].bias)
    return model


class EmaAverage:
    """AveragedModel's multi_avg_fn: EMA with guided-diffusion-style warm-up, the decay growing as
    (1+n)/(10+n) up to `decay`, so a short run's EMA is not dominated by its random initialisation.

    n (updates so far) is AveragedModel's device counter read once, then counted on the host by
    the trainer (`updates`): reading the device counter at every update made the host wait for
    the GPU once per parameter tensor per step. All tensors are updated together (foreach), with
    the same operations as averaged + (current − averaged)·(1 − d), so the values are unchanged.
    """

    def __init__(self, decay: float):
        self.decay = decay
        self.updates: int | None = None  # None: read from the device counter at the next update

    def __call__(self, averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        if self.updates is None:
            self.updates = int(num_averaged)
        n = self.updates
        d = min(self.decay, (1 + n) / (10 + n))
        step = torch._foreach_sub(current, averaged)
        torch._foreach_mul_(step, 1 - d)
        torch._foreach_add_(averaged, step)


def snr_weights(abar: torch.Tensor, weighting: str, gamma: float) -> torch.Tensor | None:
    """Per-timestep weights of the ε-MSE: None for uniform; min(SNR, γ)/SNR for min-SNR-γ."""
    if weighting == "uniform":
        return None
    snr = abar / (1 - abar)
    return torch.clamp(snr, max=gamma) / snr


def step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, step, stream]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def batch_rows(num_rows: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Positions (into the training rows) of step `step`: epoch-wise permutations, last partial batch dropped."""
    per_epoch = num_rows // batch_size
    epoch, within = divmod(step, per_epoch)
    order = torch.randperm(num_rows, generator=step_generator(seed, epoch, 0))
    return order[within * batch_size : (within + 1) * batch_size]


# ------------------------------------------------------------------------------ warm start

# Flags a warm start may change: they shape training, not the weights.
TRAINING_ONLY_FLAGS = {"dropout", "use_fp16", "use_checkpoint"}


def flags_over(base: dict[str, Any], given: dict[str, Any], source: str) -> dict[str, Any]:
    """A checkpoint's flags with those given on top: they must agree with it, dropout excepted (one
    error naming every conflict)."""
    mine, merged = normalize_flags(base), normalize_flags({**base, **given})
    differ = [k for k in given if k in mine and k not in TRAINING_ONLY_FLAGS and merged[k] != mine[k]]
    if differ:
        details = ", ".join(f"{k}: checkpoint {mine[k]!r} vs given {merged[k]!r}" for k in differ)
        raise DiffprobeError(f"{source} was trained with other flags ({details}); drop those flags: a warm start keeps "
                             "the architecture of the checkpoint it starts from")  # fmt: skip
    return {**base, **{k: v for k, v in given.items() if k in TRAINING_ONLY_FLAGS}}


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class WarmStart:
    """Weights to start a run from, with the flags and the training they came from (their `.json` sidecar)."""

    path: Path
    weights: dict[str, torch.Tensor]
    flags: dict[str, Any] | None  # None: no sidecar; the run's own flags must fit the weights
    step: int  # the step counter the weights were saved at (0 when unknown)
    training: list[dict[str, Any]]  # the segments of training behind the weights (see training_segments)
    sha256: str

    @classmethod
    def read(cls, path: str | Path) -> WarmStart:
        path = Path(path)
        if path.name == CHECKPOINT_NAME:
            raise DiffprobeError(f"{path} is a run's training state: to continue that run exactly, pass its folder as --out "
                                 "without --init-from; --init-from takes weights (a run's or a checkpoint's ema.pt)")  # fmt: skip
        weights = read_state_dict(path)
        flags = sidecar_flags(path)
        side = json.loads(path.with_suffix(".json").read_text()) if flags is not None else {}
        step = int(side.get("step", 0)) if isinstance(side, dict) else 0
        training = side.get("training") if isinstance(side, dict) else None
        if training is None:  # a sidecar of diffprobe 0.2 or older: the step count is all it says
            training = [{"steps": step, "batch_size": None, "images_seen": None, "hours": None, "hardware": None}] if step else []
        return cls(path, weights, flags, step, training, file_sha256(path))

    def record(self) -> dict[str, Any]:
        return {"path": str(self.path), "sha256": self.sha256, "step": self.step, "training": self.training}


def training_segments(config: dict[str, Any], state: dict[str, Any]) -> list[dict[str, Any]]:
    """The training behind a run's weights, one segment per warm start and the run's own last:
    steps, batch size, images seen (steps × batch), hours, hardware. Sums of these are the
    cumulative cost a card reports."""
    init = config.get("init_from") or {}
    steps = int(state["step"]) - int(init.get("step", 0))
    own = {"steps": steps, "batch_size": config["batch_size"], "images_seen": steps * config["batch_size"],
           "hours": (state["wall_seconds"] + state.get("window_seconds", 0.0)) / 3600,
           "hardware": "; then ".join(state.get("hardware") or []) or None,
           **{k: config.get(k, default) for k, default in ADDED_SETTINGS.items()}}  # fmt: skip
    if init:
        own["warm_start"] = {"path": init["path"], "sha256": init["sha256"], "step": init["step"]}
    return [*init.get("training", []), own]


# ------------------------------------------------------------------------------ the trainer


class Trainer:
    def __init__(self, config: PretrainConfig, images: torch.Tensor, out: Path, device: str = "cpu",
                 precision: str = "auto", channels_last: bool | None = None):  # fmt: skip
        self.config, self.images, self.out = config, images, Path(out)
        self.device = resolve_device(device)
        if self.device.type == "cuda" and images.numel() * images.element_size() <= DEVICE_IMAGES_SHARE * torch.cuda.get_device_properties(self.device).total_memory:
            self.images = images.to(self.device)  # decoded uint8 images that fit stay on the GPU: no upload per step
        flags = normalize_flags(config.flags)
        self.flags = flags
        self.schedule = NoiseSchedule.named(flags["noise_schedule"], flags["diffusion_steps"])
        self.learn_sigma = flags["learn_sigma"]
        if flags["class_cond"]:
            raise DiffprobeError("pretrain trains unconditional models (class_cond=False); class-conditional training is not supported yet")
        if precision == "auto":  # bf16 only where it is fast: on AVX2-only CPUs it is ~40× slower than fp32
            fast_bf16 = cpu_has_fast_bf16() if self.device.type == "cpu" else torch.cuda.is_bf16_supported()
            precision = "bf16" if fast_bf16 else "fp32"
        if precision not in ("bf16", "fp32"):
            raise DiffprobeError(f"pretrain precision {precision!r}: expected bf16 or fp32 (fp16 needs loss scaling)")
        self.precision = precision
        # Measured for training (benchmarks/pretrain.py, 2-core CPU, 64 channels): bf16 + channels_last
        # 18.4 img/s vs bf16 alone 20.1, so channels_last is opt-in.
        self.channels_last = bool(channels_last)
        torch.manual_seed(config.seed)
        self.model = zero_init_like_adm(ADMUNet(architecture_from_flags(flags))).to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema_average = EmaAverage(config.ema_decay)
        self.ema = torch.optim.swa_utils.AveragedModel(self.model, multi_avg_fn=self.ema_average)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        warm = max(1, config.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warm))
        if config.loss_weighting not in LOSS_WEIGHTINGS:
            raise DiffprobeError(f"loss weighting {config.loss_weighting!r}: expected one of {', '.join(LOSS_WEIGHTINGS)}")
        self.abar = torch.from_numpy(self.schedule.alphas_cumprod).float().to(self.device)
        self.sample_weights = snr_weights(self.abar, config.loss_weighting, config.snr_gamma)
        self.state = RunState()

    # -- checkpoints

    def save(self) -> None:
        """Training state (atomically), plus the EMA and raw weights as guided-diffusion state_dicts."""
        blob = {
            "config": self.config.trajectory(),
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "state": dataclasses.asdict(self.state),
        }
        with output_errors(self.out, "--out"):  # e.g. the disk filled up: one line, the last checkpoint kept
            self.out.mkdir(parents=True, exist_ok=True)
            torch_save(blob, self.out / CHECKPOINT_NAME)
            training = training_segments(self.config.trajectory(), dataclasses.asdict(self.state))
            export_weights(self.ema.module, self.flags, self.out / "ema.pt", self.state.step, training=training)
            export_weights(self.model, self.flags, self.out / "model.pt", self.state.step, training=training)
            write_history(self.state.history, self.out)

    def load(self, path: Path) -> None:
        blob = read_training_state(path)
        saved = {**ADDED_SETTINGS, **{RENAMED.get(k, k): v for k, v in blob["config"].items()}}
        differ = [k for k, v in self.config.trajectory().items() if saved.get(k) != v]
        if differ:
            details = "; ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {getattr(self.config, k)!r}" for k in differ)
            raise DiffprobeError(f"{path} was trained with other settings ({details}); use another --out or the same settings")
        self.model.load_state_dict(blob["model"])
        self.ema.load_state_dict(blob["ema"])
        self.ema_average.updates = None  # the loaded counter is read at the next update
        self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        self.state = RunState(**blob["state"])

    def warm_start(self, source: WarmStart) -> None:
        """The source's weights as both the online model and the EMA, the step counter at the source's.
        Optimiser and scheduler stay fresh (see the module docstring for what that costs)."""
        check_state_dict(self.model, source.weights, str(source.path), f"the network of its flags ({source.path.with_suffix('.json')})"
                         if source.flags is not None else "the network of the flags given (it has no .json beside it)",
                         hint="Warm-start from a checkpoint whose .json names the flags it was trained with, or give them with -o")  # fmt: skip
        self.model.load_state_dict(source.weights)  # float16 files load into the float32 model
        self.ema.module.load_state_dict(source.weights)
        # The EMA's decay (1+n)/(10+n) goes on from the recorded step; a step of 0 makes the first update copy.
        self.ema.n_averaged.fill_(source.step)
        self.ema_average.updates = None
        self.state = RunState(step=source.step)

    def reopen_last_row(self, log_every: int) -> None:
        """A run that ended between two log points wrote a short row at its last step; continuing
        it, that row's steps go back into the window so the next row averages the full interval,
        as in a run that never stopped."""
        history = self.state.history
        if history and history[-1]["step"] == self.state.step and self.state.step % log_every and self.state.window:
            history.pop()

    # -- one step

    def loss(self, step: int) -> torch.Tensor:
        cfg = self.config
        positions = batch_rows(len(self.images), cfg.batch_size, cfg.seed, step)
        on_device = self.images.device.type == self.device.type  # moved there whole when it fits (see __init__)
        x0 = to_model_range(self.images[upload(positions, self.device)] if on_device else upload(self.images[positions], self.device))
        gen = step_generator(cfg.seed, step, 1)
        if cfg.hflip:
            flip = torch.rand(len(x0), generator=gen) < 0.5
            x0 = torch.where(upload(flip.view(-1, 1, 1, 1), self.device), x0.flip(-1), x0)
        t = upload(torch.randint(0, self.schedule.num_timesteps, (len(x0),), generator=gen), self.device)
        eps = upload(torch.randn(x0.shape, generator=gen), self.device)  # drawn on the CPU: the same ε on any device
        abar = self.abar[t].view(-1, 1, 1, 1)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
        if self.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        torch.manual_seed(int(step_generator(cfg.seed, step, 2).initial_seed()) & 0x7FFFFFFF)  # dropout
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            out = self.model(x_t, t)
        out = out.float()
        eps_pred, var_values = out.chunk(2, dim=1) if self.learn_sigma else (out, None)
        if self.sample_weights is None:
            mse = F.mse_loss(eps_pred, eps)
        else:
            mse = (self.sample_weights[t] * (eps_pred - eps).square().mean(dim=(1, 2, 3))).mean()
        if not self.learn_sigma:
            return mse
        # Improved DDPM: the bound trains only the variance (mean detached), weighted by λ·T/1000.
        vlb = learned_range_vlb(self.schedule, x0, x_t, t, eps_pred.detach(), var_values).mean()
        return mse + cfg.vlb_weight * vlb * self.schedule.num_timesteps / 1000.0

    def step(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step on step `step`'s batch (clipped, scheduled, EMA updated): (loss, grad norm).
        The step counter and logging are the caller's (`train`; the benchmarks time this alone)."""
        loss = self.loss(step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        if self.ema_average.updates is None:
            self.ema_average.updates = int(self.ema.n_averaged)  # once: counted on the host from here
        self.ema.update_parameters(self.model)
        self.ema_average.updates += 1
        return loss, grad_norm

    def train(self, total_steps: int, save_every: int, log_every: int = 10) -> RunState:
        self.model.train()
        start = self.state.step
        if start >= total_steps:
            return self.state
        stop: dict[str, str] = {"now": ""}

        def request_stop(signum, frame):
            # Finish the step, save, exit: a Ctrl-C between optimizer.step() and the step counter
            # would save weights one step ahead of the state that claims them.
            stop["now"] = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"

        previous_term = signal.signal(signal.SIGTERM, request_stop)
        previous_int = signal.signal(signal.SIGINT, request_stop)
        hardware = describe_hardware(self.device, self.precision)
        if not self.state.hardware or self.state.hardware[-1] != hardware:
            self.state.hardware.append(hardware)
        bar = tqdm(total=total_steps, initial=start, desc="pretrain", unit="step", mininterval=2)
        state = self.state
        self.reopen_last_row(log_every)
        tick = time.perf_counter()

        losses: list[torch.Tensor] = []  # this window's losses, still on the device: read at a row or a save, not every step

        def read_losses() -> None:
            if losses:
                state.window.extend(torch.stack(losses).tolist())
                losses.clear()

        def save() -> None:
            nonlocal tick
            read_losses()
            now = time.perf_counter()
            state.window_seconds += now - tick
            tick = now
            self.save()

        try:
            for step in range(start, total_steps):
                loss, grad_norm = self.step(step)
                state.step = step + 1
                losses.append(loss.detach())
                if state.step % log_every == 0 or state.step == total_steps:
                    read_losses()
                    now = time.perf_counter()
                    seconds = state.window_seconds + now - tick
                    row = {"step": state.step, "loss": float(np.mean(state.window)), "grad_norm": float(grad_norm),
                           "lr": self.scheduler.get_last_lr()[0],
                           "img_per_s": len(state.window) * self.config.batch_size / seconds}  # fmt: skip
                    state.history.append(row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['img_per_s']:.1f}")
                    if state.step % log_every == 0:  # a short last row keeps its window for a continuation
                        state.wall_seconds += seconds
                        state.window, state.window_seconds, tick = [], 0.0, now
                bar.update(1)
                if state.step % save_every == 0 or state.step == total_steps or stop["now"]:
                    save()
                    if stop["now"]:
                        if stop["now"] == "Ctrl-C":
                            log.warning("stopped by %s at step %d; checkpoint saved, rerun to resume", stop["now"], state.step)
                        break
        finally:
            bar.close()
            signal.signal(signal.SIGTERM, previous_term)
            signal.signal(signal.SIGINT, previous_int)
        if stop["now"] == "Ctrl-C":
            raise KeyboardInterrupt
        if stop["now"] == "SIGTERM" and state.step < total_steps:  # not finished: never the success line and exit 0
            raise Stopped(signal.SIGTERM, f"stopped by SIGTERM at step {state.step} of {total_steps}; the training state "
                                          f"is saved in {self.out}: rerun the same command to resume")  # fmt: skip
        return state


def export_weights(model: nn.Module, flags: dict[str, Any], path: Path, step: int, half: bool = False,
                   training: list[dict[str, Any]] | None = None) -> None:  # fmt: skip
    """A plain guided-diffusion state_dict and its flags sidecar: `load_backbone("adm:PATH")` needs nothing else.
    The sidecar also carries the training behind the weights (`training_segments`), which a warm start reads."""
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch_save(state, path)
    sidecar = {"flags": {k: v for k, v in flags.items() if k not in ("use_fp16", "use_checkpoint")}, "step": step,
               "trained_with": "diffprobe pretrain", "training": training or []}  # fmt: skip
    write_json(path.with_suffix(".json"), sidecar)


def write_history(history: list[dict[str, float]], out: Path) -> None:
    """loss.csv and loss.png (raw points and a smoothed line)."""
    if not history:
        return
    from .._io import write_csv
    from ..report import loss_curve

    write_csv(out / "loss.csv", history)
    loss_curve(out / "loss.png", history)


def saved_config(out: str | Path) -> dict[str, Any] | None:
    """The config of the run in `out` (from its training state), or None when it has none."""
    checkpoint = Path(out) / CHECKPOINT_NAME
    if not checkpoint.is_file():
        return None
    return read_training_state(checkpoint, mmap=True)["config"]


def read_training_state(path: Path, **kwargs: Any) -> dict[str, Any]:
    """A run's training-state.pt (weights_only=True: a pickle carrying code is refused, never run); a
    damaged one is one line saying how to go on from the weights the run exported with it."""
    ema = path.parent / "ema.pt"
    recover = (f"move it aside and rerun with --init-from {ema} to go on from the weights saved with it (a warm start: "
               "fresh optimiser, not an exact continuation), or without --init-from to start over" if ema.is_file()
               else "move it aside and rerun to start the run over")  # fmt: skip
    blob = load_torch_file(path, "training state", recover, **kwargs)  # on the CPU: load_state_dict moves it
    if not isinstance(blob, dict) or not {"config", "model", "ema", "optimizer", "scheduler", "state"} <= set(blob):
        raise DiffprobeError(f"{path} is not a diffprobe training state (expected config, weights, optimiser and state); {recover}")
    return blob


# Each numeric setting: (test, what it expects), named by its CLI flag.
_CHECKS = {
    "steps": (lambda v: v >= 1, "the total number of optimiser steps, at least 1"),
    "save_every": (lambda v: v >= 1, "a checkpoint every N steps, N at least 1"),
    "batch_size": (lambda v: v >= 1, "at least 1"),
    "lr": (lambda v: math.isfinite(v) and v > 0, "a learning rate above 0 (e.g. 2e-4)"),
    "warmup_steps": (lambda v: v >= 0, "0 or more warm-up steps"),
    "weight_decay": (lambda v: math.isfinite(v) and v >= 0, "0 or more"),
    "grad_clip": (lambda v: math.isfinite(v) and v > 0, "a gradient-norm bound above 0 (e.g. 1.0)"),
    "ema_decay": (lambda v: 0 <= v < 1, "a decay in [0, 1) (e.g. 0.9999)"),
    "snr_gamma": (lambda v: math.isfinite(v) and v > 0, "γ above 0 (e.g. 5)"),
}
_FLAGS = {"warmup_steps": "--warmup"}


def check_settings(steps: int, save_every: int, settings: dict[str, Any]) -> None:
    """One line for the first setting outside its range, before any data is read or file written."""
    for name, value in {"steps": steps, "save_every": save_every, **settings}.items():
        if name in _CHECKS and value is not None:
            ok, expected = _CHECKS[name]
            if not ok(value):
                flag = _FLAGS.get(name, "--" + name.replace("_", "-"))
                raise DiffprobeError(f"{flag} {value}: expected {expected}")


def pretrain(data: LabeledImages, out: str | Path, flags: dict[str, Any], steps: int, save_every: int = 500,
             device: str = "cpu", precision: str = "auto", channels_last: bool | None = None, log_every: int = 10,
             init_from: str | Path | None = None, defaults: dict[str, Any] | None = None, **settings: Any) -> Trainer:  # fmt: skip
    """Train (or resume) a run in `out`; returns the trainer after `steps` total steps.

    `flags` are the network's guided-diffusion flags, over `defaults` (the CLI passes
    DEFAULT_PRETRAIN_FLAGS) where no checkpoint names them. `init_from`: warm-start a new run from
    these weights (see the module docstring); the network's flags are then the checkpoint's
    (its `.json`), and `flags` given must agree with them (dropout may differ). `steps` counts the
    checkpoint's steps too.

    An `out` that already holds a training state resumes exactly from it, warm-started or not;
    `init_from` is then ignored if that run was warm-started from the same file (same sha256:
    rerunning the same command resumes), and refused otherwise.
    """
    check_settings(steps, save_every, settings)
    out = Path(out)
    checkpoint = out / CHECKPOINT_NAME
    if init_from is not None and not Path(init_from).is_file():
        raise DiffprobeError(f"--init-from {init_from}: no such file (expected weights such as checkpoints/diffprobe-cifar10/ema.pt)")
    saved = saved_config(out)
    prior = saved.get("init_from") if saved else None
    source, record = None, prior
    if saved and init_from is not None:
        if not prior or prior["sha256"] != file_sha256(init_from):
            began = (f"was warm-started from {prior['path']} (sha256 {prior['sha256'][:12]}…; {init_from} differs)" if prior
                     else "was not warm-started")  # fmt: skip
            raise DiffprobeError(f"{out} already holds a training state ({checkpoint.name}) that {began}: drop --init-from "
                                 f"to resume it exactly, or pass a new --out to warm-start from {init_from}")  # fmt: skip
        log.warning("%s resumes from its own %s; --init-from %s was applied when it began", out, CHECKPOINT_NAME, init_from)
    if prior:  # resuming a warm-started run: the network is the one it began with
        flags = flags_over(saved["flags"], flags, f"{out} (warm-started from {prior['path']})")
    elif init_from is not None and not saved:
        source = WarmStart.read(init_from)
        if source.flags is not None:
            flags = flags_over(source.flags, flags, f"--init-from {source.path}")
        else:
            flags = {**(defaults or {}), **flags}
        record = source.record()
        if steps <= source.step:
            raise DiffprobeError(f"{init_from} is at step {source.step} and --steps counts those steps too: "
                                 f"pass more than {source.step} (e.g. {source.step + 1000} for 1000 more)")  # fmt: skip
    else:
        flags = {**(defaults or {}), **flags}
    image_size = architecture_from_flags(flags).image_size  # flags that cannot build a network fail before any decoding
    config = PretrainConfig(flags=dict(flags), init_from=record, **settings)
    rows = training_rows(data.labels, config)
    config.data_fingerprint, config.train_rows = data.fingerprint(), int(len(rows))
    if len(rows) < config.batch_size:
        raise DiffprobeError(f"{len(rows)} training images is fewer than one batch of {config.batch_size}: lower --batch-size or use more images")
    images = images_uint8(data, rows, image_size)
    trainer = Trainer(config, images, out, device, precision, channels_last)
    if checkpoint.is_file():
        trainer.load(checkpoint)
        log.warning("resuming %s from step %d", out, trainer.state.step)
    else:
        if source is not None:
            trainer.warm_start(source)
            log.warning("warm start from %s (step %d, sha256 %s…): fresh optimiser, EMA = online weights = its EMA",
                        source.path, source.step, source.sha256[:12])  # fmt: skip
        output_dir(out)
        write_json(out / "config.json", config.trajectory())
    params = sum(p.numel() for p in trainer.model.parameters())
    log.warning("training %.2fM parameters on %d images (%s, %s)", params / 1e6, len(rows), trainer.device, trainer.precision)
    trainer.train(steps, save_every, log_every)
    return trainer
