"""Pure train steps: the card's decoder finetune and LDM's full-autoencoder pretrain.

A step is ``step(state, batch, rng) -> (state, metrics)``, jitted with the state donated. Generator and
critic have separate updates and separate optimiser states; they live side by side in one
:class:`TrainState` so that one checkpoint holds a run. ``batch["image"]`` is NHWC float32 in the data
range [0, 1] (:mod:`fvae_core.conventions`); the step converts to the model range itself.

The generator update does **one** decoder forward and **one** decoder backward, adversarial weight
included. With ``y`` the decoded image and ``h`` the input of the last conv ``W`` (``decoder.conv_out``):

* ``g_rec = dL_rec/dy`` and ``g_adv = dL_adv/dy`` are image-space cotangents (through LPIPS and the
  critic, not the decoder);
* ``dL/dW = sum_pixels patches(h)^T g`` is cheap for each, giving LDM's adaptive weight
  ``w = r ||dL_rec/dW|| / (||dL_adv/dW|| + eps)``, clamped to [0, 1e4] and not differentiated;
* one VJP through the decoder with ``g_rec + w g_adv`` gives the total gradient (linearity).

The adaptive weight (LDM ``calculate_adaptive_weight``) uses the reconstruction loss without KL, as LDM
does; ``r = 0.5`` is the card's "gradient norm for the discriminator is half that of the reconstruction
loss" (LDM's ``disc_weight`` 0.5 plays the same role).

Phases (static, chosen by the caller from the step number, see :func:`phase_for_step`):
``"rec"`` (no critic), ``"critic-warmup"`` (the critic trains on fakes, the generator ignores it) and
``"adversarial"`` (both; the generator gets ``w * L_adv``). ``"gan"`` is the last two in one program: the
generator's adversarial term is switched on by a traced ``step >= disc_start``, so a run compiles one step
for both (what ``fvae train`` runs, :meth:`Trainer.program_for_step`). A CPU compile of the small-cpu step
takes about 2 minutes, 45% of a 300-step finetune's wall time with two programs; a warm-up step of the
merged program also runs the generator's critic pass (a small PatchGAN forward and backward on the fakes),
whose result it discards. It equals the separate phases to float32 rounding (tests/test_train_steps.py).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from functools import partial
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from fvae_core.autoencoder import AutoencoderKL, VAEConfig
from fvae_core.color import LOSS_SPACES
from fvae_core.conv import conv2d, loop_body
from fvae_core.conventions import from_model_range, to_model_range
from fvae_core.critic import PatchGAN, critic_input, critic_loss_terms, critic_objective, validate_critic
from fvae_core.losses import adaptive_gan_weight, furception_pixel_weights, pixel_loss
from fvae_core.lpips import LPIPSModel, load_lpips, lpips_distance, lpips_input_range_ok

PHASES = ("rec", "critic-warmup", "adversarial", "gan")
STAGES = ("finetune", "pretrain")


@dataclasses.dataclass(frozen=True)
class RecipeConfig:
    """Every knob of the loss and the updates. Defaults are the card's decoder finetune.

    Pixel weights: ``mae_schedule=True`` uses the Furception lead's mix ``s MAE + 5 (1 - s) MSE`` with
    ``s`` cosine 1.0 -> 0.6 over ``mae_schedule_steps`` (:func:`fvae_core.losses.furception_pixel_weights`);
    otherwise the fixed ``w_mae``/``w_mse``. See :data:`fvae_core.losses.LOSS_DEFAULTS` for sources.
    """

    stage: str = "finetune"
    # reconstruction
    loss_space: str = "oklab"
    channel_weights: tuple[float, ...] | None = None
    w_mae: float = 1.0
    w_mse: float = 0.0
    mae_schedule: bool = True
    mae_schedule_steps: int = 100_000
    lpips_weight: float = 1.0
    kl_weight: float = 0.0  # LDM pretrain: 1e-6 (relative to its pixel-summed nll, see _kl_term)
    latent: str = "sample"  # "sample" (LDM) or "mean"
    # adversarial
    gan: str = "wgan-gp"  # "wgan-gp" | "hinge" | "ns-r1" | "none"
    critic_norm: str = "layer"
    critic_space: str = "oklab"
    critic_ndf: int = 64
    penalty_weight: float | None = None  # None: the objective's default (GP 10, R1 10)
    drift_weight: float = 0.0
    adaptive_ratio: float = 0.5
    adaptive_eps: float = 1e-4
    adaptive_max: float = 1e4
    critic_start: int = 0  # the critic trains from here (warm-up) ...
    disc_start: int = 0  # ... and the generator sees it from here
    # optimisers (Adam(W) with LDM's betas)
    lr: float = 5e-7
    critic_lr: float = 5e-7
    warmup_steps: int = 5000
    b1: float = 0.5
    b2: float = 0.9
    weight_decay: float = 0.0
    grad_clip: float | None = None
    ema_decay: float = 1.0 - 0.001 * 32 / 192  # sd-vae-ft's 0.999 at B 192, scaled to batch 32
    compute_dtype: str = "float32"

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"invalid recipe: {msg}")

        if self.stage not in STAGES:
            bad(f"stage {self.stage!r} not in {STAGES}")
        for f in dataclasses.fields(self):  # NaN or inf in any float would train into NaN weights
            v = getattr(self, f.name)
            for x in (v if isinstance(v, tuple) else (v,)):
                if isinstance(x, (float, np.floating)) and not math.isfinite(x):
                    bad(f"{f.name} {x!r} is not a finite number")
        if self.loss_space not in LOSS_SPACES:
            bad(f"loss_space {self.loss_space!r} not in {LOSS_SPACES}")
        if self.latent not in ("sample", "mean"):
            bad(f"latent {self.latent!r} not in ('sample', 'mean')")
        if self.gan != "none":
            try:
                validate_critic(self.critic_norm, self.gan, self.critic_ndf)
            except ValueError as e:
                bad(str(e))
        if self.critic_space not in ("srgb", "oklab"):
            bad(f"critic_space {self.critic_space!r} not in ('srgb', 'oklab')")
        if not 0.0 < self.ema_decay <= 1.0:
            bad(f"ema_decay {self.ema_decay} not in (0, 1]")
        if self.critic_start > self.disc_start:
            bad(f"critic_start ({self.critic_start}) must be <= disc_start ({self.disc_start})")
        if self.compute_dtype not in ("float32", "bfloat16"):
            bad(f"compute_dtype {self.compute_dtype!r} not in ('float32', 'bfloat16')")
        for name in ("lr", "critic_lr", "lpips_weight", "kl_weight", "w_mae", "w_mse", "adaptive_ratio"):
            if getattr(self, name) < 0:
                bad(f"{name} must be >= 0")

    @property
    def dtype(self):
        return jnp.dtype(self.compute_dtype)


#: The LDM kl-f8 recipe (first-stage pretrain): L1 + LPIPS + 1e-6 KL, hinge GAN after disc_start with
#: weight 0.5, Adam(0.5, 0.9) at 4.5e-6. disc_start is set per run (LDM: 50001).
LDM_PRETRAIN = RecipeConfig(stage="pretrain", loss_space="srgb", w_mae=2.0, w_mse=0.0, mae_schedule=False,
                            lpips_weight=1.0, kl_weight=1e-6, gan="hinge", critic_space="srgb", lr=4.5e-6,
                            critic_lr=4.5e-6, warmup_steps=0, ema_decay=1.0)


def ema_decay_for_batch(batch_size: int, reference_decay: float = 0.999, reference_batch: int = 192) -> float:
    """EMA decay scaled to a batch size: ``1 - (1 - d_ref) B / B_ref``, so that the EMA averages over the
    same number of *images*. sd-vae-ft used 0.999 at batch 192; at batch 32 this gives 0.99983."""
    d = 1.0 - (1.0 - reference_decay) * batch_size / reference_batch
    if not 0.0 < d < 1.0:
        raise ValueError(f"batch {batch_size} is too large for reference decay {reference_decay} at {reference_batch}")
    return d


def ema_update(ema, params, decay):
    """``ema <- decay * ema + (1 - decay) * params`` leaf by leaf (float32)."""
    return jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p.astype(e.dtype), ema, params)


def make_optimizer(lr: float, warmup_steps: int = 0, b1: float = 0.5, b2: float = 0.9,
                   weight_decay: float = 0.0, grad_clip: float | None = None) -> optax.GradientTransformation:
    """AdamW with LDM's betas (0.5, 0.9), linear LR warm-up, optional global-norm clipping; the small leaves
    updated as one vector (:func:`pack_small_leaves`)."""
    sched = optax.linear_schedule(0.0, lr, warmup_steps) if warmup_steps > 0 else lr
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip else []
    parts.append(optax.adamw(sched, b1=b1, b2=b2, weight_decay=weight_decay))
    return pack_small_leaves(optax.chain(*parts))


#: Float32 leaves of at most this many elements are updated by :func:`pack_small_leaves` as one vector.
#: Every leaf of the tiny-cpu decoder (the largest is a 3x3x64x64 kernel, 36,864) and the norms, biases and
#: small kernels of the sd-vae-ft-mse decoder; its large kernels stay leaves (copying them would cost
#: memory).
SMALL_LEAF_ELEMENTS = 1 << 16


def _is_small(leaf, limit: int) -> bool:
    return leaf.dtype == jnp.float32 and leaf.size <= limit


def _pack(tree, like=None, limit: int | None = None) -> dict:
    """``{"small": the float32 leaves of at most ``limit`` elements (default :data:`SMALL_LEAF_ELEMENTS`) of
    ``tree`` raveled into one vector, "big": the other leaves}``; which leaves are small is read from
    ``like`` (a tree of the same structure; default ``tree``). A tree without small leaves (an empty tree,
    such as the critic of a run without a GAN) has no "small" entry: an empty vector would be a leaf that
    no checkpoint can hold (orbax refuses zero-size arrays)."""
    limit = SMALL_LEAF_ELEMENTS if limit is None else limit
    leaves = jax.tree_util.tree_leaves(tree)
    flags = [_is_small(x, limit) for x in jax.tree_util.tree_leaves(tree if like is None else like)]
    vec = [x.reshape(-1) for x, f in zip(leaves, flags) if f]
    packed = {"big": tuple(x for x, f in zip(leaves, flags) if not f)}
    if vec:
        packed["small"] = jnp.concatenate(vec)
    return packed


def _unpack(packed: dict, like, limit: int) -> Any:
    """The inverse of :func:`_pack`: a tree shaped as ``like``."""
    leaves, treedef = jax.tree_util.tree_flatten(like)
    out, offset, big = [], 0, iter(packed["big"])
    for x in leaves:
        if _is_small(x, limit):
            out.append(lax.slice(packed["small"], (offset,), (offset + x.size,)).reshape(x.shape))
            offset += x.size
        else:
            out.append(next(big))
    return jax.tree_util.tree_unflatten(treedef, out)


def tree_norm(tree) -> jax.Array:
    """The global L2 norm of a tree (``optax.tree.norm``), with the small leaves as one vector
    (:func:`_pack`): one reduction for them instead of one per leaf."""
    return optax.tree.norm(_pack(tree))


def pack_small_leaves(inner: optax.GradientTransformation,
                      max_elements: int | None = None) -> optax.GradientTransformation:
    """``inner`` applied to ``{"small": one vector of the small leaves, "big": the other leaves}``.

    For an element-wise optimiser (Adam, weight decay) the updates are those of ``inner`` on the tree
    itself; a global-norm clip sees the same norm up to the order of the sum. What changes is the program:
    the tiny-cpu step's 119 leaves (decoder and critic) each got their own moment updates, about 15k
    instructions of optimised HLO and 44 MB of compiled code; packed, 2 vectors. Small leaves are float32
    leaves of at most ``max_elements`` (default :data:`SMALL_LEAF_ELEMENTS`, read when this is called).
    The optimiser state holds the packed layout, which the param tree's shapes fix."""
    limit = SMALL_LEAF_ELEMENTS if max_elements is None else max_elements

    def init(params):
        return inner.init(_pack(params, limit=limit))

    def update(updates, state, params=None):
        like = updates if params is None else params
        packed, state = inner.update(_pack(updates, like, limit), state,
                                     None if params is None else _pack(params, like, limit))
        return _unpack(packed, like, limit), state

    return optax.GradientTransformation(init, update)


