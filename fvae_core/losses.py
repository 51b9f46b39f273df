"""Training losses: the one home for every loss term of fvae.

Each term is a small pure function that returns **unreduced per-sample values** (shape ``(B,)``);
the batch reduction and the weighting of terms belong to the combiner, which is the only place that
applies weights across terms and returns a dict of every term. Layout of this file:

1. Pixel losses (this section): :func:`mae`, :func:`mse`, :func:`pixel_loss`, the MAE-share
   schedule :func:`mae_share_schedule` / :func:`furception_pixel_weights`, and the published
   weightings :data:`LOSS_DEFAULTS`.
2. The adaptive adversarial weight :func:`adaptive_gan_weight` (LDM). LPIPS lives in
   :mod:`fvae_core.lpips`, critic objectives in :mod:`fvae_core.critic`; the train step
   (:mod:`fvae_core.train_steps`) combines the terms and returns a dict of every one.

Ranges: pixel losses take **[0, 1]** sRGB-encoded images (the data range of
:mod:`fvae_core.conventions`); a train step converts decoder outputs with
``conventions.from_model_range`` first (no clipping, so out-of-range outputs are penalised, see
:mod:`fvae_core.color`). Colour spaces come from :mod:`fvae_core.color`.
"""
from __future__ import annotations

import dataclasses
import numbers
import types

import jax
import jax.numpy as jnp
import numpy as np

from fvae_core.color import LOSS_SPACES, to_loss_space

__all__ = [
    "mae",
    "mse",
    "pixel_loss",
    "mae_share_schedule",
    "furception_pixel_weights",
    "ReconLossDefaults",
    "LOSS_DEFAULTS",
    "adaptive_gan_weight",
]


# ----------------------------------------------------------------------------------------------
# Pixel losses
# ----------------------------------------------------------------------------------------------

def _pair(x, y, what: str) -> tuple[jax.Array, jax.Array]:
    x, y = jnp.asarray(x), jnp.asarray(y)
    dtype = jnp.promote_types(jnp.promote_types(x.dtype, y.dtype), jnp.float32)
    if x.shape != y.shape:
        raise ValueError(f"{what}: shape mismatch {x.shape} vs {y.shape}")
    if x.ndim < 2:
        raise ValueError(f"{what}: expected (B, ..., C) arrays, got shape {x.shape}")
    return x.astype(dtype), y.astype(dtype)


def _channel_weights(channel_weights, num_channels: int, dtype) -> jax.Array | None:
    """Weights normalised to sum to C, so that uniform weights give the plain mean."""
    if channel_weights is None:
        return None
    w = jnp.asarray(channel_weights, dtype=dtype)
    if w.shape != (num_channels,):
        raise ValueError(f"channel_weights must have shape ({num_channels},), got {w.shape}")
    try:  # values are checked when concrete; traced weights (under jit) are the caller's care
        w_np = np.asarray(channel_weights, dtype=np.float64)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        w_np = None
    if w_np is not None and (np.any(w_np < 0) or not np.sum(w_np) > 0
                             or not np.all(np.isfinite(w_np))):
        raise ValueError(f"channel_weights must be finite, >= 0 and not all 0, got {w_np}")
    return w * (num_channels / jnp.sum(w))


def _per_sample_mean(err: jax.Array, channel_weights) -> jax.Array:
    w = _channel_weights(channel_weights, err.shape[-1], err.dtype)
    if w is not None:
        err = err * w
    return jnp.mean(err, axis=tuple(range(1, err.ndim)))


def mae(x, y, channel_weights=None) -> jax.Array:
    """Mean absolute error per sample: ``MAE_b = 1/(H W C) sum_{h,w,c} w_c |x - y|_{b,h,w,c}``.

    ``x``, ``y``: ``(B, ..., C)`` arrays, same shape. ``channel_weights``: ``None`` or ``(C,)``
    non-negative weights, **normalised to sum to C** (``w_c = C v_c / sum v``), so only their ratios
    matter and ``(1, 1, 1)`` equals ``None``. Returns ``(B,)``.
    Reference: the L1 term of LDM / taming (``rec = |x - x̂|``), mean instead of sum.
    """
    x, y = _pair(x, y, "mae")
    return _per_sample_mean(jnp.abs(x - y), channel_weights)


