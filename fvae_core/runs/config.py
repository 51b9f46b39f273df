"""Run configs: typed, validated before any compute, with presets that override a few fields.

A :class:`RunConfig` holds everything a run needs: the stage and model, the init weights, the data,
the recipe (:class:`fvae_core.train_steps.RecipeConfig`), batch and step counts, logging cadence,
fault handling and devices. ``fvae train --config PRESET --set key=value ...`` resolves a preset,
applies dotted overrides (``recipe.lr=1e-5``, ``data.crop=128``, ``steps=500``) with the field's
type, validates the result, and stores it as ``config.json`` in the run directory;
``fvae train --resume DIR`` reads it back.

Presets (:data:`PRESETS`), each a small override of the defaults:

``smoke``
    seconds on a CPU; used by tests (the ``micro`` model, no LPIPS, 32 px crops, batch 2, 6 steps, the
    bundled photos; the critic warms up for 3 steps, then the adversarial phase).
``tiny-cpu`` / ``tiny-cpu-finetune``
    an SD-shaped autoencoder (f=8, 4 latent channels, ``tiny-sd``) pretrained from scratch with the
    LDM recipe on the bundled OpenMoji + photos, then decoder-finetuned with the card's recipe from
    those weights, in minutes on 2 CPU cores.
``small-cpu`` / ``small-cpu-finetune``
    the committed base in the card's regime: ``small-sd`` (f=8, 4 latent channels, 6.8 M parameters),
    the same LDM pretrain recipe and data, 4,000 steps (about two hours on 2 CPU cores); and the card's
    decoder recipe from ``weights/small-cpu``, what the notebook suite trains.
``sd-vae-ft-mse``
    the card's run: init ``stabilityai/sd-vae-ft-mse``, 256 px crops, batch 32, 150k steps, EMA,
    bf16 compute; meant for a GPU.
ablations
    ``sd-vae-ft-mse/<name>``: the card's run with one recipe change (:data:`ABLATIONS`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path

from fvae_core.data.augment import AugmentConfig
from fvae_core.train_steps import LDM_PRETRAIN, RecipeConfig, ema_decay_for_batch

__all__ = ["ABLATIONS", "ConfigError", "DataConfig", "PRESETS", "RunConfig", "apply_overrides", "from_dict",
           "load_config", "preset", "to_dict"]


class ConfigError(ValueError):
    """A run config is invalid; the message is one line."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # A prepared folder (`fvae data prepare`), or None to prepare `sources` into the cache on first use.
    prepared: str | None = None
    sources: tuple[str, ...] = ("openmoji", "photos")
    render_size: int = 512  # OpenMoji render size when preparing
    min_side: int = 0  # prepare: drop images whose short side is below this (0: keep all; the crop decides)
    crop: int = 256
    min_scale: float = 0.25
    max_scale: float = 1.0
    upsample_small: bool = False
    val_scales: tuple[float, ...] = (1.0, 0.5)
    workers: int = 0  # grain worker processes (0: in the training process)

    def augment(self) -> AugmentConfig:
        return AugmentConfig(crop=self.crop, min_scale=self.min_scale, max_scale=self.max_scale,
                             upsample_small=self.upsample_small, val_scales=self.val_scales)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    name: str = "custom"
    # model: the architecture preset a pretrain builds; a finetune takes the architecture of `init`
    model: str | None = None
    init: str | None = None  # finetune: VAE weights (folder, hub id, single file, or a run dir's export)
    recipe: RecipeConfig = RecipeConfig()
    data: DataConfig = DataConfig()
    lpips_net: str = "vgg16"  # LPIPS backbone: vgg16 (LDM's) or alexnet (cheaper)
    batch_size: int = 32  # images per optimiser step (all devices, all accumulation micro-batches)
    grad_accum: int = 1  # micro-batches per step
    steps: int = 150_000
    seed: int = 0
    log_every: int = 50
    eval_every: int = 5000
    eval_batches: int = 8  # validation batches per evaluation (of batch_size / grad_accum images)
    sample_every: int = 5000
    sample_count: int = 4  # images in the sample grid
    ckpt_every: int = 2500
    keep_ckpts: int = 3
    max_nonfinite: int = 10  # consecutive skipped (non-finite) steps before the run stops
    # train steps per compiled call (lax.scan); 0: auto (train_steps.default_steps_per_call: 4 or 2 on the
    # CPU, whichever divides the steps the run stops at; 1 elsewhere). Must divide eval_every, sample_every
    # and ckpt_every.
    steps_per_call: int = 0
    devices: int = 0  # data-parallel devices (0: all)
    param_sharding: bool = False  # shard large params over the devices too (FSDP-style)
    export: tuple[str, ...] = ("diffusers", "single-file")
    export_dtype: str = "fp32"

    # ---- validation (no compute, no I/O) -------------------------------------------------------------
    def __post_init__(self):
        from fvae_core.autoencoder import PRESET_CONFIGS

        def bad(msg):
            raise ConfigError(msg)

        for name in ("batch_size", "grad_accum", "steps", "log_every", "eval_every", "eval_batches",
                     "sample_every", "ckpt_every", "keep_ckpts", "max_nonfinite"):
            if getattr(self, name) < 1:
                bad(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.devices < 0:
            bad(f"devices must be >= 0, got {self.devices}")
        if self.steps_per_call < 0:
            bad(f"steps_per_call must be >= 0 (0: auto), got {self.steps_per_call}")
        for name in ("eval_every", "sample_every", "ckpt_every"):
            if self.steps_per_call and getattr(self, name) % self.steps_per_call:
                bad(f"steps_per_call {self.steps_per_call} must divide {name} {getattr(self, name)} "
                    f"(a call's steps run without a break; 0 picks a value that does)")
        if self.batch_size % self.grad_accum:
            bad(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if self.recipe.stage == "pretrain":
            if self.model not in PRESET_CONFIGS:
                bad(f"a pretrain needs model = one of {', '.join(PRESET_CONFIGS)}, got {self.model!r}")
            if self.init:
                bad("a pretrain starts from random weights; init must be empty")
        else:
            if not self.init:
                bad("a finetune needs init weights (set init=...)")
            if self.model is not None:
                bad("a finetune takes its architecture from init; model must be empty")
        if not set(self.export) <= {"diffusers", "single-file"}:
            bad(f"export must be a subset of diffusers, single-file, got {list(self.export)}")
        if self.lpips_net not in ("vgg16", "alexnet"):
            bad(f"lpips_net must be vgg16 or alexnet, got {self.lpips_net!r}")
        if self.export_dtype not in ("fp32", "fp16"):
            bad(f"export_dtype must be fp32 or fp16, got {self.export_dtype!r}")
        try:
            self.data.augment()
        except ValueError as e:
            bad(f"data: {e}")
        if self.sample_count > self.micro_batch:
            bad(f"sample_count {self.sample_count} exceeds the micro-batch {self.micro_batch}")

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.grad_accum


# ---- dict round trip with types checked ------------------------------------------------------------------
def to_dict(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(cls, d: dict, where: str = ""):
    """Build a dataclass from a dict, refusing unknown keys and wrong types (one-line ConfigError)."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(where + k for k in unknown)}; "
                          f"valid: {', '.join(sorted(fields))}")
    kw = {k: _coerce(hints[k], v, where + k) for k, v in d.items()}
    try:
        return cls(**kw)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where.rstrip('.') or cls.__name__}: {e}") from e


def _coerce(tp, value, key):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} is not a {_name(tp)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item, *_rest) = typing.get_args(tp)
        return tuple(_coerce(item, v, key) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # JSON's NaN, Infinity, or 1e400: would train into NaN weights
                raise ConfigError(f"{key}: {value!r} is not a finite number")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: {value!r} is not a {_name(tp)}")


def _name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def apply_overrides(cfg, overrides):
    """Apply ``key=value`` strings (dotted keys; values parsed as JSON, else taken as a string) to a config
    dataclass (a :class:`RunConfig`, or another run's, such as the latent model's)."""
    d = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        node, parts = d, key.strip().split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"--set {key}: {p!r} is not a config section")
            node = node[p]
        if parts[-1] not in node:
            raise ConfigError(f"--set {key}: unknown config key")
        node[parts[-1]] = value
    return from_dict(type(cfg), d)


def load_config(path) -> RunConfig:
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable config ({e})") from e
    return from_dict(RunConfig, d)


# ---- presets ----------------------------------------------------------------------------------------------
_CARD = RunConfig(
    name="sd-vae-ft-mse", init="stabilityai/sd-vae-ft-mse",
    recipe=RecipeConfig(disc_start=5000, critic_start=4000, ema_decay=ema_decay_for_batch(32),
                        compute_dtype="bfloat16"),
    data=DataConfig(crop=256), batch_size=32, steps=150_000)

_TINY_DATA = DataConfig(render_size=128, crop=64, min_scale=0.35, val_scales=(1.0, 0.5), min_side=64)

PRESETS: dict[str, RunConfig] = {
    "smoke": RunConfig(
        name="smoke", model="micro",
        recipe=dataclasses.replace(LDM_PRETRAIN, lr=1e-3, critic_lr=1e-3, critic_start=0, disc_start=3,
                                   critic_ndf=8, lpips_weight=0.0, ema_decay=0.9),
        data=DataConfig(sources=("photos",), crop=32, min_scale=0.1, val_scales=(0.1,)),
        batch_size=2, steps=6, log_every=1, eval_every=3, eval_batches=1, sample_every=3, sample_count=2,
        ckpt_every=2, keep_ckpts=2, export_dtype="fp32"),
    "tiny-cpu": RunConfig(
        name="tiny-cpu", model="tiny-sd", lpips_net="alexnet",
        recipe=dataclasses.replace(LDM_PRETRAIN, lr=5e-4, critic_lr=2e-4, critic_start=600, disc_start=700,
                                   critic_ndf=32, ema_decay=0.995),
        data=_TINY_DATA, batch_size=8, steps=900, log_every=25, eval_every=300, eval_batches=4,
        sample_every=300, ckpt_every=300),
    # The base in the regime (issue 27): small-sd (6.8 M), lr and steps from learning curves on 2 CPU cores,
    # the adversarial phase over the last 25% of the steps; ~2 h. weights/small-cpu/RECORD.json has the run.
    "small-cpu": RunConfig(
        name="small-cpu", model="small-sd", lpips_net="alexnet",
        recipe=dataclasses.replace(LDM_PRETRAIN, lr=4e-4, critic_lr=2e-4, critic_start=3000, disc_start=3200,
                                   critic_ndf=32, ema_decay=0.995),
        data=_TINY_DATA, batch_size=8, steps=4000, log_every=25, eval_every=250, eval_batches=4,
        sample_every=1000, ckpt_every=250, keep_ckpts=2, export_dtype="fp16"),
    "tiny-cpu-finetune": RunConfig(
        name="tiny-cpu-finetune", init="weights/tiny-cpu", lpips_net="alexnet",
        recipe=RecipeConfig(lr=1e-4, critic_lr=1e-4, warmup_steps=20, critic_start=0, disc_start=100,
                            critic_ndf=32, mae_schedule_steps=300,
                            ema_decay=0.99),  # the card's batch-scaled 0.99996 averages ~24k steps: too slow for 300
        data=_TINY_DATA, batch_size=8, steps=300, log_every=25, eval_every=150, eval_batches=4,
        sample_every=150, ckpt_every=150),
    # The suite's finetune (issue 27): the card's recipe from the committed base in the regime. Steps from
    # measured effect-vs-steps curves (docs/training.md, "Choosing the finetune length"); schedule and GAN
    # scale with them.
    # Checkpoints every 100 steps, so every stop divides by 4 and the CPU runs 4 steps per call, not 2.
    "small-cpu-finetune": RunConfig(
        name="small-cpu-finetune", init="weights/small-cpu", lpips_net="alexnet",
        recipe=RecipeConfig(lr=1e-4, critic_lr=1e-4, warmup_steps=20, critic_start=0, disc_start=100,
                            critic_ndf=32, mae_schedule_steps=300, ema_decay=0.99),
        data=_TINY_DATA, batch_size=8, steps=300, log_every=25, eval_every=300, eval_batches=4,
        sample_every=300, ckpt_every=100),
    "sd-vae-ft-mse": _CARD,
}

#: The card's run with one recipe change each: ``--config sd-vae-ft-mse/<name>``.
ABLATIONS: dict[str, dict] = {
    "mse-only": {"mae_schedule": False, "w_mae": 0.0, "w_mse": 1.0},
    "mae-only": {"mae_schedule": False, "w_mae": 1.0, "w_mse": 0.0},
    "srgb-loss": {"loss_space": "srgb", "critic_space": "srgb"},
    "no-gan": {"gan": "none"},
    "hinge-gan": {"gan": "hinge", "critic_norm": "none"},
    "no-lpips": {"lpips_weight": 0.0},
}
for _name_, _change in ABLATIONS.items():
    PRESETS[f"sd-vae-ft-mse/{_name_}"] = dataclasses.replace(
        _CARD, name=f"sd-vae-ft-mse/{_name_}", recipe=dataclasses.replace(_CARD.recipe, **_change))


def preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]


def smoke_variant(cfg: RunConfig, steps: int = 3) -> RunConfig:
    """``cfg``'s recipe on a few tiny steps (the ``smoke`` preset's data, 32² crops, batch 2): what the
    notebooks run in SMOKE mode and the tests execute (big_vision's ``runlocal`` idea). The GAN phase
    starts at step 0, so every part of the step (pixel loss, LPIPS, critic, adaptive weight, EMA) runs
    and only one step function is compiled."""
    rec = dataclasses.replace(cfg.recipe, warmup_steps=0, critic_start=0, disc_start=0,
                              mae_schedule_steps=steps)
    return dataclasses.replace(cfg, name=f"{cfg.name}/smoke", recipe=rec, data=PRESETS["smoke"].data, batch_size=2,
                               grad_accum=1, steps=steps, log_every=1, eval_every=steps, eval_batches=1,
                               sample_every=steps, sample_count=2, ckpt_every=steps, keep_ckpts=1)
