"""Colour spaces: the one home for sRGB <-> linear sRGB <-> Oklab, in differentiable ``jax.numpy``.

Every function takes an array of any leading shape with the colour channels last (``(..., 3)``, RGB
or Lab order; NHWC images included) and returns the same shape. Inputs are computed in at least
float32 (bf16/f16/int inputs are promoted, because 16-bit floats alone err by ~4e-3 here).
sRGB inputs are the data-pipeline range of :mod:`fvae_core.conventions`: **[0, 1]**, sRGB-encoded.
A decoder output in the model range [-1, 1] must go through ``conventions.from_model_range`` first.

Sources
-------
* sRGB transfer: IEC 61966-2-1:1999. Decode ``c/12.92`` for ``c <= 0.04045``, else
  ``((c + 0.055)/1.055)**2.4``; encode ``12.92 c`` for ``c <= 0.0031308``, else
  ``1.055 c**(1/2.4) - 0.055``.
* Oklab: B. Ottosson, "A perceptual color space for image processing" (2020),
  https://bottosson.github.io/posts/oklab/ . ``lms = M1 @ rgb`` per pixel, ``lab = M2 @ cbrt(lms)``;
  inverse ``lms' = M2inv @ lab``, ``rgb = M1inv @ lms'**3``. The matrices are applied **row-wise**:
  ``l = 0.4122214708 r + 0.5363325363 g + 0.0514459929 b``, i.e. ``rgb @ M1.T``. (Applying ``M``
  instead of ``M.T`` -- ``tensordot(x, M, axes=[3, 0])`` in the Furception lead's code -- maps white
  to (2.48, -1.35, -0.24) instead of (1, 0, 0); ``tests/test_color.py`` guards against it.)
* Oracle for the tests: ``coloraide`` (float64, independent derivation of the matrices via XYZ D65).

Values outside [0, 1] (decoder outputs are not clamped)
-------------------------------------------------------
Clamping would zero the gradient exactly where the decoder most needs one, and ``c**2.4`` of a
negative ``c`` is NaN. Instead every stage is extended as an **odd, continuous, strictly increasing**
function of its input, the extension used by CSS Color 4 and by ``coloraide``:

* sRGB decode/encode: ``f(c) = sign(c) f(|c|)`` for ``c < 0``; above 1 the power law simply
  continues (``f(1.3) = 1.8233``).
* Cube root: signed, ``cbrt(-x) = -cbrt(x)`` (negative LMS arise from out-of-gamut colours).

So an out-of-gamut value maps to a finite, out-of-gamut Oklab value (e.g. sRGB (-0.2, 1.3, 0.5) ->
L = 1.0617), the map is monotone in each stage, and a pixel-loss gradient pushes it back toward the
target instead of vanishing. Round trips ``srgb -> oklab -> srgb`` are the identity on all reals
(up to float rounding and the near-zero bound below).

Near zero (black)
-----------------
``d cbrt(x)/dx = x**(-2/3)/3`` is infinite at 0, which turns black pixels into NaN gradients (and
``jnp.where`` alone does not help: the unselected branch's ``0 * inf`` is still NaN). The cube root
used here (:func:`signed_cbrt`) is exact ``cbrt`` for ``|x| >= CBRT_KNEE`` (1e-15, in LMS units) and,
below it, the odd cubic ``x/t**2 * (4/3 - (x/eps)**2/3)`` with ``t = eps**(1/3)``, which matches
``cbrt`` in value **and slope** at ``+-eps`` (C1, strictly increasing, exact 0 at 0). Its slope at 0
is ``(4/3) eps**(-2/3) = 1.33e10``: finite, and 4x the true ``cbrt`` slope at the knee -- a cap, not a
reshaping. The error it introduces is zero for ``|lms| >= 1e-15`` and at most
``0.334 eps**(1/3) = 3.34e-6`` in the cube-root domain below it, i.e. at most 3.4e-6 in L, 1.6e-5
in a and 5.4e-6 in b (row sums of ``|M2|``): within float32 tolerance of the oracle. In-gamut values
never reach the segment except exact black (which is exact): a nonzero [0, 1] value produced in
float32 by ``from_model_range`` is >= 3e-8, whose smallest LMS component is >= 1e-10.
The two sRGB power branches are evaluated on ``max(|c|, knee)`` so their unused gradients are finite
(the "safe where" pattern); the sRGB linear segments keep the true slopes 1/12.92 and 12.92 at 0.
The inverse direction uses the exact cube, so ``srgb -> oklab -> srgb`` differs from the identity
by at most ``|M1inv|_inf * eps = 7.6e-15`` (linear) inside the segment, and by float rounding
elsewhere.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "LOSS_SPACES",
    "CBRT_KNEE",
    "LMS_FROM_LINEAR",
    "OKLAB_FROM_LMS_CBRT",
    "LMS_CBRT_FROM_OKLAB",
    "LINEAR_FROM_LMS",
    "signed_cbrt",
    "linear_from_srgb",
    "srgb_from_linear",
    "oklab_from_linear",
    "linear_from_oklab",
    "oklab_from_srgb",
    "srgb_from_oklab",
    "to_loss_space",
]


def _frozen(rows) -> np.ndarray:
    a = np.array(rows, dtype=np.float64)
    a.setflags(write=False)
    return a


#: Ottosson's M1: linear sRGB -> LMS, applied row-wise (``lms = rgb @ M1.T``).
LMS_FROM_LINEAR = _frozen([[0.4122214708, 0.5363325363, 0.0514459929],
                           [0.2119034982, 0.6806995451, 0.1073969566],
                           [0.0883024619, 0.2817188376, 0.6299787005]])
#: Ottosson's M2: cbrt(LMS) -> Oklab (L, a, b), applied row-wise.
OKLAB_FROM_LMS_CBRT = _frozen([[0.2104542553, 0.7936177850, -0.0040720468],
                               [1.9779984951, -2.4285922050, 0.4505937099],
                               [0.0259040371, 0.7827717662, -0.8086757660]])
#: Ottosson's M2 inverse: Oklab -> cbrt(LMS).
LMS_CBRT_FROM_OKLAB = _frozen([[1.0, 0.3963377774, 0.2158037573],
                               [1.0, -0.1055613458, -0.0638541728],
                               [1.0, -0.0894841775, -1.2914855480]])
#: Ottosson's M1 inverse: LMS -> linear sRGB.
LINEAR_FROM_LMS = _frozen([[4.0767416621, -3.3077115913, 0.2309699292],
                           [-1.2684380046, 2.6097574011, -0.3413193965],
                           [-0.0041960863, -0.7034186147, 1.7076147010]])

#: Below this |LMS| the cube root is replaced by its C1 odd cubic (see the module docstring).
CBRT_KNEE = 1e-15

# IEC 61966-2-1 constants.
_DECODE_THRESHOLD = 0.04045
_ENCODE_THRESHOLD = 0.0031308
_LINEAR_SLOPE = 12.92
_GAMMA = 2.4
_OFFSET = 0.055

#: The spaces :func:`to_loss_space` knows: sRGB-encoded [0, 1] (identity), linear sRGB, Oklab.
LOSS_SPACES = ("srgb", "linear", "oklab")


def _as_float_rgb(x, what: str) -> jax.Array:
    x = jnp.asarray(x)
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if x.ndim < 1 or x.shape[-1] != 3:
        raise ValueError(f"{what}: expected channels-last arrays of shape (..., 3), got {x.shape}")
    return x


def _rowwise(x: jax.Array, m: np.ndarray) -> jax.Array:
    """``out_i = sum_j m[i, j] x_j`` over the last axis (``x @ m.T``). HIGHEST precision, because
    the default f32 matmul on GPUs/TPUs (TF32/bf16 passes) would err by ~1e-3 here."""
    return jnp.einsum("...j,ij->...i", x, jnp.asarray(m, dtype=x.dtype),
                      precision=jax.lax.Precision.HIGHEST)


@jax.jit
def signed_cbrt(x) -> jax.Array:
    """Odd cube root with finite slope at 0.

    ``cbrt(x)`` for ``|x| >= eps`` (eps = :data:`CBRT_KNEE`), else ``x/t**2 * (4/3 - (x/eps)**2/3)``
    with ``t = eps**(1/3)``: C1 at ``+-eps``, strictly increasing, slope ``(4/3)/t**2`` at 0, value
    error <= ``0.334 t`` inside the segment and 0 outside it. See the module docstring.
    """
    x = jnp.asarray(x)
    eps = CBRT_KNEE
    t = eps ** (1.0 / 3.0)
    small = jnp.abs(x) < eps
    safe = jnp.where(small, eps, x)  # keeps cbrt's (unused) gradient finite inside the segment
    u = x / eps
    cubic = (x / (t * t)) * (4.0 / 3.0 - (u * u) / 3.0)
    return jnp.where(small, cubic, jnp.cbrt(safe))


@jax.jit
def linear_from_srgb(srgb) -> jax.Array:
    """sRGB-encoded values -> linear-light sRGB (IEC 61966-2-1), odd-extended to all reals.

    ``c/12.92`` for ``|c| <= 0.04045``, else ``sign(c) ((|c| + 0.055)/1.055)**2.4``.
    """
    c = _as_float_rgb(srgb, "linear_from_srgb")
    a = jnp.abs(c)
    curve = ((jnp.maximum(a, _DECODE_THRESHOLD) + _OFFSET) / (1.0 + _OFFSET)) ** _GAMMA
    return jnp.where(a <= _DECODE_THRESHOLD, c / _LINEAR_SLOPE, jnp.sign(c) * curve)


@jax.jit
def srgb_from_linear(linear) -> jax.Array:
    """Linear-light sRGB -> sRGB-encoded values (IEC 61966-2-1), odd-extended to all reals.

    ``12.92 c`` for ``|c| <= 0.0031308``, else ``sign(c) (1.055 |c|**(1/2.4) - 0.055)``.
    """
    c = _as_float_rgb(linear, "srgb_from_linear")
    a = jnp.abs(c)
    curve = (1.0 + _OFFSET) * jnp.maximum(a, _ENCODE_THRESHOLD) ** (1.0 / _GAMMA) - _OFFSET
    return jnp.where(a <= _ENCODE_THRESHOLD, c * _LINEAR_SLOPE, jnp.sign(c) * curve)


@jax.jit
def oklab_from_linear(linear) -> jax.Array:
    """Linear sRGB -> Oklab (Ottosson 2020): ``lab = M2 @ signed_cbrt(M1 @ rgb)`` per pixel."""
    rgb = _as_float_rgb(linear, "oklab_from_linear")
    return _rowwise(signed_cbrt(_rowwise(rgb, LMS_FROM_LINEAR)), OKLAB_FROM_LMS_CBRT)


@jax.jit
def linear_from_oklab(oklab) -> jax.Array:
    """Oklab -> linear sRGB (Ottosson 2020): ``rgb = M1inv @ (M2inv @ lab)**3`` per pixel."""
    lab = _as_float_rgb(oklab, "linear_from_oklab")
    lms_cbrt = _rowwise(lab, LMS_CBRT_FROM_OKLAB)
    return _rowwise(lms_cbrt * lms_cbrt * lms_cbrt, LINEAR_FROM_LMS)


@jax.jit
def oklab_from_srgb(srgb) -> jax.Array:
    """sRGB-encoded values (data range [0, 1]; any real accepted) -> Oklab."""
    return oklab_from_linear(linear_from_srgb(srgb))


@jax.jit
def srgb_from_oklab(oklab) -> jax.Array:
    """Oklab -> sRGB-encoded values (not clipped: out-of-gamut colours leave [0, 1])."""
    return srgb_from_linear(linear_from_oklab(oklab))


def to_loss_space(x01, space: str) -> jax.Array:
    """Map a [0, 1] sRGB-encoded image (channels last) into the space a pixel loss is computed in.

    ``space`` is one of :data:`LOSS_SPACES`: ``"srgb"`` (the input itself, as float), ``"linear"``
    (:func:`linear_from_srgb`) or ``"oklab"`` (:func:`oklab_from_srgb`). Per-channel weights are
    applied by the loss, not here.
    """
    if space == "srgb":
        return _as_float_rgb(x01, "to_loss_space")
    if space == "linear":
        return linear_from_srgb(x01)
    if space == "oklab":
        return oklab_from_srgb(x01)
    raise ValueError(f"unknown loss space {space!r}; expected one of {LOSS_SPACES}")