def mse(x, y, channel_weights=None) -> jax.Array:
    """Mean squared error per sample: ``MSE_b = 1/(H W C) sum_{h,w,c} w_c (x - y)^2_{b,h,w,c}``.

    Same shapes and channel-weight normalisation as :func:`mae`. Returns ``(B,)``.
    Reference: sd-vae-ft-mse (Stability model card: "MSE + 0.1 LPIPS"); optax ``squared_error``.
    """
    x, y = _pair(x, y, "mse")
    return _per_sample_mean(jnp.square(x - y), channel_weights)


def pixel_loss(x01, y01, space: str = "oklab", w_mae=1.0, w_mse=0.0, channel_weights=None
               ) -> jax.Array:
    """Weighted pixel loss in a colour space: ``w_mae MAE(T x, T y) + w_mse MSE(T x, T y)``, ``(B,)``.

    ``T = color.to_loss_space(., space)``, ``space`` in :data:`fvae_core.color.LOSS_SPACES`.
    ``x01`` (reconstruction) and ``y01`` (target) are NHWC, sRGB-encoded, **data range [0, 1]**;
    the reconstruction is not clipped (out-of-range values have a defined, differentiable Oklab
    value). ``w_mae``/``w_mse`` may be traced (e.g. from :func:`furception_pixel_weights`).
    ``channel_weights`` (e.g. L vs a, b in Oklab) is shared by both terms, see :func:`mae`.
    Reference: Furception (drhead/vae_training_tools) computes ``s MAE + 10 (1-s) 0.5 SE`` in Oklab.
    """
    if space not in LOSS_SPACES:
        raise ValueError(f"unknown loss space {space!r}; expected one of {LOSS_SPACES}")
    tx, ty = to_loss_space(x01, space), to_loss_space(y01, space)
    return w_mae * mae(tx, ty, channel_weights) + w_mse * mse(tx, ty, channel_weights)


def mae_share_schedule(step, start: float = 1.0, end: float = 0.6, steps: int = 100_000
                       ) -> jax.Array:
    """Cosine schedule of the MAE share ``s(t)``, a float32 ``jnp`` value (traced ``step`` is fine).

    ``s(t) = end + (start - end) (1 + cos(pi min(max(t, 0), steps) / steps)) / 2``: ``start`` at 0,
    the midpoint at ``steps/2``, ``end`` from ``steps`` on. Equals
    ``optax.cosine_decay_schedule(start, steps, alpha=end/start)``.
    Reference: the Furception lead's public code moves the MAE share from 1.0 to 0.6 by cosine
    over 100k steps (``reference/recipe.md``).
    """
    if isinstance(steps, numbers.Real) and not steps > 0:
        raise ValueError(f"steps must be > 0, got {steps}")
    frac = jnp.clip(jnp.asarray(step, dtype=jnp.float32) / steps, 0.0, 1.0)
    return end + (start - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))


def furception_pixel_weights(step, start: float = 1.0, end: float = 0.6, steps: int = 100_000
                             ) -> tuple[jax.Array, jax.Array]:
    """``(w_mae, w_mse) = (s, 10 (1 - s) 0.5)`` with ``s =`` :func:`mae_share_schedule`.

    Use as ``pixel_loss(x01, y01, "oklab", *furception_pixel_weights(step))`` to get the authors'
    mix ``1.0 s MAE + 10 (1 - s) 0.5 SE`` (squared error averaged like :func:`mse`).
    At step 0 this is pure MAE; from 100k on it is ``0.6 MAE + 2.0 MSE``.
    """
    s = mae_share_schedule(step, start, end, steps)
    return s, 10.0 * (1.0 - s) * 0.5


@dataclasses.dataclass(frozen=True)
class ReconLossDefaults:
    """A published reconstruction-loss weighting, restated in fvae units.

    ``w_mae``/``w_mse`` are for :func:`pixel_loss` (inputs in [0, 1]); a loss published on [-1, 1]
    images is converted (``|Δ|`` doubles and ``Δ²`` quadruples on [-1, 1]). ``w_lpips`` multiplies
    a per-sample LPIPS on [-1, 1] inputs. With ``mae_share_schedule`` the pixel weights are
    ``w_mae s(t)`` and ``w_mse (1 - s(t))`` (:func:`furception_pixel_weights`).
    """

    published: str
    space: str
    w_mae: float
    w_mse: float
    w_lpips: float
    mae_share_schedule: bool
    source: str


