"""``fvae latents train``: a rectified-flow UNet on a VAE's latents, with the run machinery of
:mod:`fvae_core.runs` (typed config and ``--set`` overrides, orbax checkpoints, exact resume, EMA,
``metrics.jsonl`` + TensorBoard, an environment record) (issue 28).

A run directory holds ``config.json``, ``environment.json``, ``posteriors.npz`` (the encoded training crops,
written once), ``metrics.jsonl``, ``checkpoints/`` and, at the end, ``model/`` (:func:`export`): the EMA
weights as safetensors and ``latent_model.json`` (the UNet config, the latent shape, the measured scaling
factor and the VAE it belongs to).

Every step is a pure function of the state and the step number: the batch indices come from a permutation
of the crops drawn per epoch from ``(seed, epoch)``, and the noise, times and posterior samples from
``fold_in(PRNGKey(seed), step)``, so a resumed run continues bit-exactly.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fvae_core.latents import flow
from fvae_core.latents.data import Posteriors, encode_posteriors
from fvae_core.latents.unet import LatentUNet, UNetConfig, param_count
from fvae_core.runs.config import ConfigError, DataConfig, from_dict, to_dict

MODEL_FILE = "latent_model.json"
WEIGHTS_FILE = "unet.safetensors"
#: Stored dtypes of an exported model; it is always loaded (and sampled) in float32.
EXPORT_DTYPES = {"fp32": np.float32, "fp16": np.float16}


@dataclasses.dataclass(frozen=True)
class LatentRunConfig:
    name: str = "latent-flow"
    vae: str = "weights/small-cpu"  # the VAE whose latents are modelled (folder, single file or hub id)
    # Whole OpenMoji renders at 64² (the 128 px render at scale 0.5): 8x8x4 latents.
    data: DataConfig = DataConfig(sources=("openmoji",), render_size=128, crop=64, min_scale=0.5, max_scale=0.5,
                                  min_side=64, val_scales=(0.5,))
    passes: int = 4  # augmented epochs encoded once (rotations and flips differ per pass)
    unet: UNetConfig = UNetConfig()
    time_sampling: str = "logit-normal"
    batch_size: int = 64
    steps: int = 4000
    lr: float = 3e-4
    warmup_steps: int = 200
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 500
    keep_ckpts: int = 2
    sample_steps: int = 30  # sampler steps for samples and the exported default
    sampler: str = "heun"
    export_dtype: str = "fp32"  # "fp16" halves the file (the committed weights/latent-flow)

    def __post_init__(self):
        def bad(msg):
            raise ConfigError(f"latent config: {msg}")

        for k in ("passes", "batch_size", "steps", "log_every", "ckpt_every", "keep_ckpts", "sample_steps"):
            if getattr(self, k) < 1:
                bad(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.warmup_steps < 0 or not self.lr > 0 or not self.grad_clip > 0:
            bad(f"need warmup_steps >= 0, lr > 0 and grad_clip > 0, got {self.warmup_steps}, {self.lr}, "
                f"{self.grad_clip}")
        if not 0.0 <= self.ema_decay < 1.0:
            bad(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.time_sampling not in ("uniform", "logit-normal"):
            bad(f"time_sampling must be 'uniform' or 'logit-normal', got {self.time_sampling!r}")
        if self.export_dtype not in EXPORT_DTYPES:
            bad(f"export_dtype must be one of {', '.join(EXPORT_DTYPES)}, got {self.export_dtype!r}")
        if self.sampler not in flow.METHODS:
            bad(f"sampler must be one of {', '.join(flow.METHODS)}, got {self.sampler!r}")


PRESETS = {
    "latent-flow": LatentRunConfig(),
    # seconds: the tests' and the notebooks' SMOKE run
    "latent-smoke": LatentRunConfig(
        name="latent-smoke", passes=1,
        unet=UNetConfig(widths=(16, 32), blocks=1, attention=(False, False), groups=8, heads=2, time_dim=32),
        batch_size=8, steps=6, log_every=1, ckpt_every=3, sample_steps=4,
        data=DataConfig(sources=("photos",), crop=32, min_scale=0.25, max_scale=0.25, val_scales=(0.25,))),
}


def _optimizer(cfg: LatentRunConfig):
    sched = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), optax.adam(sched))


def init_state(cfg: LatentRunConfig, latent_hw: tuple[int, int]) -> dict:
    key = jax.random.PRNGKey(cfg.seed)
    x = jnp.zeros((1, *latent_hw, cfg.unet.channels), jnp.float32)
    params = jax.jit(LatentUNet(cfg.unet).init)(key, x, jnp.zeros((1,)))["params"]
    ema = jax.tree_util.tree_map(jnp.copy, params)  # its own buffers: the step donates the state
    return {"params": params, "opt": _optimizer(cfg).init(params), "ema": ema, "step": jnp.zeros((), jnp.int32)}


def make_train_step(cfg: LatentRunConfig):
    """``step(state, mean, std, scale, key) -> (state, metrics)``: one flow-matching update on the scaled
    posterior samples of a batch of crops, then the EMA. Built once per set of the fields it depends on."""
    return _train_step(dataclasses.replace(cfg, name="", vae="", data=DataConfig(), passes=1, steps=1, log_every=1,
                                           ckpt_every=1, seed=0))


@functools.lru_cache(maxsize=8)
def _train_step(cfg: LatentRunConfig):
    model, opt = LatentUNet(cfg.unet), _optimizer(cfg)

    def loss_fn(params, x0, key):
        k_eps, k_t = jax.random.split(key)
        eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
        t = flow.sample_times(k_t, x0.shape[0], cfg.time_sampling)
        v = model.apply({"params": params}, flow.interpolate(x0, eps, t), t)
        return flow.flow_matching_loss(v, x0, eps).mean()

    def step(state, mean, std, scale, key):
        k_post, k_loss = jax.random.split(key)
        x0 = (mean + std * jax.random.normal(k_post, mean.shape, mean.dtype)) * scale
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], x0, k_loss)
        updates, opt_state = opt.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ema = jax.tree_util.tree_map(lambda e, p: cfg.ema_decay * e + (1 - cfg.ema_decay) * p, state["ema"], params)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "update_norm": optax.tree.norm(updates)}
        return {"params": params, "opt": opt_state, "ema": ema, "step": state["step"] + 1}, metrics

    return jax.jit(step, donate_argnums=(0,))


def batch_indices(n: int, batch: int, seed: int, step: int) -> np.ndarray:
    """The crops of step ``step`` (0-based): consecutive slices of a permutation drawn per epoch from
    ``(seed, epoch)``; an epoch is ``n // batch`` steps (the remainder of each permutation is unused)."""
    per_epoch = n // batch
    epoch, i = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return np.sort(perm[i * batch:(i + 1) * batch])


