"""The critic (discriminator): its network, its input space and its objectives.

Network: :class:`PatchGAN`, the NLayerDiscriminator of taming-transformers / CompVis LDM
(``taming/modules/discriminator/model.py``; itself pix2pix's PatchGAN, Isola et al. 2017) in Flax linen,
NHWC, with a selectable normalisation. The Furception model card trains "a similar discriminator to what
LDM uses, except reparameterized to Wasserstein loss with a gradient penalty and with its ... norm layers
replaced with layer norms"; LDM's own uses BatchNorm, which makes a per-sample gradient penalty invalid
(Gulrajani et al. 2017, sec. 4: "we use layer normalization as a drop-in replacement").

Objectives (pure, jit-able, per sample; weights are applied only in :func:`critic_loss_terms`):

==========  ============================================  ===========================  ==================
name        critic loss                                    penalty (default weight)     generator loss
==========  ============================================  ===========================  ==================
wgan-gp     D(fake) - D(real)                              GP, lambda = 10              -D(fake)
hinge       0.5 (relu(1 - D(real)) + relu(1 + D(fake)))    none                         -D(fake)
ns-r1       softplus(-D(real)) + softplus(D(fake))         R1, weight 10 (= gamma 20)   softplus(-D(fake))
==========  ============================================  ===========================  ==================

**What D(x) is for a PatchGAN.** The network emits a field of patch logits ``d`` of shape (B, h, w, 1).
The scalar critic value of a sample is their *mean*, :func:`critic_score` (LDM averages its hinge and
``g_loss`` over all logits the same way). Losses that are linear in the logits (WGAN) are the mean of
the per-logit values, which equals the loss of the score; non-linear ones (hinge, softplus) are applied
per logit and then averaged over the patches, as LDM does. The gradient penalties differentiate the same
scalar, ``critic_score`` (the patch *mean*), so the Lipschitz constraint of the GP acts on exactly the
quantity whose real/fake difference the WGAN loss estimates. (Differentiating the patch *sum* instead would
constrain a value ``h*w`` times larger, i.e. the mean to be ``1/(h*w)``-Lipschitz.)

Critic steps and generator steps are separate: this module never owns the generator, and nothing here
branches on an optimizer index (see ``/work/shared/STYLE.md``).

References: Gulrajani et al. 2017, "Improved Training of Wasserstein GANs" (WGAN-GP); Karras et al. 2018,
"Progressive Growing of GANs" (drift term); Mescheder et al. 2018, "Which Training Methods for GANs do
actually Converge?" (R1); Goodfellow et al. 2014 (non-saturating loss); Lim & Ye 2017 / taming
``hinge_d_loss`` and LDM ``contperceptual.py`` (hinge).
"""
from __future__ import annotations

import math

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from fvae_core.conventions import from_model_range

Dtype = Any
Array = jax.Array
CriticFn = Callable[[Array], Array]  # NHWC images -> patch logits (B, h, w, 1)

NORMS = ("layer", "group", "none", "batch")
CRITIC_INPUT_SPACES = ("srgb", "oklab")
OBJECTIVES = ("wgan-gp", "hinge", "ns-r1")
#: Objectives whose penalty differentiates D per sample; they need a critic without batch coupling.
PER_SAMPLE_PENALTY_OBJECTIVES = ("wgan-gp", "ns-r1")

_NORM_EPS = 1e-5  # torch's GroupNorm/BatchNorm default
_LEAK = 0.2
_INIT_STD = 0.02  # taming ``weights_init``: conv weights ~ N(0, 0.02)


def _normal_init(std: float):
    """N(0, std) initializer that draws a flat vector and reshapes it.

    Same distribution as ``nn.initializers.normal(std)``; the flat draw is only because XLA:CPU takes ~2 s
    to compile a partitionable-threefry draw of a 4-D shape and ~0.3 s for a 1-D one (measured, jax 0.10).
    """

    def init(rng, shape, dtype=jnp.float32):
        n = 1
        for s in shape:
            n *= s
        return std * jax.random.normal(rng, (n,), dtype).reshape(shape)

    return init


