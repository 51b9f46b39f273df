"""fvae_core.color against an independent float64 oracle (coloraide), plus the JAX pitfalls.

Tolerances (float32 JAX vs float64 coloraide, whose matrices are derived independently via XYZ D65):
* forward sRGB -> Oklab: ATOL_FWD = 5e-6. Each stage is a few float32 ulps (6e-8 relative) of
  O(1) values, amplified by at most the row-abs-sums of the matrices (|M2|_inf = 4.9); measured
  worst case over 10k colours is 4e-7 in range, 7e-7 on [-0.2, 1.3]; the published 10-digit
  matrices themselves differ from coloraide's by <= 3e-7 there.
* inverse Oklab -> sRGB: ATOL_INV = 5e-5. The cube triples relative errors, M1inv (|M1inv|_inf =
  7.6) cancels O(1) LMS values into small linear values, and the sRGB encode has slope up to 12.92
  near black: 3 * 7.6 * 6e-8 * 12.92 ~ 2e-5; measured 9e-6 in range, 2e-5 on [-0.2, 1.3].
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from coloraide import Color

from fvae_core import color
from fvae_core.color import (CBRT_KNEE, LMS_FROM_LINEAR, LOSS_SPACES, OKLAB_FROM_LMS_CBRT,
                             linear_from_oklab, linear_from_srgb, oklab_from_linear,
                             oklab_from_srgb, signed_cbrt, srgb_from_linear, srgb_from_oklab,
                             to_loss_space)

ATOL_FWD = 5e-6
ATOL_INV = 5e-5
N_ORACLE = 10_000


def _oracle(space_from: str, space_to: str, values: np.ndarray) -> np.ndarray:
    return np.array([Color(space_from, list(map(float, v))).convert(space_to).coords()
                     for v in values.reshape(-1, 3)]).reshape(values.shape)


@functools.lru_cache(maxsize=None)
def _oracle_set(lo: float, hi: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """N_ORACLE random sRGB colours in [lo, hi]^3 and their coloraide Oklab values (float64)."""
    srgb = np.random.default_rng(seed).uniform(lo, hi, size=(N_ORACLE, 3))
    return srgb, _oracle("srgb", "oklab", srgb)


RANGES = {"in_range": (0.0, 1.0, 0), "out_of_range": (-0.2, 1.3, 1)}


# -- oracle agreement ---------------------------------------------------------------------------

@pytest.mark.parametrize("which", sorted(RANGES))
def test_oklab_from_srgb_matches_coloraide(which):
    srgb, lab = _oracle_set(*RANGES[which])
    got = np.asarray(oklab_from_srgb(srgb.astype(np.float32)))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, lab, rtol=0, atol=ATOL_FWD)


@pytest.mark.parametrize("which", sorted(RANGES))
def test_srgb_from_oklab_matches_coloraide(which):
    srgb, lab = _oracle_set(*RANGES[which])
    # coloraide's own inverse of its Oklab values is the identity to 1e-13; check that, then ours.
    np.testing.assert_allclose(_oracle("oklab", "srgb", lab[:200]), srgb[:200], atol=1e-12)
    got = np.asarray(srgb_from_oklab(lab.astype(np.float32)))
    np.testing.assert_allclose(got, srgb, rtol=0, atol=ATOL_INV)


@pytest.mark.parametrize("which", sorted(RANGES))
def test_srgb_transfer_matches_coloraide(which):
    srgb, _ = _oracle_set(*RANGES[which])
    srgb = srgb[:2000]
    lin = _oracle("srgb", "srgb-linear", srgb)
    np.testing.assert_allclose(np.asarray(linear_from_srgb(srgb.astype(np.float32))), lin,
                               rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(srgb_from_linear(lin.astype(np.float32))), srgb,
                               rtol=2e-6, atol=1e-6)


def test_random_oklab_points_invert_like_coloraide():
    """Arbitrary Oklab points (mostly out of the sRGB gamut) -> sRGB, unclipped, as coloraide."""
    rng = np.random.default_rng(2)
    lab = np.stack([rng.uniform(0, 1, 2000), rng.uniform(-0.3, 0.3, 2000),
                    rng.uniform(-0.3, 0.3, 2000)], axis=-1)
    want = _oracle("oklab", "srgb", lab)
    got = np.asarray(srgb_from_oklab(lab.astype(np.float32)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=ATOL_INV)


# -- reference vectors and the transposed-matrix bug ----------------------------------------------

REFERENCE = {  # evaluation.md, "Reference vectors (sRGB in, Oklab out)"
    "white": ((1.0, 1.0, 1.0), (1.0, 0.0, 0.0)),
    "red": ((1.0, 0.0, 0.0), (0.627955, 0.224863, 0.125846)),
    "green": ((0.0, 1.0, 0.0), (0.866440, -0.233888, 0.179498)),
    "blue": ((0.0, 0.0, 1.0), (0.452014, -0.032457, -0.311528)),
    "black": ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_vectors(name):
    srgb, lab = REFERENCE[name]
    # The table has 6 decimals: rounding 5e-7 + float32.
    np.testing.assert_allclose(np.asarray(oklab_from_srgb(np.array(srgb, np.float32))), lab,
                               rtol=0, atol=2e-6)
    # The inverse of the rounded table values: compare with coloraide's inverse of the same values
    # (the 5e-7 rounding alone moves green's red channel by 3e-5).
    np.testing.assert_allclose(np.asarray(srgb_from_oklab(np.array(lab, np.float32))),
                               _oracle("oklab", "srgb", np.array(lab)), rtol=0, atol=ATOL_INV)


def test_grey_lightness():
    lab = np.asarray(oklab_from_srgb(np.full(3, 0.5, np.float32)))
    np.testing.assert_allclose(lab, (0.598181, 0.0, 0.0), atol=2e-6)


def test_black_is_exactly_zero():
    assert np.all(np.asarray(oklab_from_srgb(jnp.zeros(3))) == 0.0)
    assert np.all(np.asarray(srgb_from_oklab(jnp.zeros(3))) == 0.0)


def _white_is_unit_l(lab) -> bool:
    return bool(np.allclose(np.asarray(lab), (1.0, 0.0, 0.0), atol=1e-5))


def test_transposed_matrix_bug_is_caught():
    """recipe.md bug 1: ``tensordot(x, M, axes=[3, 0])`` applies M.T. The white check that
    fvae passes must fail for that implementation, so the check discriminates."""
    white = jnp.ones((1, 1, 1, 3), jnp.float32)

    def transposed_oklab(x):  # the anchor's bug, re-implemented here on purpose
        lms = jnp.tensordot(linear_from_srgb(x), jnp.asarray(LMS_FROM_LINEAR, jnp.float32),
                            axes=[3, 0])
        return jnp.tensordot(jnp.cbrt(lms), jnp.asarray(OKLAB_FROM_LMS_CBRT, jnp.float32),
                             axes=[3, 0])

    assert _white_is_unit_l(oklab_from_srgb(white)[0, 0, 0])
    buggy = np.asarray(transposed_oklab(white))[0, 0, 0]
    np.testing.assert_allclose(buggy, (2.4755, -1.3472, -0.2352), atol=1e-3)
    assert not _white_is_unit_l(buggy)


def test_matrices_are_applied_row_wise():
    """l = 0.4122214708 r + 0.5363325363 g + 0.0514459929 b, written out by hand."""
    r, g, b = 0.3, 0.6, 0.1
    l_ = 0.4122214708 * r + 0.5363325363 * g + 0.0514459929 * b
    m = 0.2119034982 * r + 0.6806995451 * g + 0.1073969566 * b
    s = 0.0883024619 * r + 0.2817188376 * g + 0.6299787005 * b
    cl, cm, cs = np.cbrt([l_, m, s])
    want = (0.2104542553 * cl + 0.7936177850 * cm - 0.0040720468 * cs,
            1.9779984951 * cl - 2.4285922050 * cm + 0.4505937099 * cs,
            0.0259040371 * cl + 0.7827717662 * cm - 0.8086757660 * cs)
    got = np.asarray(oklab_from_linear(np.array([r, g, b], np.float32)))
    np.testing.assert_allclose(got, want, atol=1e-6)


# -- gradients at black and out of range ----------------------------------------------------------

@functools.partial(jax.jit, static_argnums=0)
def _jac_and_vjp(f, x):
    return jax.jacfwd(f)(x), jax.grad(lambda v: jnp.sum(f(v) * jnp.arange(1.0, 4.0)))(x)


def _grads_finite(f, x) -> bool:
    """Forward-mode Jacobian and a reverse-mode VJP, both finite."""
    jac, vjp = _jac_and_vjp(f, x)
    return bool(np.all(np.isfinite(np.asarray(jac))) and np.all(np.isfinite(np.asarray(vjp))))


@pytest.mark.parametrize("f", [oklab_from_srgb, oklab_from_linear, linear_from_srgb,
                               srgb_from_linear, srgb_from_oklab, linear_from_oklab],
                         ids=lambda f: f.__name__)
def test_gradients_finite_at_zero(f):
    assert _grads_finite(f, jnp.zeros(3, jnp.float32))


def test_naive_cbrt_would_give_nan_gradient_at_black():
    """Shows the gradient tests above discriminate: plain jnp.cbrt at black is not finite."""
    def naive(x):
        lms = linear_from_srgb(x) @ jnp.asarray(LMS_FROM_LINEAR.T, jnp.float32)
        return jnp.cbrt(lms) @ jnp.asarray(OKLAB_FROM_LMS_CBRT.T, jnp.float32)

    assert not _grads_finite(naive, jnp.zeros(3, jnp.float32))
    assert _grads_finite(oklab_from_srgb, jnp.zeros(3, jnp.float32))


def test_srgb_linear_segment_keeps_true_slope_at_zero():
    d_dec = jax.grad(lambda c: linear_from_srgb(jnp.stack([c, c, c]))[0])(0.0)
    d_enc = jax.grad(lambda c: srgb_from_linear(jnp.stack([c, c, c]))[0])(0.0)
    np.testing.assert_allclose([d_dec, d_enc], [1 / 12.92, 12.92], rtol=1e-6)


@pytest.mark.parametrize("f", [oklab_from_srgb, srgb_from_oklab, linear_from_srgb,
                               srgb_from_linear], ids=lambda f: f.__name__)
def test_out_of_range_values_and_gradients_finite(f):
    vals = jnp.array([[-0.2, 1.3, 0.5], [-1.0, -1.0, -1.0], [2.0, -0.5, 0.04045],
                      [1.3, 1.3, 1.3], [-0.0031308, 0.0031308, 0.0]], jnp.float32)
    out = f(vals)
    assert np.all(np.isfinite(np.asarray(out)))
    for v in vals:
        assert _grads_finite(f, v)


def test_pixel_loss_gradient_finite_at_black_and_out_of_range():
    from fvae_core.losses import pixel_loss

    y = np.random.default_rng(3).random((1, 4, 4, 3))
    # One batch holds every (reconstruction, target) pair: black, -0.2 and 1.3 vs random and black.
    xs, ys = [], []
    for fill in (0.0, -0.2, 1.3):
        for target in (y, np.zeros_like(y)):
            xs.append(np.full_like(y, fill))
            ys.append(target)
    x, y = jnp.asarray(np.concatenate(xs), jnp.float32), jnp.asarray(np.concatenate(ys), jnp.float32)
    for space in LOSS_SPACES:
        g = jax.jit(jax.grad(lambda v: jnp.sum(pixel_loss(v, y, space, 1.0, 1.0))))(x)
        assert np.all(np.isfinite(np.asarray(g))), space
    # Out-of-range outputs are pushed back toward the target, not left with zero gradient.
    # (MSE, so the a/b terms of these greys, equal up to rounding, contribute ~0.)
    def loss(v):
        return jnp.sum(pixel_loss(v, jnp.full_like(v, 0.5), "oklab", w_mae=0.0, w_mse=1.0))

    assert np.all(np.asarray(jax.grad(loss)(jnp.full((1, 2, 2, 3), 1.3))) > 0)
    assert np.all(np.asarray(jax.grad(loss)(jnp.full((1, 2, 2, 3), -0.2))) < 0)


# -- round trips, monotonicity, the near-zero cube root ---------------------------------------------

@pytest.mark.parametrize("which", sorted(RANGES))
def test_roundtrip_srgb_oklab_srgb(which):
    srgb, _ = _oracle_set(*RANGES[which])
    x = srgb.astype(np.float32)
    np.testing.assert_allclose(np.asarray(srgb_from_oklab(oklab_from_srgb(x))), x, atol=ATOL_INV)
    np.testing.assert_allclose(np.asarray(srgb_from_linear(linear_from_srgb(x))), x, atol=2e-6)


def test_roundtrip_near_black_and_tiny_values():
    x = jnp.array([[1e-8, 0.0, 0.0], [-1e-6, 1e-7, 2e-7], [1e-4, 1e-4, 1e-4], [0.0, 0.0, 1e-3]],
                  jnp.float32)
    np.testing.assert_allclose(np.asarray(srgb_from_oklab(oklab_from_srgb(x))), x, atol=1e-6)


def test_signed_cbrt_segment():
    eps = CBRT_KNEE
    t = eps ** (1 / 3)
    # Exact outside the segment (also for negative inputs), odd, zero at zero.
    x = jnp.array([eps, 2 * eps, 1e-6, 0.5, 8.0, 1e3], jnp.float32)
    np.testing.assert_array_equal(np.asarray(signed_cbrt(x)), np.asarray(jnp.cbrt(x)))
    np.testing.assert_array_equal(np.asarray(signed_cbrt(-x)), -np.asarray(signed_cbrt(x)))
    assert float(signed_cbrt(0.0)) == 0.0
    # Inside: monotone, error <= 0.334 t (the documented bound), slope (4/3)/t^2 at 0.
    u = np.linspace(-1, 1, 4001) * eps
    y = np.asarray(signed_cbrt(jnp.asarray(u, jnp.float32)), np.float64)
    assert np.all(np.diff(y) >= 0)
    assert np.max(np.abs(y - np.cbrt(u))) <= 0.3341 * t * (1 + 1e-5)
    np.testing.assert_allclose(float(jax.grad(signed_cbrt)(0.0)), 4 / 3 / t**2, rtol=1e-5)
    # C1 at the knee: the slopes on either side agree.
    inside = float(jax.grad(signed_cbrt)(eps * (1 - 1e-6)))
    outside = float(jax.grad(signed_cbrt)(eps * (1 + 1e-6)))
    np.testing.assert_allclose(inside, outside, rtol=1e-4)
    np.testing.assert_allclose(outside, 1 / 3 / t**2, rtol=1e-4)


def test_srgb_transfer_continuous_at_thresholds():
    d = jnp.array([0.04045 * (1 - 1e-6), 0.04045 * (1 + 1e-6)], jnp.float32)
    e = jnp.array([0.0031308 * (1 - 1e-6), 0.0031308 * (1 + 1e-6)], jnp.float32)
    lo, hi = np.asarray(linear_from_srgb(jnp.stack([d] * 3, -1)))[:, 0]
    assert abs(hi - lo) < 1e-7
    lo, hi = np.asarray(srgb_from_linear(jnp.stack([e] * 3, -1)))[:, 0]
    assert abs(hi - lo) < 1e-6


def test_out_of_range_maps_monotonically():
    c = jnp.linspace(-0.5, 1.5, 2001, dtype=jnp.float32)
    grey = jnp.stack([c] * 3, -1)
    big_l = np.asarray(oklab_from_srgb(grey))[:, 0]
    assert np.all(np.diff(big_l) > 0)
    lin = np.asarray(linear_from_srgb(grey))[:, 0]
    assert np.all(np.diff(lin) > 0)


# -- shapes, dtypes, dispatch ------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(3,), (5, 3), (2, 4, 6, 3), (2, 1, 2, 3, 3)])
def test_any_leading_shape(shape):
    x = jnp.asarray(np.random.default_rng(4).random(shape), jnp.float32)
    for f in (oklab_from_srgb, srgb_from_oklab, linear_from_srgb, srgb_from_linear):
        out = f(x)
        assert out.shape == shape and out.dtype == jnp.float32
    flat = np.asarray(oklab_from_srgb(x.reshape(-1, 3))).reshape(shape)
    # Not bit-equal: XLA:CPU may vectorise another shape's loop differently (FMA order in the cube root),
    # seen 2.3e-7 apart on one machine; a few float32 ulps of the largest value, far below any colour effect.
    np.testing.assert_allclose(np.asarray(oklab_from_srgb(x)), flat, atol=1e-6)


def test_low_precision_and_int_inputs_are_promoted():
    assert oklab_from_srgb(jnp.ones(3, jnp.bfloat16)).dtype == jnp.float32
    assert linear_from_srgb(np.array([0, 1, 0])).dtype == jnp.float32


def test_wrong_channel_count_raises():
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        oklab_from_srgb(jnp.zeros((2, 4)))


def test_jit():
    x = jnp.asarray(np.random.default_rng(5).random((2, 3, 3, 3)), jnp.float32)
    np.testing.assert_allclose(np.asarray(jax.jit(oklab_from_srgb)(x)),
                               np.asarray(oklab_from_srgb(x)), atol=1e-7)


def test_to_loss_space():
    x = jnp.asarray(np.random.default_rng(6).random((2, 3, 3, 3)), jnp.float32)
    assert LOSS_SPACES == ("srgb", "linear", "oklab")
    np.testing.assert_array_equal(np.asarray(to_loss_space(x, "srgb")), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(to_loss_space(x, "linear")),
                                  np.asarray(linear_from_srgb(x)))
    np.testing.assert_array_equal(np.asarray(to_loss_space(x, "oklab")),
                                  np.asarray(oklab_from_srgb(x)))
    with pytest.raises(ValueError, match="unknown loss space"):
        to_loss_space(x, "lab")


def test_inverse_is_exact_cube():
    lab = jnp.array([0.3, 0.1, -0.1], jnp.float32)
    lms_c = np.asarray(lab, np.float64) @ color.LMS_CBRT_FROM_OKLAB.T
    want = lms_c**3 @ color.LINEAR_FROM_LMS.T
    np.testing.assert_allclose(np.asarray(linear_from_oklab(lab)), want, atol=1e-6)