# ---- parameter split ------------------------------------------------------------------------------------
def split_trainable(params: dict, stage: str) -> tuple[dict, dict]:
    """(trainable, frozen). Finetune trains ``decoder`` and ``post_quant_conv`` (the card; sd-vae-ft);
    pretrain trains everything."""
    if stage == "pretrain":
        return dict(params), {}
    trainable = {k: v for k, v in params.items() if k in ("decoder", "post_quant_conv")}
    frozen = {k: v for k, v in params.items() if k not in trainable}
    return trainable, frozen


def merge_params(trainable: dict, frozen: dict) -> dict:
    return {**frozen, **trainable}


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # trainable VAE params
    frozen: Any  # frozen VAE params (the encoder in finetune)
    opt_state: Any
    ema: Any  # EMA of ``params`` (the release weights)
    critic_params: Any
    critic_opt_state: Any


@dataclasses.dataclass(frozen=True)
class Trainer:
    """The static half of training: configs and optimisers. Build once; its steps are jitted lazily."""

    recipe: RecipeConfig
    vae_config: VAEConfig

    @property
    def model(self) -> AutoencoderKL:
        return AutoencoderKL(self.vae_config, dtype=self.recipe.dtype)

    @property
    def critic(self) -> PatchGAN:
        return PatchGAN(ndf=self.recipe.critic_ndf, norm=self.recipe.critic_norm,
                        in_channels=self.vae_config.out_channels, dtype=self.recipe.dtype)

    @property
    def tx(self):
        r = self.recipe
        return make_optimizer(r.lr, r.warmup_steps, r.b1, r.b2, r.weight_decay, r.grad_clip)

    @property
    def critic_tx(self):
        r = self.recipe
        return make_optimizer(r.critic_lr, 0, r.b1, r.b2, r.weight_decay, r.grad_clip)

    @property
    def objective(self):
        r = self.recipe
        return critic_objective(r.gan, norm=r.critic_norm, penalty_weight=r.penalty_weight,
                                drift_weight=r.drift_weight)

    def init_state(self, vae_params: dict, rng: jax.Array, image_size: int = 64) -> TrainState:
        trainable, frozen = split_trainable(vae_params, self.recipe.stage)
        # Copies: the steps donate the state, which must never alias the caller's arrays.
        copy = lambda a: jnp.array(a, dtype=jnp.float32, copy=True)  # noqa: E731
        trainable = jax.tree_util.tree_map(copy, trainable)
        frozen = jax.tree_util.tree_map(copy, frozen)
        x = jnp.zeros((1, image_size, image_size, self.vae_config.out_channels), jnp.float32)
        # jitted: run eagerly, the critic's init compiled each of its ~400 ops on its own (21 s for the smoke critic)
        critic_params = jax.jit(self.critic.init)(rng, x)["params"] if self.recipe.gan != "none" else {}
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=trainable, frozen=frozen, opt_state=self.tx.init(trainable),
            ema=jax.tree_util.tree_map(copy, trainable), critic_params=critic_params,
            critic_opt_state=self.critic_tx.init(critic_params),
        )

    # ---- the steps -------------------------------------------------------------------------------------
    def phase_for_step(self, step: int) -> str:
        r = self.recipe
        if r.gan == "none" or step < r.critic_start:
            return "rec"
        return "critic-warmup" if step < r.disc_start else "adversarial"

    def program_for_step(self, step: int) -> str:
        """The compiled step that runs ``step`` in ``fvae train``: ``"rec"`` before the critic starts, then
        ``"gan"`` (warm-up and adversarial steps in one program, see the module docstring)."""
        return "rec" if self.phase_for_step(step) == "rec" else "gan"

    def step_lpips(self, net: str, crop: int, width: int | None = None) -> LPIPSModel | None:
        """The LPIPS model for this trainer's steps on ``crop`` x ``width`` (default square) crops: only the
        arrays those steps run (:func:`fvae_core.lpips.load_lpips` with ``image_size``), so a process that
        trains holds no unused VGG kernels. None when the recipe has no LPIPS term."""
        if not self.recipe.lpips_weight:
            return None
        return load_lpips(net, image_size=(crop, crop if width is None else width), dtype=self.recipe.dtype)

    def step_fn(self, phase: str, lpips: LPIPSModel, grad_accum: int = 1) -> Callable:
        """``step(state, batch, rng) -> (state, metrics)`` for one phase (jitted, state donated).

        ``grad_accum`` splits the batch into that many micro-batches whose gradients are averaged
        before one update (the critic updates once on all fakes). A non-finite loss or gradient
        skips that network's update and sets ``gen/skipped`` / ``critic/skipped`` to 1."""
        if phase not in PHASES:
            raise ValueError(f"phase {phase!r} not in {PHASES}")
        if phase != "rec" and self.recipe.gan == "none":
            raise ValueError(f"phase {phase!r} needs a GAN, but recipe.gan is 'none'")
        raw = self.raw_step(phase, grad_accum)

        def step(state, batch, rng):
            # jitted once per set of compiler options: those fvae train uses for this batch's size
            b, h, w = batch["image"].shape[:3]
            size = activation_elements(self.vae_config, max(1, b // grad_accum), h, w)
            options = tuple(sorted(step_compiler_options(size).items()))
            jitted = _cached_jit((self, phase, grad_accum, options), raw, activation_elements=size,
                                 donate_argnums=(0,))
            return jitted(state, batch, rng, lpips)

        return step

    def raw_step(self, phase: str, grad_accum: int = 1) -> Callable:
        """The un-jitted ``step(state, batch, rng, lpips) -> (state, metrics)``, for callers that jit it
        themselves with explicit shardings (:mod:`fvae_core.runs.train`)."""
        if phase not in PHASES:
            raise ValueError(f"phase {phase!r} not in {PHASES}")
        return partial(_train_step, self, phase, grad_accum)

    def raw_call(self, phase: str, grad_accum: int = 1, steps: int = 1) -> Callable:
        """:meth:`raw_step` for ``steps == 1``, else :meth:`raw_steps`: the function a call of ``steps``
        steps runs (its batch and keys as :func:`step_keys` and a stacked batch give them)."""
        return self.raw_step(phase, grad_accum) if steps == 1 else self.raw_steps(phase, grad_accum)

    def raw_steps(self, phase: str, grad_accum: int = 1) -> Callable:
        """The un-jitted ``steps(state, batches, rngs, lpips) -> (state, metrics)`` that runs ``len(rngs)``
        train steps of one phase in a single call (``lax.scan``; ``batches["image"]`` is ``[n, B, H, W, 3]``,
        each metric comes back as ``[n]``). Each step is exactly :meth:`raw_step`'s, up to float rounding:
        every conv takes fvae_core.conv's custom kernel gradient on XLA:CPU (:func:`fvae_core.conv.loop_body`).
        On XLA:CPU the step's temp buffer is then mapped, and its pages zeroed by the kernel, once per call
        instead of once per step (:data:`MULTI_STEP_BACKENDS`)."""
        if phase not in PHASES:
            raise ValueError(f"phase {phase!r} not in {PHASES}")
        return partial(_train_steps, self, phase, grad_accum)

    def host_pixel_weights(self, first: int, steps: int = 1) -> np.ndarray:
        """:func:`pixel_weights_at` for steps ``first .. first + steps - 1`` as the input ``batch["pixel_weights"]``:
        float32 ``[2]``, or ``[steps, 2]`` for ``steps > 1``. The schedule is evaluated by the same jnp code
        on the host's default device, so a step fed these equals one that computes them (tested)."""
        rows = [np.asarray([np.float32(w) for w in jax.device_get(pixel_weights_at(self.recipe, first + i))],
                           np.float32) for i in range(steps)]
        return rows[0] if steps == 1 else np.stack(rows)

    def host_step_inputs(self, first: int, steps: int = 1) -> dict:
        """What ``fvae train`` feeds a call beside the images: ``"pixel_weights"`` (:meth:`host_pixel_weights`)
        and, where the recipe's spaces can be inputs, ``"spaces"`` (:func:`spaces_input`, one row per step
        for ``steps > 1``)."""
        out = {"pixel_weights": self.host_pixel_weights(first, steps)}
        spaces = spaces_input(self.recipe)
        if spaces is not None:
            out["spaces"] = spaces if steps == 1 else np.stack([spaces] * steps)
        return out

    def critic_step_fn(self) -> Callable:
        """``critic_step(state, batch, rng) -> (state, metrics)``: a critic-only update (jitted, state
        donated), for several critic iterations per generator step (WGAN-GP's n_critic). ``batch["fake"]``
        (model range [-1, 1]) is used when given, else fakes are decoded from the current params."""
        if self.recipe.gan == "none":
            raise ValueError("critic_step_fn needs a GAN, but recipe.gan is 'none'")
        return _cached_jit((self, "critic-only"), partial(_critic_step, self), donate_argnums=(0,))

    def eval_fn(self) -> Callable:
        """``reconstruct(vae_params, x01) -> y01`` with the posterior mean, jitted and cached. ``vae_params``
        is a full param tree, e.g. ``merge_params(state.ema, state.frozen)`` for the release weights."""
        model = self.model

        def recon(vae_params, x01):
            post = model.apply({"params": vae_params}, to_model_range(x01), method=model.encode)
            return from_model_range(model.apply({"params": vae_params}, post.mode(), method=model.decode))

        return _cached_jit((self, "eval"), recon, step=False)


def _last_layer_grad(h: jax.Array, kernel: jax.Array, cotangent: jax.Array) -> jax.Array:
    """dL/dW of ``y = conv3x3(h, W)`` (``decoder.conv_out``: stride 1, padding 1) for an image-space cotangent
    ``dL/dy``, float32: the kernel gradient of :func:`fvae_core.conv.conv2d`, so the same path as the
    decoder's own backward (on XLA:CPU one matmul against shifted copies of the 3-channel cotangent, 9 ms at
    B1 256^2 where XLA's own took 164 ms; elsewhere XLA's gradient)."""
    h = h.astype(jnp.float32)
    return jax.vjp(lambda w: conv2d(h, w), kernel.astype(jnp.float32))[1](cotangent.astype(jnp.float32))[0]


def pixel_weights_at(recipe: RecipeConfig, step) -> tuple:
    """``(w_mae, w_mse)`` of ``recipe`` at ``step``: the Furception schedule
    (:func:`fvae_core.losses.furception_pixel_weights`) or the fixed weights. A step computes them itself
    unless its batch carries them as ``batch["pixel_weights"]`` (a ``[2]`` float32 array, ``[n, 2]`` for
    :meth:`Trainer.raw_steps`; :meth:`Trainer.host_pixel_weights`). As an input they leave the compiled
    program: the card's run and the ``mae-only`` and ``mse-only`` ablations then compile to one program,
    and ``fvae train`` loads it from jax's persistent cache instead of compiling it again."""
    if recipe.mae_schedule:
        return furception_pixel_weights(step, steps=recipe.mae_schedule_steps)
    return recipe.w_mae, recipe.w_mse


#: The colour spaces a train step can take as an input (``batch["spaces"]``, :func:`spaces_input`).
INPUT_SPACES = ("srgb", "oklab")


def spaces_input(recipe: RecipeConfig) -> np.ndarray | None:
    """``batch["spaces"]``: float32 ``[2]``, 1.0 where the loss space (first) or the critic space (second)
    is Oklab and 0.0 where it is sRGB; None when either is another space (it is then compiled in). Fed as
    an input, the space leaves the compiled program: the card's run and its ``srgb-loss`` ablation then
    share one program, as the pixel weights let ``mae-only`` and ``mse-only`` share it
    (:func:`pixel_weights_at`). The step computes both spaces' values and selects one (:func:`_in_space`):
    elementwise work on the decoded batch, against a second compile of the whole step (about 2.5 min of
    CPU on the suite's finetune)."""
    if recipe.loss_space not in INPUT_SPACES or recipe.critic_space not in INPUT_SPACES:
        return None
    return np.asarray([recipe.loss_space == "oklab", recipe.critic_space == "oklab"], np.float32)


def _in_space(f, space: str, flag):
    """``f(space)``, or with an input ``flag`` (from :func:`spaces_input`) ``f("oklab")`` where it is 1 and
    ``f("srgb")`` where it is 0: a select, so the value is exactly the chosen space's, and so is the
    gradient (the other branch's cotangent is 0, and both branches have finite slopes everywhere:
    :func:`fvae_core.color.signed_cbrt`)."""
    if flag is None:
        return f(space)
    if space not in INPUT_SPACES:
        raise ValueError(f"a {space!r} space cannot be fed as an input (only {INPUT_SPACES}): do not feed "
                         "batch['spaces'] for this recipe")
    return jnp.where(flag > 0.5, f("oklab"), f("srgb"))


def _kl_term(post, image_shape) -> jax.Array:
    """Per-sample KL summed over latent dims, divided by the pixel count H W C. LDM sums both its nll and
    its KL per sample; our pixel terms are means, so dividing the KL sum by H W C keeps LDM's kl_weight."""
    h, w, c = image_shape[1:]
    return post.kl() / (h * w * c)


#: XLA options for every train step. XLA:CPU's newer MLIR fusion emitters compile the step's ~2,800 loop
#: fusions about 10 s faster than its classic elemental emitter, but hold about 1 GB more memory while they
#: do: the compile was the tiny-cpu step's RSS peak (2.3 GB, against 1.3 GB while it runs) and is 1.0 GB
#: of the sd-vae-ft-mse B1 step's. With the classic emitter both steps run as fast (sd B1 14.1 vs 14.2 s,
#: tiny 0.95 vs 0.96 s) and compile in about 1.3 GB less peak memory (jax 0.10, 2-core EPYC;
#: ``benchmarks/results/history.md``, third round). Options named ``xla_cpu_*`` are ignored by other backends.
STEP_COMPILER_OPTIONS = {"xla_cpu_use_fusion_emitters": False}
#: Added for steps of at least :data:`MEMORY_SCHEDULER_MIN_ELEMENTS` (by default every step; the name is from
#: when only large ones got it). XLA:CPU's default scheduler orders the step's ops for concurrency at the
#: cost of memory; the memory-optimised one cut the sd-vae-ft-mse step's temp buffers from 9.8 to 7.7 GiB at
#: B4, 256^2, fp32 at the same step time. At tiny-cpu (B8, 64^2, 32 channels) it cuts them from 282 to 183 MB
#: and the process's peak RSS by about 90 MB, for a step about 5% slower.
LARGE_STEP_COMPILER_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
#: Steps whose decoder output layer holds fewer activation elements than this (micro-batch x crop^2 x
#: ``block_out_channels[0]``; tiny-cpu 1M, sd-vae-ft-mse at B1 256^2 8.4M) keep XLA's default scheduler.
#: 0: every step is "large" (memory first). ``1 << 22`` trades the tiny steps' memory back for speed.
MEMORY_SCHEDULER_MIN_ELEMENTS = 0


@functools.lru_cache(maxsize=None)
def _options_known(items: tuple) -> bool:
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(items)).lower(1.0).compile()
        return True
    except Exception:  # noqa: BLE001 -- any refusal means: compile without them
        return False


def step_compiler_options(activation_elements: int | None = None) -> dict:
    """:data:`STEP_COMPILER_OPTIONS`, plus :data:`LARGE_STEP_COMPILER_OPTIONS` for a large step (None:
    assume large). Each set is dropped where the installed XLA does not know it (checked once on a trivial
    function, so that another jaxlib never fails a run over a compiler option)."""
    sets = [STEP_COMPILER_OPTIONS]
    if activation_elements is None or activation_elements >= MEMORY_SCHEDULER_MIN_ELEMENTS:
        sets.append(LARGE_STEP_COMPILER_OPTIONS)
    out = {}
    for options in sets:
        if options and _options_known(tuple(sorted(options.items()))):
            out.update(options)
    return out


def activation_elements(vae_config: VAEConfig, micro_batch: int, crop: int, width: int | None = None) -> int:
    """The size measure of :data:`MEMORY_SCHEDULER_MIN_ELEMENTS` (``width``: of a non-square crop)."""
    return micro_batch * crop * (crop if width is None else width) * vae_config.block_out_channels[0]


def step_pixels(micro_batch: int, crop: int) -> int:
    """The size measure of :data:`HUGE_PAGES_MIN_PIXELS`: micro-batch x crop^2 (known from a config alone,
    before the weights and so the channel count of :func:`activation_elements`)."""
    return micro_batch * crop * crop


def jit_step(fn, activation_elements: int | None = None, **jit_kw):
    """``jax.jit`` with :func:`step_compiler_options`: how every train step is compiled."""
    return jax.jit(fn, compiler_options=step_compiler_options(activation_elements), **jit_kw)


def release_host_memory() -> None:
    """Hand the heap that glibc keeps after XLA's compiler freed it back to the OS (``malloc_trim``).

    Compiling the sd-vae-ft-mse step leaves about 1.2 GB of freed but resident heap in the process, which
    then adds to every later peak (the step's own buffers come on top); call this once after a step has
    compiled. A no-op where the C library has no ``malloc_trim``."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


#: glibc's malloc for a process that trains on the CPU (:func:`tune_host_allocator`): one arena, chunks above
#: 32 MiB (glibc's largest threshold) mmapped, and no automatic trimming.
HOST_MALLOC_ARENAS = 1
HOST_MMAP_THRESHOLD = 32 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # mallopt's parameter numbers, <malloc.h>


def _accelerator_plugins() -> list[str]:
    """The jax PJRT plugins (and libtpu) installed here, found as jax finds them, without importing them."""
    import importlib.metadata
    import importlib.util
    import pkgutil

    found = [ep.value for ep in importlib.metadata.entry_points(group="jax_plugins")]
    try:
        import jax_plugins  # a namespace package, present only where a plugin is installed

        found += [name for _, name, _ in pkgutil.iter_modules(jax_plugins.__path__)]
    except ImportError:
        pass
    if importlib.util.find_spec("libtpu") is not None:
        found.append("libtpu")
    return sorted(set(found))


def _cpu_training_host() -> str | None:
    """Why a process here is not one that trains on the CPU on glibc (None: it is): not glibc, or
    ``jax_platforms`` (``JAX_PLATFORMS``) not CPU-only, or, with it unset, an accelerator plugin installed."""
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc"
    platforms = jax.config.jax_platforms
    if platforms:
        if {p.strip() for p in platforms.split(",") if p.strip()} != {"cpu"}:
            return f"jax_platforms={platforms!r} is not CPU-only"
    else:
        plugins = _accelerator_plugins()
        if plugins:
            return f"accelerator plugins installed ({', '.join(plugins)})"
    return None


#: glibc tunables for a process that trains on the CPU (:func:`host_allocator_environ`): malloc marks the
#: chunks it maps for transparent huge pages (``madvise(MADV_HUGEPAGE)``). glibc reads tunables only when
#: a process starts, so they go into the environment of the process to come (``fvae train`` re-executes
#: itself with them).
HOST_GLIBC_TUNABLES = {"glibc.malloc.hugetlb": "1"}
#: Steps of at least this many pixels (micro-batch x crop^2) get :data:`HOST_GLIBC_TUNABLES`: sd-vae-ft-mse
#: at B4, 256^2 (262,144 px) went 34.8 -> 30.5 s a step; at B1 (65,536 px) it was no faster; at tiny-cpu
#: (B8, 64^2: 32,768 px) every other step took 0.68 instead of 0.40 s in the benchmark's process, which
#: runs torch's steps between fvae's (``benchmarks/results/history.md``, tenth round).
HUGE_PAGES_MIN_PIXELS = 1 << 17


#: Backends on which ``fvae train`` runs several train steps per compiled call when the config leaves
#: ``steps_per_call`` at 0 (:func:`default_steps_per_call`, :meth:`Trainer.raw_steps`). On XLA:CPU each call
#: maps the step's temp buffer afresh (5.2 GB at sd-vae-ft-mse B4, 256^2) and the kernel zeroes its pages on
#: first touch, at about 1-1.5 GB/s on the 2-core VM measured; in a scan of n steps that happens once per
#: call. Measured per step, one process (jax 0.10, 2-core EPYC; ``benchmarks/results/history.md``, twelfth round):
#: sd-vae-ft-mse B4 31.2 s one per call, 27.0 s two per call (system time 7.0 -> 3.6 s a step); B1 6.86 s
#: one per call, 6.31 s four per call; tiny-cpu 0.44 s, 0.40 s (two), 0.38 s (four). Peak RSS within 30 MB.
MULTI_STEP_BACKENDS = ("cpu",)
#: The first of these that divides every step count the run must stop at (eval, samples, checkpoints, phase
#: starts) is taken.
MULTI_STEP_CHOICES = (4, 2)


def default_steps_per_call(boundaries=()) -> int:
    """Train steps per compiled call for ``RunConfig.steps_per_call = 0``: on :data:`MULTI_STEP_BACKENDS`
    the first of :data:`MULTI_STEP_CHOICES` that divides every one of ``boundaries`` (the step counts the
    run must stop at); else 1."""
    if jax.default_backend() not in MULTI_STEP_BACKENDS:
        return 1
    for n in MULTI_STEP_CHOICES:
        if all(int(b) % n == 0 for b in boundaries):
            return n
    return 1


def _tunables(value: str | None) -> dict[str, str]:
    return dict(t.split("=", 1) for t in (value or "").split(":") if "=" in t)


def host_allocator_environ(environ=None, pixels: int | None = None) -> dict | None:
    """``environ`` (default ``os.environ``) with :data:`HOST_GLIBC_TUNABLES` added to ``GLIBC_TUNABLES``, for
    starting a process that trains on the CPU with steps of ``pixels`` (micro-batch x crop^2; None: large);
    None where there is nothing to add: each tunable already set (to any value: a user's own setting wins),
    a step under :data:`HUGE_PAGES_MIN_PIXELS`, or a process that would not train on the CPU on glibc (read
    from this process: its C library, jax's ``jax_platforms`` and the plugins installed, not from
    ``environ``).

    Why: the step's buffers above 32 MiB (XLA's temp allocation, 5.2 GB at sd-vae-ft-mse B4, and the
    convolutions' scratch) are mapped afresh in every step, and with 4 KiB pages the kernel takes a fault
    for each page: 2.6M faults and 12 s of system time per sd B4 step on the tuned allocator
    (``benchmarks/results/history.md``, tenth round). With huge pages: 4k faults, 5 s, and the step 34.8 -> 30.5 s.
    Small steps go without (:data:`HUGE_PAGES_MIN_PIXELS`)."""
    env = dict(os.environ if environ is None else environ)
    if (pixels is not None and pixels < HUGE_PAGES_MIN_PIXELS) or _cpu_training_host() is not None:
        return None
    have = _tunables(env.get("GLIBC_TUNABLES"))
    add = {k: v for k, v in HOST_GLIBC_TUNABLES.items() if k not in have}
    if not add:
        return None
    env["GLIBC_TUNABLES"] = ":".join(f"{k}={v}" for k, v in {**have, **add}.items())
    return env


def _huge_pages_line() -> str:
    """How this process's malloc uses transparent huge pages, for :func:`tune_host_allocator`'s line."""
    if _tunables(os.environ.get("GLIBC_TUNABLES")).get("glibc.malloc.hugetlb") != "1":
        return "no huge pages (GLIBC_TUNABLES has no glibc.malloc.hugetlb=1)"
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read().strip()
    except OSError:
        return "huge pages asked for; the kernel has no transparent huge pages"
    if "[never]" in mode:
        return "huge pages asked for; the kernel's transparent huge pages are off (never)"
    return "transparent huge pages for mapped chunks"


def tune_host_allocator() -> str:
    """Set glibc's malloc up for a process that trains on the CPU. Returns what it did, in one line.

    * One arena (``M_ARENA_MAX`` = :data:`HOST_MALLOC_ARENAS`) instead of up to 8 per core. XLA:CPU's worker
      threads allocate the step's buffers, each from its own arena, and memory one arena frees is not
      reused by another.
    * Chunks above :data:`HOST_MMAP_THRESHOLD` mmapped (``M_MMAP_THRESHOLD``, glibc's largest), the rest
      from the heap, which is never trimmed automatically (``M_TRIM_THRESHOLD`` = -1): what a step frees
      is there for the next one. :func:`release_host_memory` still trims on purpose after a compile.
    * Transparent huge pages for the mapped chunks come from the environment the process started with
      (:func:`host_allocator_environ`); the line says whether they are on.

    Tiny-cpu, paired processes (``benchmarks/results/history.md``, ninth round): peak RSS 788-804 against 845-861
    MB, the compile's peak 727-735 against 833-857 MB; in two pairs of 20 steps the step 2% slower
    (431-437 against 414-428 ms; one arena alone: 445-453 ms) and the compile 4-8 s slower (lock
    contention).

    glibc fixes the arena limit at a thread's first ``malloc``, so this acts only before jax's backends
    start (their threads then allocate): call it first thing in a process that owns its work (``fvae
    train``, the benchmarks). It does nothing, and says why, when jax's backends are already running (a
    notebook, the tests), where an accelerator plugin could take the step (a GPU's host threads and the
    data loader are left alone), or where the C library is not glibc.

    Not done: all buffers from the heap (``M_MMAP_MAX`` = 0). It takes the page faults of the step's large
    buffers away (sd-vae-ft-mse B4: 33.5 -> 26.6 s a step, 4.9M -> 300 faults), but the heap then
    fragments: at B1 the peak grew by one temp buffer (3.2 -> 4.6 GB) at the 11th step. Nor a larger top
    pad (``M_TOP_PAD`` 512 MiB, so that the heap's free top serves the large chunks): sd B4 34.8 -> 33.0 s,
    but tiny-cpu's peak RSS 788 -> 958-1141 MB. Nor mimalloc preloaded: sd B4 3-7% faster, but B1's peak
    3.6-5.3 GB against 3.2, and 13 GB at B4 where its arenas held XLA's temp buffer (eleventh round). What
    is left of the B4 step's system time follows that 5.2 GB buffer, fresh in every step, not the faults."""
    import ctypes

    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        return "host allocator left as is: jax's backends are already running"
    why_not = _cpu_training_host()
    if why_not:
        return f"host allocator left as is: {why_not}"
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
        ok = [mallopt(_M_ARENA_MAX, HOST_MALLOC_ARENAS), mallopt(_M_MMAP_THRESHOLD, HOST_MMAP_THRESHOLD),
              mallopt(_M_TRIM_THRESHOLD, -1)] == [1, 1, 1]
    except (OSError, AttributeError):
        ok = False
    if not ok:
        return "host allocator left as is: mallopt refused"
    return (f"glibc malloc: {HOST_MALLOC_ARENAS} arena, mmap above {HOST_MMAP_THRESHOLD >> 20} MiB, "
            f"no automatic trim, {_huge_pages_line()}")


def compile_step(fn, args, activation_elements: int | None = None, **jit_kw):
    """:func:`jit_step` compiled ahead of time for ``args``. jax's caches are dropped (``jax.clear_caches``)
    and the freed heap is returned (:func:`release_host_memory`) both before and after the compile.

    Before: the executables and traces of everything jitted so far (weight init, state init, loading) are
    not needed again, and the compile's own peak would stack on them: 270 MB in the tiny-cpu process.
    After: the compiled step needs only its executable; the jaxpr and StableHLO that jax keeps to re-trace
    would stay resident for the whole run (280 MB at tiny-cpu, about 300 MB at sd-vae-ft-mse size). Every
    other jitted function re-traces on its next call, so this is for code that owns the process: ``fvae
    train`` and the benchmarks."""
    _drop_caches()
    compiled = jit_step(fn, activation_elements, **jit_kw).lower(*args).compile()
    _drop_caches()
    return compiled


def _drop_caches() -> None:
    import gc

    jax.clear_caches()
    gc.collect()
    release_host_memory()


_JIT_CACHE: dict = {}


def _cached_jit(key, fn, step: bool = True, activation_elements: int | None = None, **jit_kw):
    """One jitted function per (trainer, entry point[, compiler options]): Trainer is hashable, so repeated calls
    to ``step_fn``/``critic_step_fn``/``eval_fn`` reuse the compiled step instead of re-tracing. Train steps
    (``step``) get :func:`jit_step`'s compiler options for ``activation_elements``; ``eval_fn`` is a plain
    ``jax.jit`` (callers nest it in their own jit, where compiler options are not allowed)."""
    if key not in _JIT_CACHE:
        _JIT_CACHE[key] = jit_step(fn, activation_elements, **jit_kw) if step else jax.jit(fn, **jit_kw)
    return _JIT_CACHE[key]


def generator_grads(trainer: Trainer, phase: str, state: TrainState, x01, rng, lpips: LPIPSModel,
                    pixel_weights=None, spaces=None):
    """Gradient of the generator's total loss w.r.t. the trainable params, its metrics, and the (detached)
    decoded images: ``L = L_rec + kl_weight KL + w L_adv`` with one decoder backward (module docstring).
    ``pixel_weights``: ``(w_mae, w_mse)`` as an input (:func:`pixel_weights_at`), else computed in the step;
    ``spaces``: the loss and critic spaces as an input (:func:`spaces_input`), else the recipe's."""
    r, model, critic = trainer.recipe, trainer.model, trainer.critic
    xm = to_model_range(x01)
    rng_z = jax.random.fold_in(rng, 1)

    if r.stage == "finetune":
        # The encoder is frozen: it runs outside the differentiated function, so it has no backward.
        post = model.apply({"params": merge_params(state.params, state.frozen)}, xm, method=model.encode)
        z_fixed = lax.stop_gradient(post.sample(rng_z) if r.latent == "sample" else post.mode())

    def forward(trainable):
        p = merge_params(trainable, state.frozen)
        if r.stage == "finetune":
            z, kl = z_fixed, jnp.zeros((), jnp.float32)
        else:
            post = model.apply({"params": p}, xm, method=model.encode)
            z = post.sample(rng_z) if r.latent == "sample" else post.mode()
            kl = jnp.mean(_kl_term(post, x01.shape))
        y, h = model.apply({"params": p}, z, method=model.decode_with_features)
        return (y, kl), h

    (y, kl), vjp_fn, h = jax.vjp(forward, state.params, has_aux=True)

    if pixel_weights is None:
        w_mae, w_mse = pixel_weights_at(r, state.step)
    else:
        w_mae, w_mse = pixel_weights[0], pixel_weights[1]
    xm_target = lax.stop_gradient(xm)

    def rec_loss(y):
        y01 = from_model_range(y)
        pix = _in_space(lambda sp: pixel_loss(y01, x01, sp, w_mae, w_mse, r.channel_weights), r.loss_space,
                        None if spaces is None else spaces[0])
        lp = lpips_distance(lpips, y, xm_target, dtype=r.dtype, check=False) if r.lpips_weight else jnp.zeros_like(pix)
        return jnp.mean(pix) + r.lpips_weight * jnp.mean(lp), (jnp.mean(pix), jnp.mean(lp))

    (rec, (pix, lp)), g_rec = jax.value_and_grad(rec_loss, has_aux=True)(y)
    # The anchors fed LPIPS [0, 1] targets; log that the target really is in the model range [-1, 1].
    metrics = {"lpips/target_range_ok": lpips_input_range_ok(xm_target, xm_target), "loss/rec": rec, "loss/pixel": pix, "loss/lpips": lp, "loss/kl": kl, "w_mae": w_mae, "w_mse": w_mse}
    g_y = g_rec
    if phase in ("adversarial", "gan"):
        objective = trainer.objective

        def adv_loss(y):
            d = critic.apply({"params": state.critic_params},
                             _in_space(partial(critic_input, y), r.critic_space, None if spaces is None else spaces[1]))
            return jnp.mean(objective.generator_loss(d))

        adv, g_adv = jax.value_and_grad(adv_loss)(y)
        kernel = state.params["decoder"]["conv_out"]["kernel"]
        n_rec = jnp.linalg.norm(_last_layer_grad(h, kernel, g_rec))
        n_adv = jnp.linalg.norm(_last_layer_grad(h, kernel, g_adv))
        w = adaptive_gan_weight(n_rec, n_adv, r.adaptive_ratio, r.adaptive_eps, r.adaptive_max)
        g_y = g_rec + w * g_adv
        adv_total = w * adv
        if phase == "gan":
            # where, not a 0/1 factor: a non-finite critic gradient in warm-up must not reach the generator
            on = state.step >= r.disc_start
            g_y, w, adv_total = jnp.where(on, g_y, g_rec), jnp.where(on, w, 0.0), jnp.where(on, adv_total, 0.0)
        metrics.update({"loss/g_adv": adv, "adaptive_weight": w, "grad_norm/rec_last_layer": n_rec,
                        "grad_norm/adv_last_layer": n_adv})
    grads = vjp_fn((g_y, jnp.asarray(r.kl_weight, jnp.float32)))[0]
    total = rec + r.kl_weight * kl + (adv_total if phase in ("adversarial", "gan") else 0.0)
    metrics["loss/total"] = total
    return grads, metrics, lax.stop_gradient(y)


def all_finite(*trees) -> jax.Array:
    """True when every leaf of every tree is finite (a scalar bool array).

    ``x * 0`` is 0 for every finite x (however large) and NaN for inf or NaN, so the sum over all leaves is
    0 or NaN: one scalar. The ``sqrt`` before the test is there for the compiler. XLA copies cheap scalar
    producers into each consumer, and this flag guards every leaf of the new state. Written as 106 per-leaf
    ``and``s, that chain was copied into each of the 427 update fusions of the tiny-cpu step: 160k lines of
    optimised HLO, 4 s of compile time and 200 MB of compile memory. XLA does not duplicate an expensive op
    like ``sqrt``, so the flag is computed once (68k lines). The leaves are read packed (:func:`_pack`): the
    small float32 leaves as one vector, the same one the optimiser updates."""
    leaves = [jnp.sum(x.astype(jnp.float32) * 0.0) for t in trees for x in jax.tree_util.tree_leaves(_pack(t))]
    return jnp.isfinite(jnp.sqrt(sum(leaves))) if leaves else jnp.asarray(True)


#: Backends on which a skipped update is a ``lax.cond`` (:func:`_update_if`); elsewhere a ``where`` per leaf,
#: which keeps a copy of the optimiser moments (GPU memory has room) but spares XLA:GPU a conditional that
#: waits on its predicate. With the grads-first tie also off
#: (``autoencoder.GRADS_FIRST_BACKENDS``) the sd-vae-ft-mse B32 bf16 step took 187 instead of 193 ms on an
#: H100, peak GPU memory unchanged at 23.1 GB (``benchmarks/results/history.md``, seventh round).
COND_UPDATE_BACKENDS = ("cpu",)


def _cond_update_here() -> bool:
    return jax.default_backend() in COND_UPDATE_BACKENDS


def _update_if(ok, update, operands):
    """``update(*operands)`` when ``ok``, else the operands unchanged (bit-identical): a skipped update.

    Returns ``(new operands, update norm)``; the norm is 0 for a skipped update. On
    :data:`COND_UPDATE_BACKENDS` a ``lax.cond`` rather than a ``where`` per leaf: with ``where`` the old
    moments are still read after the donated buffers have been overwritten, so XLA kept a copy of every Adam
    moment through the whole step (338 MB of the sd-vae-ft-mse step's peak); inside the conditional's branch
    each leaf is updated in place."""
    if not _cond_update_here():
        new, norm = update(*operands)
        keep = lambda n, o: jnp.where(ok, n, o)  # noqa: E731
        return jax.tree_util.tree_map(keep, tuple(new), tuple(operands)), jnp.where(ok, norm, 0.0)

    def skip(*ops):
        return ops, jnp.zeros((), jnp.float32)

    return lax.cond(ok, update, skip, *operands)


def _generator_update(trainer: Trainer, phase: str, state: TrainState, x01, rng, lpips: LPIPSModel,
                      accum: int = 1, pixel_weights=None, spaces=None):
    grads, metrics, fake = _accumulated_generator_grads(trainer, phase, state, x01, rng, lpips, accum,
                                                        pixel_weights, spaces)
    r = trainer.recipe
    # NaN guard: a non-finite loss or gradient skips the whole update (params, moments, EMA).
    ok = all_finite(grads, metrics["loss/total"])

    def update(params, opt_state, ema):
        updates, opt_state = trainer.tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, opt_state, ema_update(ema, params, r.ema_decay)), tree_norm(updates)

    (params, opt_state, ema), update_norm = _update_if(ok, update, (state.params, state.opt_state, state.ema))
    metrics.update({"gen/grad_norm": tree_norm(grads), "gen/param_norm": tree_norm(params),
                    "gen/update_norm": update_norm, "gen/skipped": 1.0 - ok.astype(jnp.float32)})
    return state.replace(params=params, opt_state=opt_state, ema=ema), metrics, fake


def _accumulated_generator_grads(trainer, phase, state, x01, rng, lpips, accum: int, pixel_weights=None,
                                 spaces=None):
    """:func:`generator_grads` over ``accum`` equal micro-batches of ``x01``, gradients and metrics averaged.

    Each micro-batch gets its own adaptive weight, as LDM's loss does under Lightning's
    ``accumulate_grad_batches`` (it is called once per micro-batch). ``accum=1`` is exactly
    :func:`generator_grads`.
    """
    if accum == 1:
        return generator_grads(trainer, phase, state, x01, rng, lpips, pixel_weights, spaces)
    b = x01.shape[0]
    if b % accum:
        raise ValueError(f"batch {b} is not divisible by grad_accum {accum}")
    xs = x01.reshape((accum, b // accum) + x01.shape[1:])
    rngs = jax.random.split(rng, accum)

    def micro(acc, inp):
        x_i, rng_i = inp
        g, m, fake = generator_grads(trainer, phase, state, x_i, rng_i, lpips, pixel_weights, spaces)
        return jax.tree_util.tree_map(jnp.add, acc, g), (m, fake)

    zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
    with loop_body():  # XLA:CPU's own conv kernel gradient is 36x slower in a loop body (fvae_core.conv)
        grads, (ms, fakes) = lax.scan(micro, zeros, (xs, rngs))
    grads = jax.tree_util.tree_map(lambda g: g / accum, grads)
    metrics = jax.tree_util.tree_map(lambda m: jnp.mean(m, axis=0), ms)
    return grads, metrics, fakes.reshape((b,) + fakes.shape[2:])


def _critic_update(trainer: Trainer, state: TrainState, real_m, fake_m, rng, spaces=None):
    r, critic, objective = trainer.recipe, trainer.critic, trainer.objective
    flag = None if spaces is None else spaces[1]
    real = _in_space(partial(critic_input, real_m), r.critic_space, flag)
    fake = _in_space(partial(critic_input, fake_m), r.critic_space, flag)

    def loss_fn(cp):
        critic_fn = lambda x: critic.apply({"params": cp}, x)  # noqa: E731
        terms = critic_loss_terms(objective, critic_fn, real, fake, rng)
        return jnp.mean(terms["total"]), terms

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.critic_params)
    ok = all_finite(grads, loss)

    def update(cparams, opt_state):
        updates, opt_state = trainer.critic_tx.update(grads, opt_state, cparams)
        return (optax.apply_updates(cparams, updates), opt_state), tree_norm(updates)

    (cparams, opt_state), update_norm = _update_if(ok, update, (state.critic_params, state.critic_opt_state))
    d_real, d_fake = jnp.mean(terms["d_real"]), jnp.mean(terms["d_fake"])
    metrics = {"critic/loss": loss, "critic/objective": jnp.mean(terms["critic_loss"]),
               "critic/penalty": jnp.mean(terms["penalty"]), "critic/drift": jnp.mean(terms["drift"]),
               "critic/d_real": d_real, "critic/d_fake": d_fake, "critic/wasserstein": d_real - d_fake,
               "critic/grad_norm": tree_norm(grads), "critic/param_norm": tree_norm(cparams),
               "critic/update_norm": update_norm, "critic/skipped": 1.0 - ok.astype(jnp.float32)}
    return state.replace(critic_params=cparams, critic_opt_state=opt_state), metrics


def _train_step(trainer: Trainer, phase: str, accum: int, state: TrainState, batch, rng, lpips: LPIPSModel):
    x01 = batch["image"].astype(jnp.float32)
    rng_g, rng_c = jax.random.split(rng)
    state, metrics, fake = _generator_update(trainer, phase, state, x01, rng_g, lpips, accum,
                                             batch.get("pixel_weights"), batch.get("spaces"))
    if phase != "rec":
        state, cm = _critic_update(trainer, state, to_model_range(x01), fake, rng_c, batch.get("spaces"))
        metrics.update(cm)
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    return state.replace(step=state.step + 1), metrics


def _train_steps(trainer: Trainer, phase: str, accum: int, state: TrainState, batches, rngs, lpips: LPIPSModel):
    """``len(rngs)`` consecutive :func:`_train_step` calls in one ``lax.scan``: batch ``i`` is
    ``batches["image"][i]``, key ``i`` is ``rngs[i]``; the metrics come back stacked, one row per step.
    Traced under :func:`fvae_core.conv.loop_body`, so every conv takes the custom (matmul) kernel gradient
    on XLA:CPU."""

    def body(s, inp):
        batch, rng = inp
        return _train_step(trainer, phase, accum, s, batch, rng, lpips)

    with loop_body():
        return lax.scan(body, state, (batches, rngs))


def step_keys(key: jax.Array, first: int, steps: int = 1) -> jax.Array:
    """The RNG key of step ``first`` (``fold_in(key, first)``), or for ``steps > 1`` the ``[steps]`` keys of
    steps ``first .. first + steps - 1`` stacked, for :meth:`Trainer.raw_steps`: the same keys as that many
    one-step calls."""
    if steps == 1:
        return jax.random.fold_in(key, first)
    return jnp.stack([jax.random.fold_in(key, first + i) for i in range(steps)])


def _critic_step(trainer: Trainer, state: TrainState, batch, rng):
    x01 = batch["image"].astype(jnp.float32)
    rng_z, rng_c = jax.random.split(rng)
    if "fake" in batch:
        fake = batch["fake"].astype(jnp.float32)
    else:
        model, r = trainer.model, trainer.recipe
        p = merge_params(state.params, state.frozen)
        post = model.apply({"params": p}, to_model_range(x01), method=model.encode)
        z = post.sample(rng_z) if r.latent == "sample" else post.mode()
        fake = lax.stop_gradient(model.apply({"params": p}, z, method=model.decode))
    state, metrics = _critic_update(trainer, state, to_model_range(x01), fake, rng_c, batch.get("spaces"))
    return state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