# ---- input space ------------------------------------------------------------------------------------
def critic_input(x_model_range: Array, space: str) -> Array:
    """Map [-1, 1] model-range NHWC images to the critic's input space.

    * ``"srgb"``: unchanged, [-1, 1] sRGB-encoded (as LDM feeds its discriminator).
    * ``"oklab"``: ``oklab_from_srgb((x + 1) / 2)`` from :mod:`fvae_core.color` (L in ~[0, 1], a and b in
      ~[-0.4, 0.4]; not rescaled), as the Furception lead's code feeds ``D(oklab(x_hat))``. Decoder outputs
      are not clamped, so the conversion sees (slightly) out-of-gamut values exactly as the loss does.

    Both real and fake images must go through the same call, in the critic step and in the generator step.
    """
    if space == "srgb":
        return x_model_range
    if space == "oklab":
        from fvae_core.color import oklab_from_srgb  # imported late: color is its own home

        return oklab_from_srgb(from_model_range(x_model_range))
    raise ValueError(f"unknown critic input space {space!r}; choose one of {CRITIC_INPUT_SPACES}")


# ---- network ----------------------------------------------------------------------------------------
class CriticNorm(nn.Module):
    """The PatchGAN's normalisation, computed in float32 (biased variance, eps 1e-5, affine per channel).

    * ``"layer"``: per sample over all of (H, W, C) -- NHWC axes (1, 2, 3) -- then a per-channel scale and
      shift. This is the conv-net layer norm of the WGAN-GP authors' code (moments over C, H, W; one offset
      and scale per channel) and equals ``torch.nn.GroupNorm(1, C)``. (The Furception lead's public code
      uses ``flax.linen.LayerNorm()``, which normalises each pixel over C only; also per sample.)
    * ``"group"``: per sample over (H, W, C / G) for G = ``groups`` groups; ``torch.nn.GroupNorm(G, C)``.
    * ``"batch"``: over (B, H, W) with the statistics of the current batch (train-mode
      ``torch.nn.BatchNorm2d``); no running averages are kept, so a critic is always applied in the mode it
      is trained in. It couples the samples of a batch: see :func:`validate_critic`.
    """

    kind: str
    groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        xf = x.astype(jnp.float32)
        if self.kind == "batch":
            mean = jnp.mean(xf, axis=(0, 1, 2), keepdims=True)
            var = jnp.mean(jnp.square(xf - mean), axis=(0, 1, 2), keepdims=True)
            y = (xf - mean) * lax.rsqrt(var + _NORM_EPS)
        else:
            g = 1 if self.kind == "layer" else self.groups
            if c % g:
                raise ValueError(f"group norm needs channels ({c}) divisible by groups ({g})")
            xg = xf.reshape(b, h, w, g, c // g)
            mean = jnp.mean(xg, axis=(1, 2, 4), keepdims=True)
            var = jnp.mean(jnp.square(xg - mean), axis=(1, 2, 4), keepdims=True)
            y = ((xg - mean) * lax.rsqrt(var + _NORM_EPS)).reshape(b, h, w, c)
        return (y * scale + bias).astype(self.dtype)


def patch_conv(x: Array, kernel: Array, stride: int, padding: int) -> Array:
    """Conv of NHWC ``x`` with HWIO ``kernel`` (symmetric zero padding, no dilation) as one matmul.

    The ``kh * kw`` strided windows of the padded input are concatenated along channels (tap-major, the
    order of ``kernel.reshape(kh * kw * C_in, C_out)``) and multiplied by the flattened kernel. Same values
    as ``lax.conv_general_dilated`` (to float rounding), and every derivative of it -- slices, a
    concatenate and a dot -- is again slices, pads and dots, so the gradient penalty's double backward
    stays matmul-shaped. XLA:CPU's double backward of the conv itself is slow: about 50x its forward for
    the 256->512 stride-1 layer at 32^2 (49 ms forward, 2.3 s for the penalty's param gradient; jax 0.10,
    2-core EPYC), which made the critic update 5.7x PyTorch's at sd size (``benchmarks/results/history.md``,
    the first full run).
    """
    kh, kw, cin, cout = kernel.shape
    if x.shape[-1] != cin:
        raise ValueError(f"conv input has {x.shape[-1]} channels, kernel expects {cin}")
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    ho = (xp.shape[1] - kh) // stride + 1
    wo = (xp.shape[2] - kw) // stride + 1
    cols = [lax.slice(xp, (0, i, j, 0), (xp.shape[0], i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, cin),
                      (1, stride, stride, 1))
            for i in range(kh) for j in range(kw)]
    return jnp.concatenate(cols, axis=-1) @ kernel.reshape(kh * kw * cin, cout)


class CriticConv(nn.Module):
    """4x4 conv, NHWC/HWIO, symmetric padding 1 (torch ``padding=1``); kernel ~ N(0, 0.02), bias 0.

    Computed by :func:`patch_conv` (im2col + one matmul), not ``lax.conv_general_dilated``, because the
    gradient penalties differentiate twice and XLA's double backward of a conv is slow; for the same
    reason no custom-VJP conv (``fvae_core.conv``) may be used here.
    """

    features: int
    stride: int
    use_bias: bool
    kernel_size: int = 4
    padding: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        kernel = self.param("kernel", _normal_init(_INIT_STD), (k, k, x.shape[-1], self.features))
        y = patch_conv(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, self.padding)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
        return y


class PatchGAN(nn.Module):
    """taming's NLayerDiscriminator (ndf 64, n_layers 3, kernel 4, padding 1, LeakyReLU 0.2), NHWC.

    Layers (n_layers = 3)::

        main_0   conv 3->64    s2 (+bias)   LeakyReLU
        main_2   conv 64->128  s2  main_3 norm  LeakyReLU
        main_5   conv 128->256 s2  main_6 norm  LeakyReLU
        main_8   conv 256->512 s1  main_9 norm  LeakyReLU
        main_11  conv 512->1   s1 (+bias)

    Module names are taming's ``nn.Sequential`` indices (``main.3.weight`` <-> ``main_3.scale``), whatever
    the norm, so that the tree is the same for every norm and a taming/LDM checkpoint ports one to one.
    A 256x256 input gives (B, 30, 30, 1) float32 patch logits.

    **Bias.** With a norm, the three middle convs have no bias, as taming does for BatchNorm (where it is
    exactly cancelled). Under layer/group norm a per-channel conv bias is not exactly cancelled, but the
    norm's per-channel shift that follows already gives each channel its own offset; dropping the bias keeps
    one parameter tree for all norms (and is what the Furception lead's code does). With ``norm="none"``
    every conv has a bias, since nothing else would provide the offsets.

    **Init.** Conv kernels ~ N(0, 0.02) (taming ``weights_init``), conv biases 0, norm scale 1 and shift 0
    (taming draws BatchNorm scales from N(1, 0.02); a constant 1 is used here for every norm).

    ``dtype`` is the compute dtype (e.g. ``jnp.bfloat16``): params are float32 and cast at use, norms are
    computed in float32, and the output is float32.
    """

    ndf: int = 64
    n_layers: int = 3
    norm: str = "layer"
    in_channels: int = 3
    groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.norm not in NORMS:
            raise ValueError(f"unknown critic norm {self.norm!r}; choose one of {NORMS}")
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"critic expects NHWC input with {self.in_channels} channels, got shape {x.shape}")
        dt = self.dtype
        has_norm = self.norm != "none"
        h = CriticConv(self.ndf, stride=2, use_bias=True, dtype=dt, name="main_0")(x)
        h = nn.leaky_relu(h, _LEAK)
        for n in range(1, self.n_layers + 1):
            mult = min(2 ** n, 8)
            stride = 2 if n < self.n_layers else 1
            idx = 2 + 3 * (n - 1)
            h = CriticConv(self.ndf * mult, stride=stride, use_bias=not has_norm, dtype=dt, name=f"main_{idx}")(h)
            if has_norm:
                h = CriticNorm(self.norm, groups=self.groups, dtype=dt, name=f"main_{idx + 1}")(h)
            h = nn.leaky_relu(h, _LEAK)
        h = CriticConv(1, stride=1, use_bias=True, dtype=dt, name=f"main_{2 + 3 * self.n_layers}")(h)
        return h.astype(jnp.float32)


