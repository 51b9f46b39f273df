"""fvae_core.losses pixel terms against NumPy references (optax ``_regression_test.py`` style)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from coloraide import Color

from fvae_core.color import LOSS_SPACES
from fvae_core.losses import (LOSS_DEFAULTS, furception_pixel_weights, mae, mae_share_schedule,
                              mse, pixel_loss)


def _np_weighted_mean(err: np.ndarray, w) -> np.ndarray:
    """Reference: per-sample mean over every non-batch axis, channels weighted by C w / sum(w)."""
    err = np.asarray(err, np.float64)
    if w is not None:
        w = np.asarray(w, np.float64)
        err = err * (err.shape[-1] * w / w.sum())
    return err.reshape(err.shape[0], -1).mean(axis=1)


def np_mae(x, y, w=None):
    return _np_weighted_mean(np.abs(np.float64(x) - np.float64(y)), w)


def np_mse(x, y, w=None):
    return _np_weighted_mean((np.float64(x) - np.float64(y)) ** 2, w)


def np_loss_space(x01: np.ndarray, space: str) -> np.ndarray:
    """Reference colour conversion: NumPy formulas for linear, coloraide (float64) for Oklab."""
    if space == "srgb":
        return np.float64(x01)
    if space == "linear":
        a = np.abs(x01)
        return np.where(a <= 0.04045, x01 / 12.92, np.sign(x01) * ((a + 0.055) / 1.055) ** 2.4)
    return np.array([Color("srgb", list(map(float, c))).convert("oklab").coords()
                     for c in x01.reshape(-1, 3)]).reshape(x01.shape)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.1, 1.1, (3, 5, 4, 3)).astype(np.float32)  # reconstructions, a bit out of range
    y = rng.random((3, 5, 4, 3)).astype(np.float32)
    return x, y


@pytest.mark.parametrize("weights", [None, (1.0, 1.0, 1.0), (2.0, 0.5, 0.5), (0.0, 1.0, 3.0)])
@pytest.mark.parametrize("fn,ref", [(mae, np_mae), (mse, np_mse)], ids=["mae", "mse"])
def test_pixel_terms_match_numpy(images, fn, ref, weights):
    x, y = images
    got = fn(x, y, weights)
    assert got.shape == (3,) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), ref(x, y, weights), rtol=1e-5, atol=1e-7)


def test_traced_channel_weights(images):
    x, y = images
    w = jnp.array([2.0, 0.5, 0.5])
    np.testing.assert_allclose(np.asarray(jax.jit(lambda v: mae(x, y, v))(w)),
                               np_mae(x, y, np.asarray(w)), rtol=1e-5)


def test_channel_weights_normalisation(images):
    x, y = images
    np.testing.assert_allclose(np.asarray(mae(x, y, (1, 1, 1))), np.asarray(mae(x, y)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(mae(x, y, (2, 1, 1))), np.asarray(mae(x, y, (8, 4, 4))),
                               rtol=1e-6)
    # All weight on channel 0 == the plain mean of channel 0 (weights sum to C).
    np.testing.assert_allclose(np.asarray(mse(x, y, (1, 0, 0))),
                               np.asarray(mse(x[..., :1], y[..., :1])), rtol=1e-6)


@pytest.mark.parametrize("bad", [(1.0, 1.0), (-1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1.0, np.nan, 1.0)])
def test_bad_channel_weights_raise(images, bad):
    x, y = images
    with pytest.raises(ValueError, match="channel_weights"):
        mae(x, y, bad)


def test_shape_checks():
    with pytest.raises(ValueError, match="shape mismatch"):
        mae(jnp.zeros((2, 4, 4, 3)), jnp.zeros((2, 4, 4, 1)))
    with pytest.raises(ValueError, match="B, ..., C"):
        mse(jnp.zeros(3), jnp.zeros(3))


def test_identical_inputs_give_zero(images):
    _, y = images
    for space in LOSS_SPACES:
        assert np.all(np.asarray(pixel_loss(y, y, space, 1.0, 1.0)) == 0.0)


@pytest.mark.parametrize("space", LOSS_SPACES)
def test_pixel_loss_matches_reference(images, space):
    x, y = images
    w = (2.0, 1.0, 1.0)
    tx, ty = np_loss_space(x, space), np_loss_space(y, space)
    want = 0.7 * np_mae(tx, ty, w) + 2.5 * np_mse(tx, ty, w)
    got = pixel_loss(x, y, space, w_mae=0.7, w_mse=2.5, channel_weights=w)
    assert got.shape == (3,)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=1e-6)


def test_pixel_loss_default_is_oklab_mae(images):
    x, y = images
    want = np_mae(np_loss_space(x, "oklab"), np_loss_space(y, "oklab"))
    np.testing.assert_allclose(np.asarray(pixel_loss(x, y)), want, rtol=2e-5, atol=1e-6)


def test_pixel_loss_unknown_space(images):
    x, y = images
    with pytest.raises(ValueError, match="unknown loss space"):
        pixel_loss(x, y, "lab")


@pytest.mark.parametrize("space", LOSS_SPACES)
def test_pixel_loss_gradients_finite_and_jittable(images, space):
    x, y = images
    x = np.concatenate([x, np.zeros_like(x[:1]), np.full_like(x[:1], 1.3)])  # + black, + 1.3
    y = np.concatenate([y, np.zeros_like(y[:1]), np.zeros_like(y[:1])])

    @jax.jit
    def total(v, step):
        return jnp.mean(pixel_loss(v, y, space, *furception_pixel_weights(step)))

    for step in (0, 50_000, 150_000):
        val, g = jax.value_and_grad(total)(jnp.asarray(x), jnp.asarray(step))
        assert np.isfinite(float(val)) and np.all(np.isfinite(np.asarray(g)))
        assert np.any(np.asarray(g) != 0)


# -- MAE-share schedule ----------------------------------------------------------------------------

def np_schedule(step, start=1.0, end=0.6, steps=100_000):
    t = np.clip(np.asarray(step, np.float64) / steps, 0.0, 1.0)
    return end + (start - end) * 0.5 * (1.0 + np.cos(np.pi * t))


def test_schedule_key_points():
    pts = {-10: 1.0, 0: 1.0, 50_000: 0.8, 100_000: 0.6, 100_001: 0.6, 10**7: 0.6}
    for step, want in pts.items():
        np.testing.assert_allclose(float(mae_share_schedule(step)), want, atol=1e-6)
    assert float(mae_share_schedule(25_000)) > 0.8 > float(mae_share_schedule(75_000))


def test_schedule_matches_numpy_and_optax():
    steps = np.random.default_rng(1).integers(0, 150_000, 200)
    got = np.asarray(mae_share_schedule(steps))
    np.testing.assert_allclose(got, np_schedule(steps), atol=1e-6)
    optax_sched = optax.cosine_decay_schedule(1.0, 100_000, alpha=0.6)
    np.testing.assert_allclose(got, np.asarray(jax.vmap(optax_sched)(jnp.asarray(steps))),
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(mae_share_schedule(steps, 0.9, 0.2, 1000)),
                               np_schedule(steps, 0.9, 0.2, 1000), atol=1e-6)


def test_schedule_jit_with_traced_step():
    f = jax.jit(mae_share_schedule)
    for step in (jnp.int32(0), jnp.int32(50_000), jnp.float32(100_000.0), jnp.int32(400_000)):
        np.testing.assert_allclose(float(f(step)), np_schedule(float(step)), atol=1e-6)
    assert f(jnp.int32(3)).shape == () and f(jnp.int32(3)).dtype == jnp.float32
    with pytest.raises(ValueError, match="steps"):
        mae_share_schedule(0, steps=0)


def test_furception_pixel_weights():
    for step, (wa, ws) in {0: (1.0, 0.0), 50_000: (0.8, 1.0), 100_000: (0.6, 2.0),
                           300_000: (0.6, 2.0)}.items():
        got = jax.jit(furception_pixel_weights)(jnp.int32(step))
        np.testing.assert_allclose([float(got[0]), float(got[1])], [wa, ws], atol=1e-6)


def test_furception_mix_equals_authors_formula(images):
    """pixel_loss with the preset weights == 1.0 s MAE + 10 (1 - s) 0.5 SE, in Oklab."""
    x, y = images
    tx, ty = np_loss_space(x, "oklab"), np_loss_space(y, "oklab")
    s = np_schedule(30_000)
    want = 1.0 * s * np_mae(tx, ty) + 10 * (1 - s) * 0.5 * np_mse(tx, ty)
    got = pixel_loss(x, y, "oklab", *furception_pixel_weights(30_000))
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=1e-6)


# -- published defaults ------------------------------------------------------------------------------

def test_loss_defaults_table():
    assert set(LOSS_DEFAULTS) == {"ldm", "sd-vae-ft-ema", "sd-vae-ft-mse", "furception"}
    ldm, ft_mse, furc = LOSS_DEFAULTS["ldm"], LOSS_DEFAULTS["sd-vae-ft-mse"], LOSS_DEFAULTS["furception"]
    # LDM: L1 1.0 + LPIPS 1.0 on [-1, 1] images -> 2.0 x MAE on [0, 1].
    assert (ldm.w_mae, ldm.w_mse, ldm.w_lpips) == (2.0, 0.0, 1.0)
    # sd-vae-ft-mse: MSE + 0.1 LPIPS on [-1, 1] images -> 4.0 x MSE on [0, 1].
    assert (ft_mse.w_mae, ft_mse.w_mse, ft_mse.w_lpips) == (0.0, 4.0, 0.1)
    assert (furc.space, furc.w_mae, furc.w_mse, furc.mae_share_schedule) == ("oklab", 1.0, 5.0, True)
    for d in LOSS_DEFAULTS.values():
        assert d.space in LOSS_SPACES and d.source
    with pytest.raises(TypeError):
        LOSS_DEFAULTS["new"] = ldm  # read-only


def test_model_range_scaling_of_ldm_l1(images):
    """The 2x in the LDM entry: L1 on [-1, 1] images equals 2 x L1 on the same [0, 1] images."""
    from fvae_core.conventions import to_model_range

    x, y = images
    np.testing.assert_allclose(np.asarray(mae(to_model_range(x), to_model_range(y))),
                               2.0 * np.asarray(mae(x, y)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(mse(to_model_range(x), to_model_range(y))),
                               4.0 * np.asarray(mse(x, y)), rtol=1e-5)