def _posteriors(cfg: LatentRunConfig, run_dir: Path, log) -> tuple[Posteriors, float]:
    path = run_dir / "posteriors.npz"
    if path.exists():
        post = Posteriors.load(path)
    else:
        from fvae_core.runs.train import resolve_data
        from fvae_core.weights import load_vae

        from fvae_core.data.loader import DatasetError

        vae = load_vae(cfg.vae)
        try:
            post = encode_posteriors(vae.config, vae.params, resolve_data(cfg, log), cfg.data.augment(),
                                     passes=cfg.passes, seed=cfg.seed, batch=min(32, cfg.batch_size),
                                     meta={"vae": str(cfg.vae)}, log=log)
        except DatasetError as e:
            raise ConfigError(f"data: {e}") from e
        post.save(path)
    scale = post.scaling_factor(cfg.seed)
    return post, scale


def train(cfg: LatentRunConfig, run_dir, *, resume: bool = False, log=print) -> Path:
    """Train (or, with ``resume``, continue) a latent flow model in ``run_dir``; returns the model folder."""
    from fvae_core.runs.checkpoint import Checkpoints
    from fvae_core.runs.log import RunLog, environment_record

    run_dir = Path(run_dir)
    if not resume:
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ConfigError(f"{run_dir}: run directory is not empty (use --resume to continue it)")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
        (run_dir / "environment.json").write_text(json.dumps(environment_record(), indent=1, default=str))
    post, scale = _posteriors(cfg, run_dir, log)
    if len(post) < cfg.batch_size:
        raise ConfigError(f"{len(post)} encoded crops, fewer than one batch of {cfg.batch_size}")
    hw = post.mean.shape[1:3]
    if hw[0] % cfg.unet.multiple or hw[1] % cfg.unet.multiple:
        raise ConfigError(f"latents of {hw[0]}x{hw[1]} are not a multiple of the UNet's {cfg.unet.multiple}")
    state = init_state(cfg, hw)
    ckpts = Checkpoints(run_dir / "checkpoints", cfg.keep_ckpts)
    start = 0
    if resume:
        state, extra = ckpts.restore_verified(state, log)
        start = int(state["step"])
        log(f"resumed at step {start}")
    runlog = RunLog(run_dir, resume_step=start if resume else None)
    log(f"latent model: {param_count(state['params']) / 1e6:.2f} M params, {len(post)} crops of latents "
        f"{hw[0]}x{hw[1]}x{post.mean.shape[3]}, scaling factor {scale:.5f}")
    step_fn = make_train_step(cfg)
    key = jax.random.PRNGKey(cfg.seed)
    mean, std = jnp.asarray(post.mean), jnp.asarray(post.std)
    t0 = time.time()
    for s in range(start, cfg.steps):
        idx = jnp.asarray(batch_indices(len(post), cfg.batch_size, cfg.seed, s))
        state, m = step_fn(state, mean[idx], std[idx], scale, jax.random.fold_in(key, s))
        done = s + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            m = {k: float(v) for k, v in m.items()}
            if not np.isfinite(m["loss"]):
                raise RuntimeError(f"step {done}: non-finite loss; the last checkpoint is kept")
            runlog.scalars(done, dict(m, steps_per_s=(done - start) / max(time.time() - t0, 1e-9)))
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            ckpts.save(done, state, {"scale": scale})
    ckpts.close()
    runlog.close()
    return export(cfg, jax.device_get(state["ema"]), hw, scale, run_dir / "model")