# ---- reductions and penalties -------------------------------------------------------------------------
def critic_score(d: Array) -> Array:
    """D(x) of each sample: the mean of its patch logits, (B, ...) -> (B,) float32.

    ``D(x) = 1/(h w) sum_{i,j} d_ij(x)``. Already-reduced (B,) input is returned unchanged (as float32).
    """
    return jnp.mean(d.astype(jnp.float32).reshape(d.shape[0], -1), axis=1)


def _per_logit_mean(v: Array) -> Array:
    return jnp.mean(v.astype(jnp.float32).reshape(v.shape[0], -1), axis=1)


def critic_input_grad(critic_fn: CriticFn, x: Array) -> tuple[Array, Array]:
    """``(critic_fn(x), grad_x D(x))``: logits and the per-sample input gradient of :func:`critic_score`.

    One backward pass of ``sum_b D(x_b)``; that is the per-sample gradient only because sample b's score
    depends on x_b alone -- true for the layer, group and no-norm critics, false under batch norm.
    """

    def total_score(xx):
        d = critic_fn(xx)
        return jnp.sum(critic_score(d)), d

    (_, d), g = jax.value_and_grad(total_score, has_aux=True)(x)
    return d, g


def _sq_norm_per_sample(g: Array) -> Array:
    return jnp.sum(jnp.square(g.astype(jnp.float32)).reshape(g.shape[0], -1), axis=1)