#: Published weightings (see ``reference/recipe.md``):
#:
#: ============== ================================ ====== ===== ===== ===== ========
#: name           published                        space  mae   mse   lpips schedule
#: ============== ================================ ====== ===== ===== ===== ========
#: ldm            L1 1.0 + LPIPS 1.0 on [-1, 1]    srgb   2.0   0     1.0   no
#: sd-vae-ft-ema  L1 + LPIPS                       srgb   2.0   0     1.0   no
#: sd-vae-ft-mse  MSE + 0.1 LPIPS                  srgb   0     4.0   0.1   no
#: furception     s MAE + 10(1-s)0.5 SE + 1 LPIPS  oklab  1.0   5.0   1.0   yes
#: ============== ================================ ====== ===== ===== ===== ========
LOSS_DEFAULTS = types.MappingProxyType({
    "ldm": ReconLossDefaults(
        published="sum(|x - x̂| + 1.0 LPIPS)/B on [-1, 1] images, logvar fixed at 0",
        space="srgb", w_mae=2.0, w_mse=0.0, w_lpips=1.0, mae_share_schedule=False,
        source="CompVis latent-diffusion ldm/modules/losses/contperceptual.py (perceptual_weight "
               "1.0). LPIPS is broadcast over pixels and everything summed, so the L1-mean : LPIPS "
               "ratio is 1 : 1 up to the constant H W C; L1 on [-1, 1] = 2 x L1 on [0, 1]."),
    "sd-vae-ft-ema": ReconLossDefaults(
        published="L1 + LPIPS (decoder only, EMA, 313,198 steps)",
        space="srgb", w_mae=2.0, w_mse=0.0, w_lpips=1.0, mae_share_schedule=False,
        source="Stability AI sd-vae-ft-ema model card; weights assumed as LDM's (1.0, 1.0) on "
               "[-1, 1] images."),
    "sd-vae-ft-mse": ReconLossDefaults(
        published="MSE + 0.1 LPIPS (a further 280k steps from ft-EMA)",
        space="srgb", w_mae=0.0, w_mse=4.0, w_lpips=0.1, mae_share_schedule=False,
        source="Stability AI sd-vae-ft-mse model card; MSE assumed on [-1, 1] images as in the "
               "LDM codebase (MSE on [-1, 1] = 4 x MSE on [0, 1])."),
    "furception": ReconLossDefaults(
        published="1.0 s(t) MAE + 10 (1 - s(t)) 0.5 SE in Oklab + 1.0 LPIPS(sRGB); s: cosine "
                  "1.0 -> 0.6 over 100k steps",
        space="oklab", w_mae=1.0, w_mse=5.0, w_lpips=1.0, mae_share_schedule=True,
        source="drhead/vae_training_tools (Furception lead's public code), via reference/recipe.md. "
               "Its images are [0, 1] (it feeds LPIPS [0, 1], a bug), and its Oklab applies M.T "
               "(a bug), so its effective pixel weights differ from these correct-Oklab ones."),
})


# ----------------------------------------------------------------------------------------------
# Adaptive adversarial weight
# ----------------------------------------------------------------------------------------------

def adaptive_gan_weight(rec_grad_norm, adv_grad_norm, ratio: float = 0.5, eps: float = 1e-4,
                        max_weight: float = 1e4) -> jax.Array:
    """LDM's adaptive weight of the generator's adversarial term, not differentiated:

    ``w = ratio * ||dL_rec/dW|| / (||dL_adv/dW|| + eps)``, clamped to ``[0, max_weight]``,
    where W is the decoder's last conv kernel. After weighting, ``||d(w L_adv)/dW|| = ratio ||dL_rec/dW||``
    (up to eps) -- with ``ratio = 0.5`` the card's "gradient norm for the discriminator is half that of
    the reconstruction loss". Reference: CompVis latent-diffusion ``contperceptual.py``
    ``calculate_adaptive_weight`` (eps 1e-4, clamp 1e4, detach, times ``disc_weight`` 0.5).
    """
    w = jnp.asarray(rec_grad_norm, jnp.float32) / (jnp.asarray(adv_grad_norm, jnp.float32) + eps)
    return jax.lax.stop_gradient(ratio * jnp.clip(w, 0.0, max_weight))