def export(cfg: LatentRunConfig, params, latent_hw, scale: float, folder) -> Path:
    """The EMA weights (safetensors, ``cfg.export_dtype``) and ``latent_model.json``."""
    meta = {"unet": to_dict(cfg.unet), "latent_hw": list(latent_hw), "scaling_factor": scale,
            "vae": cfg.vae, "sample_steps": cfg.sample_steps, "sampler": cfg.sampler, "run": cfg.name}
    return _write_model(meta, params, folder, cfg.export_dtype)


def _write_model(meta: dict, params, folder, dtype: str) -> Path:
    """Weights and ``latent_model.json`` written to a temporary folder and renamed into place. A weight that
    is not finite in ``dtype`` (beyond fp16's range) is an error, not a silent inf."""
    from safetensors.numpy import save_file

    from fvae_core.data.prepare import move_into_place

    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"export dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    flat = {}
    for path, v in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        with np.errstate(over="ignore"):
            a = np.asarray(v, np.float32).astype(EXPORT_DTYPES[dtype])
        if not np.all(np.isfinite(a)):
            raise ConfigError(f"weight {name} does not fit {dtype} (max |w| {np.max(np.abs(np.asarray(v))):.3g})")
        flat[name] = a
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(flat, str(tmp / WEIGHTS_FILE))
    (tmp / MODEL_FILE).write_text(json.dumps({**meta, "dtype": dtype}, indent=1))
    move_into_place(tmp, folder)
    return folder


def convert_model(src, dst, dtype: str) -> Path:
    """A copy of the exported model ``src`` with its weights stored as ``dtype`` (``fvae latents export``)."""
    m = load_model(src)
    return _write_model({k: v for k, v in m.meta.items() if k != "dtype"}, m.params, dst, dtype)


@dataclasses.dataclass(frozen=True)
class LatentModel:
    config: UNetConfig
    params: dict
    scaling_factor: float
    latent_hw: tuple[int, int]
    meta: dict

    def sample(self, n: int, seed: int, *, steps: int | None = None, method: str | None = None,
               size: tuple[int, int] | None = None) -> np.ndarray:
        """``n`` unscaled latents (NHWC, as ``decode`` takes them), deterministic for ``seed``."""
        h, w = size or self.latent_hw
        noise = jax.random.normal(jax.random.PRNGKey(seed), (n, h, w, self.config.channels))
        run = _sampler(self.config, steps or self.meta["sample_steps"], method or self.meta["sampler"])
        return np.asarray(run(self.params, noise)) / self.scaling_factor


@functools.lru_cache(maxsize=8)
def _sampler(config: UNetConfig, steps: int, method: str):
    model = LatentUNet(config)
    return jax.jit(lambda params, z: flow.sample(lambda x, t: model.apply({"params": params}, x, t), z, steps, method))


def load_model(folder) -> LatentModel:
    from safetensors.numpy import load_file

    folder = Path(folder)
    try:
        meta = json.loads((folder / MODEL_FILE).read_text())
        flat = load_file(str(folder / WEIGHTS_FILE))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{folder}: not a latent model folder ({type(e).__name__}: {e})") from e
    cfg = from_dict(UNetConfig, meta["unet"], "unet.")
    like = init_state(LatentRunConfig(unet=cfg), tuple(meta["latent_hw"]))["params"]
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    names = ["/".join(str(getattr(k, "key", k)) for k in p) for p, _ in leaves]
    missing, extra = sorted(set(names) - set(flat)), sorted(set(flat) - set(names))
    if missing or extra:
        raise ConfigError(f"{folder}: weights do not match the config: missing {missing[:3]}, unexpected {extra[:3]}")
    bad = [n for (n, (_, v)) in zip(names, leaves) if flat[n].shape != v.shape]
    if bad:
        raise ConfigError(f"{folder}: weight shapes differ from the config at {bad[:3]}")
    params = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(flat[n], jnp.float32) for n in names])
    return LatentModel(cfg, params, float(meta["scaling_factor"]), tuple(meta["latent_hw"]), meta)