def interpolate(real: Array, fake: Array, rng: Array) -> Array:
    """WGAN-GP sample points ``x~ = eps * real + (1 - eps) * fake``, one ``eps ~ U[0, 1]`` per sample.

    Gulrajani et al. 2017, Algorithm 1, line 6.
    """
    eps = jax.random.uniform(rng, (real.shape[0],), jnp.float32).reshape((-1,) + (1,) * (real.ndim - 1))
    return (eps * real.astype(jnp.float32) + (1.0 - eps) * fake.astype(jnp.float32)).astype(real.dtype)


def gradient_penalty(critic_fn: CriticFn, real: Array, fake: Array, rng: Array) -> Array:
    """Per-sample WGAN-GP penalty ``(||grad_x D(x~)||_2 - 1)^2``, (B,) float32; unweighted (lambda = 10 is
    applied by :func:`critic_loss_terms`).

    Gulrajani et al. 2017, eq. (3): ``lambda E_{x~}[(||grad_{x~} D(x~)||_2 - 1)^2]`` with x~ from
    :func:`interpolate`. The norm is over all of (H, W, C) of each sample, and D is :func:`critic_score`
    (the patch mean), so a linear critic ``D(x) = w . x`` gives exactly ``(||w|| - 1)^2``. The norm has a
    zero-safe gradient (no NaN when the input gradient vanishes). Requires a per-sample critic (no batch norm).
    """
    _, g = critic_input_grad(critic_fn, interpolate(real, fake, rng))
    sq = _sq_norm_per_sample(g)
    positive = sq > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
    return jnp.square(norm - 1.0)


def r1_penalty(critic_fn: CriticFn, real: Array) -> Array:
    """Per-sample R1 penalty ``||grad_x D(x)||_2^2`` at real data, (B,) float32; unweighted.

    Mescheder et al. 2018, eq. (9): ``R1 = gamma / 2 * E_{p_D}[||grad D(x)||^2]``. This returns the
    expectation's argument only; the Furception lead's code multiplies it by 10, i.e. gamma = 20 in
    Mescheder's notation. D is :func:`critic_score` (the patch mean), as in :func:`gradient_penalty`.
    """
    _, g = critic_input_grad(critic_fn, real)
    return _sq_norm_per_sample(g)


def drift_penalty(d_real: Array) -> Array:
    """Per-sample drift term ``D(real)^2``, (B,); keeps WGAN critic values near 0.

    Karras et al. 2018 (Progressive GAN), sec. A.1: ``eps_drift E[D(x)^2]`` with eps_drift = 1e-3.
    """
    return jnp.square(critic_score(d_real))


# ---- losses -----------------------------------------------------------------------------------------
def wgan_critic_loss(d_real: Array, d_fake: Array) -> Array:
    """``D(fake) - D(real)`` per sample, (B,). Gulrajani et al. 2017, eq. (3) (critic minimises it)."""
    return critic_score(d_fake) - critic_score(d_real)


def wgan_generator_loss(d_fake: Array) -> Array:
    """``-D(fake)`` per sample, (B,). Arjovsky et al. 2017 / Gulrajani et al. 2017, Algorithm 1, line 11."""
    return -critic_score(d_fake)


def hinge_critic_loss(d_real: Array, d_fake: Array) -> Array:
    """``0.5 (mean_p relu(1 - d_real) + mean_p relu(1 + d_fake))`` per sample over patch logits p, (B,).

    taming ``hinge_d_loss`` as used by LDM ``contperceptual.py``; its batch mean is LDM's global mean.
    """
    return 0.5 * (_per_logit_mean(jax.nn.relu(1.0 - d_real.astype(jnp.float32)))
                  + _per_logit_mean(jax.nn.relu(1.0 + d_fake.astype(jnp.float32))))


def hinge_generator_loss(d_fake: Array) -> Array:
    """``-mean_p d_fake`` per sample, (B,): LDM's ``g_loss = -torch.mean(logits_fake)``."""
    return -critic_score(d_fake)


def ns_critic_loss(d_real: Array, d_fake: Array) -> Array:
    """``mean_p [softplus(-d_real) + softplus(d_fake)]`` per sample, (B,).

    Non-saturating logistic GAN (Goodfellow et al. 2014) in logit form, as in Mescheder et al. 2018, eq. (1).
    """
    return (_per_logit_mean(jax.nn.softplus(-d_real.astype(jnp.float32)))
            + _per_logit_mean(jax.nn.softplus(d_fake.astype(jnp.float32))))


def ns_generator_loss(d_fake: Array) -> Array:
    """``mean_p softplus(-d_fake)`` per sample, (B,): the non-saturating generator loss (Goodfellow et al. 2014)."""
    return _per_logit_mean(jax.nn.softplus(-d_fake.astype(jnp.float32)))


# ---- registry, validation and the critic combiner ---------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CriticObjective:
    """An adversarial objective's functions and weights (hashable; safe to close over in a jitted step).

    ``critic_loss(d_real, d_fake) -> (B,)``; ``generator_loss(d_fake) -> (B,)``; ``penalty`` is
    ``"gp"``, ``"r1"`` or ``None``; ``penalty_weight`` multiplies it and ``drift_weight`` multiplies
    :func:`drift_penalty` in :func:`critic_loss_terms`.
    """

    name: str
    critic_loss: Callable[[Array, Array], Array]
    generator_loss: Callable[[Array], Array]
    penalty: str | None
    penalty_weight: float
    drift_weight: float = 0.0


_REGISTRY = {
    "wgan-gp": (wgan_critic_loss, wgan_generator_loss, "gp", 10.0),
    "hinge": (hinge_critic_loss, hinge_generator_loss, None, 0.0),
    "ns-r1": (ns_critic_loss, ns_generator_loss, "r1", 10.0),
}


def normed_channels(ndf: int, n_layers: int = 3) -> tuple[int, ...]:
    """The channel counts of :class:`PatchGAN`'s normalised convs (``main_2``, ``main_5``, ...)."""
    return tuple(ndf * min(2 ** n, 8) for n in range(1, n_layers + 1))


def validate_critic(norm: str, objective: str, ndf: int | None = None, n_layers: int = 3,
                    groups: int = 32) -> None:
    """Refuse a critic configuration that cannot work, with a one-line ValueError, before any compute.
    With ``ndf`` given, the width is checked too: at least 1, and for group norm every normalised conv's
    channel count (:func:`normed_channels`) divisible by ``groups``."""
    if norm not in NORMS:
        raise ValueError(f"unknown critic norm {norm!r}; choose one of {NORMS}")
    if objective not in _REGISTRY:
        raise ValueError(f"unknown critic objective {objective!r}; choose one of {OBJECTIVES}")
    if norm == "batch" and objective in PER_SAMPLE_PENALTY_OBJECTIVES:
        raise ValueError(f"critic norm 'batch' cannot be used with objective {objective!r}: batch statistics "
                         f"couple the samples, so its per-sample gradient penalty is invalid; use norm 'layer'")
    if ndf is None:
        return
    if ndf < 1 or n_layers < 1:
        raise ValueError(f"critic width ndf ({ndf}) and n_layers ({n_layers}) must be >= 1")
    if norm == "group":
        bad = [c for c in normed_channels(ndf, n_layers) if c % groups]
        if bad:
            raise ValueError(f"critic norm 'group' needs channel counts divisible by {groups} groups, but "
                             f"critic_ndf {ndf} gives {bad[0]} channels; use critic_ndf a multiple of "
                             f"{groups // math.gcd(2, groups)}, or norm 'layer'")


def critic_objective(name: str = "wgan-gp", *, norm: str = "layer", penalty_weight: float | None = None,
                     drift_weight: float = 0.0) -> CriticObjective:
    """The objective ``name`` in ``{"wgan-gp" (default), "hinge", "ns-r1"}``, validated against ``norm``.

    ``penalty_weight`` defaults to 10 (GP lambda, Gulrajani et al.; R1 weight of the Furception lead's code).
    ``drift_weight`` (default 0; 1e-3 in Karras et al. 2018) adds :func:`drift_penalty`.
    """
    validate_critic(norm, name)
    critic_loss, generator_loss, penalty, default_weight = _REGISTRY[name]
    weight = default_weight if penalty_weight is None else float(penalty_weight)
    if penalty is None and weight != 0.0:
        raise ValueError(f"objective {name!r} has no penalty, but penalty_weight={weight} was given")
    if weight < 0 or drift_weight < 0:
        raise ValueError(f"penalty_weight ({weight}) and drift_weight ({drift_weight}) must be >= 0")
    return CriticObjective(name, critic_loss, generator_loss, penalty, weight, float(drift_weight))


def critic_loss_terms(objective: CriticObjective, critic_fn: CriticFn, real: Array, fake: Array,
                      rng: Array) -> dict[str, Array]:
    """Every term of the critic step, per sample (B,) float32; ``terms["total"].mean()`` is the loss.

    ``total = critic_loss + penalty_weight * penalty + drift_weight * drift``. ``real`` and ``fake`` are
    critic inputs (see :func:`critic_input`); ``fake`` should be the generator's output with no gradient
    path to the generator (the step differentiates with respect to the critic's params only). ``rng`` draws
    the GP interpolation weights. Also returns ``d_real`` and ``d_fake`` (scores) for logging.
    """
    d_real = critic_fn(real)
    d_fake = critic_fn(fake)
    adv = objective.critic_loss(d_real, d_fake)
    if objective.penalty == "gp":
        penalty = gradient_penalty(critic_fn, real, fake, rng)
    elif objective.penalty == "r1":
        penalty = r1_penalty(critic_fn, real)
    else:
        penalty = jnp.zeros_like(adv)
    drift = drift_penalty(d_real)
    total = adv + objective.penalty_weight * penalty + objective.drift_weight * drift
    return {"total": total, "critic_loss": adv, "penalty": penalty, "drift": drift,
            "d_real": critic_score(d_real), "d_fake": critic_score(d_fake)}
