"""fvae_core.conv.conv2d: forward and gradients vs lax.conv_general_dilated and its XLA gradient (the oracle)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from fvae_core.conv import conv2d

DN = ("NHWC", "HWIO", "NHWC")


def _ref(x, k, stride=1, pad=None):
    kh, kw = k.shape[:2]
    pad = pad or [(kh // 2, kh // 2), (kw // 2, kw // 2)]
    return lax.conv_general_dilated(x, k, (stride, stride), pad, dimension_numbers=DN)


def _data(shape_x, shape_k, dtype=jnp.float32, seed=0):
    r = np.random.default_rng(seed)
    x = jnp.asarray(r.standard_normal(shape_x), dtype)
    k = jnp.asarray(r.standard_normal(shape_k) / np.sqrt(np.prod(shape_k[:3])), dtype)
    return x, k


def _grads(f, x, k, w):
    """Gradients of sum(f(x, k) * w) (a generic cotangent) w.r.t. x and k, in float32."""
    loss = lambda x, k: jnp.sum(f(x, k).astype(jnp.float32) * w)
    return jax.jit(jax.grad(loss, (0, 1)))(x, k)


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


@pytest.mark.parametrize("shape_x,shape_k", [
    ((1, 9, 9, 4, ), (3, 3, 4, 8)),
    ((3, 13, 7, 5), (3, 3, 5, 6)),     # batch > 1, odd non-square spatial, odd channels
    ((2, 6, 11, 8), (5, 5, 8, 3)),     # 5x5 kernel, padding 2
    ((2, 10, 5, 16), (3, 1, 16, 4)),   # non-square odd kernel
    ((1, 2, 3, 4), (3, 3, 4, 4)),      # image smaller than the kernel
    ((2, 7, 9, 16), (3, 3, 16, 3)),    # narrow output (conv_out-like): dk from shifted copies of dy
    ((1, 6, 5, 4), (5, 5, 4, 2)),      # narrow, 5x5
])
def test_custom_gradient_matches_xla_fp32(shape_x, shape_k):
    x, k = _data(shape_x, shape_k)
    y = jax.jit(lambda x, k: conv2d(x, k, custom_grad=True))(x, k)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(jax.jit(_ref)(x, k)))  # forward is the same call
    w = jnp.asarray(np.random.default_rng(1).standard_normal(y.shape), jnp.float32)
    dx, dk = _grads(lambda x, k: conv2d(x, k, custom_grad=True), x, k, w)
    rdx, rdk = _grads(_ref, x, k, w)
    assert dx.dtype == x.dtype and dk.dtype == k.dtype
    assert _rel(dx, rdx) < 1e-5
    assert _rel(dk, rdk) < 1e-5


@pytest.mark.parametrize("shape_k,pad", [
    ((2, 2, 6, 5), ((1, 0), (0, 1))),   # the sub-pixel phase convs of upsample_conv2d
    ((2, 2, 6, 5), ((0, 1), (1, 0))),
    ((4, 3, 6, 5), ((1, 2), (2, 0))),   # even kernel, asymmetric
    ((2, 2, 6, 3), ((1, 0), (1, 0))),   # narrow and asymmetric
])
def test_custom_gradient_with_size_keeping_asymmetric_padding(shape_k, pad):
    x, k = _data((2, 7, 6, 6), shape_k)
    f = lambda x, k: conv2d(x, k, 1, pad, custom_grad=True)
    assert "custom_vjp" in str(jax.make_jaxpr(f)(x, k))
    y = jax.jit(f)(x, k)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(jax.jit(lambda x, k: _ref(x, k, 1, list(pad)))(x, k)))
    w = jnp.asarray(np.random.default_rng(1).standard_normal(y.shape), jnp.float32)
    dx, dk = _grads(f, x, k, w)
    rdx, rdk = _grads(lambda x, k: _ref(x, k, 1, list(pad)), x, k, w)
    assert dx.dtype == x.dtype and dk.dtype == k.dtype
    assert _rel(dx, rdx) < 1e-5
    assert _rel(dk, rdk) < 1e-5


def test_custom_gradient_bf16():
    x, k = _data((2, 12, 9, 16), (3, 3, 16, 8), jnp.bfloat16)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((2, 12, 9, 8)), jnp.float32)
    dx, dk = _grads(lambda x, k: conv2d(x, k, custom_grad=True), x, k, w)
    assert dx.dtype == jnp.bfloat16 and dk.dtype == jnp.bfloat16
    # Oracle: the float32 gradient of the same bf16-valued inputs; both bf16 paths must be close to it.
    x32, k32 = x.astype(jnp.float32), k.astype(jnp.float32)
    rdx, rdk = _grads(_ref, x32, k32, w)
    xdx, xdk = _grads(_ref, x, k, w)  # XLA's own bf16 gradient, for scale
    assert _rel(dx, rdx) < 2e-2 and _rel(dk, rdk) < 2e-2
    assert _rel(dk, rdk) <= 2 * _rel(xdk, rdk) + 1e-2


def test_custom_path_composes_with_vmap():
    """The custom path composes with jit, vmap over an extra batch axis and grad of a scalar loss."""
    x, k = _data((2, 3, 8, 8, 4), (3, 3, 4, 4))
    f = lambda x, k: jnp.sum(jnp.square(jax.vmap(lambda xi: conv2d(xi, k, custom_grad=True))(x)))
    g = lambda x, k: jnp.sum(jnp.square(jax.vmap(lambda xi: _ref(xi, k))(x)))
    a = jax.jit(jax.grad(f, (0, 1)))(x, k)
    b = jax.jit(jax.grad(g, (0, 1)))(x, k)
    assert _rel(a[0], b[0]) < 1e-5 and _rel(a[1], b[1]) < 1e-5


@pytest.mark.parametrize("stride,padding", [(2, ((0, 1), (0, 1))), (1, ((0, 0), (0, 0))), (2, "SAME_TORCH")])
def test_fallback_cases_equal_lax(stride, padding):
    x, k = _data((2, 9, 8, 4), (3, 3, 4, 6))
    pad = [(1, 1), (1, 1)] if padding == "SAME_TORCH" else [tuple(p) for p in padding]
    y = conv2d(x, k, stride, padding, custom_grad=True)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(_ref(x, k, stride, pad)))
    w = jnp.ones(y.shape, jnp.float32)
    for a, b in zip(_grads(lambda x, k: conv2d(x, k, stride, padding, custom_grad=True), x, k, w),
                    _grads(lambda x, k: _ref(x, k, stride, pad), x, k, w)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_auto_dispatch_uses_custom_path_only_for_wide_large_convs():
    small = jax.make_jaxpr(lambda x, k: conv2d(x, k))(*_data((1, 16, 16, 32), (3, 3, 32, 32)))
    large = jax.make_jaxpr(lambda x, k: conv2d(x, k))(
        jax.ShapeDtypeStruct((1, 128, 128, 128), jnp.float32), jax.ShapeDtypeStruct((3, 3, 128, 128), jnp.float32))
    assert "custom_vjp" not in str(small)
    assert "custom_vjp" in str(large)


def test_loop_body_routes_every_applicable_conv_through_the_custom_gradient(monkeypatch):
    """Inside ``loop_body`` (scanned train steps, gradient accumulation) small convs and the upsample's phase
    convs take the custom gradient too, with XLA's values; strided convs stay XLA's; off the listed
    backends nothing changes. XLA:CPU's own kernel gradient inside a loop body took 36x its time outside."""
    import fvae_core.conv as C
    from fvae_core.conv import in_loop_body, loop_body, upsample_conv2d

    x, k = _data((2, 9, 7, 16), (3, 3, 16, 16))
    w = jnp.asarray(np.random.default_rng(3).standard_normal((2, 9, 7, 16)), jnp.float32)
    assert "custom_vjp" not in str(jax.make_jaxpr(lambda x, k: conv2d(x, k))(x, k))
    assert not in_loop_body()
    with loop_body():
        with loop_body():
            assert in_loop_body()
        assert in_loop_body()  # nested exits restore the outer state
        inside = str(jax.make_jaxpr(lambda x, k: conv2d(x, k))(x, k))
        up = str(jax.make_jaxpr(lambda x, k: upsample_conv2d(x, k))(x, k))
        strided = str(jax.make_jaxpr(lambda x, k: conv2d(x, k, 2))(x, k))
        dx, dk = _grads(lambda x, k: conv2d(x, k), x, k, w)
        with monkeypatch.context() as m:
            m.setattr(C, "CUSTOM_GRAD_BACKENDS", ())
            elsewhere = str(jax.make_jaxpr(lambda x, k: conv2d(x, k))(x, k))
    assert not in_loop_body()
    on_cpu = jax.default_backend() == "cpu"
    assert ("custom_vjp" in inside) == on_cpu and ("custom_vjp" in up) == on_cpu
    assert "custom_vjp" not in strided and "custom_vjp" not in elsewhere
    rdx, rdk = _grads(_ref, x, k, w)
    assert _rel(dx, rdx) < 1e-5 and _rel(dk, rdk) < 2e-5


def test_bad_padding():
    x, k = _data((1, 4, 4, 2), (3, 3, 2, 2))
    with pytest.raises(ValueError):
        conv2d(x, k, padding="VALID")


def test_auto_path_at_dispatch_size_matches_xla():
    """The size the decoder actually sends through the custom gradient (128 ch, 128^2), incl. a 3-channel
    output like ``decoder.conv_out``."""
    for cout in (128, 3):
        x, k = _data((1, 128, 128, 128), (3, 3, 128, cout))
        w = jnp.asarray(np.random.default_rng(1).standard_normal((1, 128, 128, cout)), jnp.float32)
        dx, dk = _grads(conv2d, x, k, w)
        rdx, rdk = _grads(_ref, x, k, w)
        assert _rel(dx, rdx) < 1e-5 and _rel(dk, rdk) < 2e-5


def test_auto_dispatch_is_xla_on_backends_not_listed(monkeypatch):
    """Only XLA:CPU gets the custom gradient by default (on GPU it measured 1.32x slower than cuDNN's)."""
    import fvae_core.conv as C

    big = (jax.ShapeDtypeStruct((1, 128, 128, 128), jnp.float32),
           jax.ShapeDtypeStruct((3, 3, 128, 128), jnp.float32))
    monkeypatch.setattr(C, "CUSTOM_GRAD_BACKENDS", ())
    assert "custom_vjp" not in str(jax.make_jaxpr(lambda x, k: conv2d(x, k))(*big))
    assert "custom_vjp" in str(jax.make_jaxpr(lambda x, k: conv2d(x, k, custom_grad=True))(*big))


def test_grad_kernel_rejects_padding_that_changes_the_size():
    from fvae_core.conv import grad_kernel

    x, k = _data((1, 6, 6, 4), (3, 3, 4, 4))
    with pytest.raises(ValueError, match="does not keep the size"):
        grad_kernel(x, x, 3, 3, ((0, 0), (1, 1)))


def test_narrow_output_uses_custom_path_by_default_on_cpu():
    """conv_out-like convs (C_out = 3) take the custom path at any size on XLA:CPU (XLA's own kernel gradient
    for them measured 18x slower at 256^2)."""
    narrow = jax.make_jaxpr(lambda x, k: conv2d(x, k))(*_data((1, 16, 16, 32), (3, 3, 32, 3)))
    assert ("custom_vjp" in str(narrow)) == (jax.default_backend() == "cpu")


def _upsample_then_conv(x, k):
    return _ref(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2), k)


@pytest.mark.parametrize("custom_grad", [True, False])
@pytest.mark.parametrize("shape_x", [(2, 5, 7, 6), (1, 1, 3, 4)])
def test_upsample_conv_equals_upsample_then_conv(shape_x, custom_grad):
    """The sub-pixel form (four 2x2 convs at the input's size) against the literal nearest-2x upsample and
    3x3 conv (diffusers' Upsample2D): values and both gradients."""
    from fvae_core.conv import upsample_conv2d

    x, k = _data(shape_x, (3, 3, shape_x[-1], 5))
    f = lambda x, k: upsample_conv2d(x, k, custom_grad=custom_grad)
    y, ref = jax.jit(f)(x, k), jax.jit(_upsample_then_conv)(x, k)
    assert y.shape == ref.shape == (shape_x[0], 2 * shape_x[1], 2 * shape_x[2], 5)
    assert _rel(y, ref) < 1e-6
    w = jnp.asarray(np.random.default_rng(1).standard_normal(y.shape), jnp.float32)
    for a, b in zip(_grads(f, x, k, w), _grads(_upsample_then_conv, x, k, w)):
        assert _rel(a, b) < 1e-5


def test_upsample_conv_bf16_and_kernel_check():
    from fvae_core.conv import subpixel_kernels, upsample_conv2d

    x, k = _data((1, 6, 6, 8), (3, 3, 8, 4))
    y = upsample_conv2d(x, k, jnp.bfloat16)
    assert y.dtype == jnp.bfloat16 and _rel(y, _upsample_then_conv(x, k)) < 2e-2
    with pytest.raises(ValueError, match="3x3"):
        subpixel_kernels(jnp.zeros((5, 5, 2, 2)))


# --------------------------------------------------------------------------------------------------
# Winograd F(2x2, 3x3) (frozen kernels: LPIPS)
# --------------------------------------------------------------------------------------------------


def _conv_f64(x, k):
    """A 3x3 "same" (padding 1) conv in float64 numpy: the analytic oracle."""
    x, k = np.asarray(x, np.float64), np.asarray(k, np.float64)
    _, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return sum(np.einsum("bhwi,io->bhwo", xp[:, i:i + h, j:j + w], k[i, j]) for i in range(3) for j in range(3))


@pytest.mark.parametrize("shape_x,cout", [
    ((2, 8, 8, 64), 64),
    ((1, 7, 9, 64), 128),   # odd height and width: padded by a zero row / column that no output reads
    ((3, 5, 4, 128), 64),   # cin != cout, batch 3
    ((1, 1, 1, 64), 64),    # one pixel: only the centre tap sees data
    ((2, 2, 3, 16), 5),     # few channels (the function itself has no channel limit)
])
def test_winograd_conv_forward_and_transpose_match_float64(shape_x, cout):
    """Forward against a float64 conv, ``transpose=True`` against the conv with ``transposed_kernel`` (the
    flipped, in/out-swapped kernel) from the *same* transformed kernel, and the frozen conv's input gradient
    against XLA's gradient of the direct conv; the transformed kernel gets no cotangent."""
    from fvae_core.conv import frozen_winograd_conv, transposed_kernel, winograd_conv3x3, winograd_kernel

    x, k = _data(shape_x, (3, 3, shape_x[-1], cout))
    u = winograd_kernel(k)
    assert len(u) == 16 and all(m.shape == (shape_x[-1], cout) and m.dtype == jnp.float32 for m in u)
    ref = _conv_f64(x, k)
    got = np.asarray(jax.jit(winograd_conv3x3)(x, u))
    assert got.shape == ref.shape and np.max(np.abs(got - ref)) / np.max(np.abs(ref)) < 2e-6
    dy = _data(ref.shape, (1,), seed=1)[0]
    ref_t = _conv_f64(dy, transposed_kernel(np.asarray(k)))
    got_t = np.asarray(jax.jit(lambda d, u: winograd_conv3x3(d, u, transpose=True))(dy, u))
    assert got_t.shape == x.shape and np.max(np.abs(got_t - ref_t)) / np.max(np.abs(ref_t)) < 2e-6
    gx, gu = jax.jit(jax.grad(lambda x, u: jnp.sum(frozen_winograd_conv(x, u) * dy), (0, 1)))(x, u)
    gx_ref = jax.grad(lambda x: jnp.sum(_ref(x, k) * dy))(x)
    assert _rel(gx, gx_ref) < 2e-6
    assert not np.any(np.asarray(gu))


def test_winograd_identity_kernel_is_exact():
    """A kernel that is the identity at its centre tap returns the input: the transforms are exact there."""
    from fvae_core.conv import winograd_conv3x3, winograd_kernel

    x = _data((2, 6, 6, 64), (1,))[0]
    k = np.zeros((3, 3, 64, 64), np.float32)
    k[1, 1] = np.eye(64)
    np.testing.assert_allclose(np.asarray(winograd_conv3x3(x, winograd_kernel(k))), np.asarray(x), atol=1e-6)


def test_winograd_dispatch_rule_and_errors(monkeypatch):
    import fvae_core.conv as C

    k = (3, 3, 64, 128)
    assert C.use_winograd((8, 32, 32, 64), k, jnp.float32)            # LPIPS-VGG at tiny-cpu size
    assert C.use_winograd((1, 64, 64, 64), k, jnp.float32)            # the pixel limit is inclusive
    assert not C.use_winograd((1, 64, 65, 64), k, jnp.float32)        # larger images: direct conv
    assert not C.use_winograd((8, 32, 32, 64), k, jnp.bfloat16)       # float32 only
    assert not C.use_winograd((8, 32, 32, 3), (3, 3, 3, 64), jnp.float32)  # VGG's first layer
    assert not C.use_winograd((8, 32, 32, 64), (5, 5, 64, 128), jnp.float32)
    monkeypatch.setattr(C, "WINOGRAD_BACKENDS", ("gpu",))
    assert not C.use_winograd((8, 32, 32, 64), k, jnp.float32)
    with pytest.raises(ValueError, match="3x3"):
        C.winograd_kernel(np.zeros((5, 5, 64, 64), np.float32))
    with pytest.raises(ValueError, match="does not fit"):
        C.winograd_conv3x3(jnp.zeros((1, 4, 4, 32)), C.winograd_kernel(np.zeros((3, 3, 64, 64), np.float32)))


def _grad_kernel_f64(x, dy):
    """dL/dkernel of the padding-1 3x3 conv in float64 numpy: ``sum xpad[b, h+i, w+j]^T dy[b, h, w]``."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    _, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return np.stack([np.stack([np.einsum("bhwi,bhwo->io", xp[:, i:i + h, j:j + w], dy) for j in range(3)])
                     for i in range(3)])


@pytest.mark.parametrize("shape_x,cout", [
    ((2, 8, 8, 128), 128),
    ((1, 7, 9, 64), 32),    # odd height and width, cin != cout
    ((3, 5, 4, 16), 24),    # batch 3, odd height
    ((1, 1, 1, 8), 8),      # one pixel: only the centre tap sees data
])
def test_winograd_conv2d_value_and_both_gradients_match_float64(shape_x, cout):
    """The trainable Winograd conv: forward, input gradient and kernel gradient against float64 numpy."""
    from fvae_core.conv import transposed_kernel, winograd_conv2d

    x, k = _data(shape_x, (3, 3, shape_x[-1], cout))
    ref = _conv_f64(x, k)
    y, vjp = jax.vjp(jax.jit(winograd_conv2d), x, k)
    assert y.shape == ref.shape and np.max(np.abs(np.asarray(y) - ref)) / np.max(np.abs(ref)) < 2e-6
    dy = _data(ref.shape, (1,), seed=1)[0]
    gx, gk = vjp(dy)
    gx_ref = _conv_f64(dy, transposed_kernel(np.asarray(k, np.float64)))
    gk_ref = _grad_kernel_f64(x, dy)
    assert gx.shape == x.shape and gk.shape == k.shape and gk.dtype == jnp.float32
    assert np.max(np.abs(np.asarray(gx) - gx_ref)) / np.max(np.abs(gx_ref)) < 2e-6
    assert np.max(np.abs(np.asarray(gk) - gk_ref)) / np.max(np.abs(gk_ref)) < 2e-6


def test_conv2d_dispatches_wide_small_convs_to_winograd(monkeypatch):
    """With CONV2D_WINOGRAD_MIN_CHANNELS set (128 by default; None turns it off), conv2d takes the Winograd
    path (16 matmuls, no convolution) for a float32 3x3 conv with that many channels on a small image, and
    the direct conv otherwise: fewer channels, bf16, a stride, an explicit ``custom_grad`` or
    ``winograd=False``, a larger image, or another backend."""
    import fvae_core.conv as C

    def ops(fn, *args):
        eqns = str(jax.make_jaxpr(jax.grad(lambda *a: jnp.sum(fn(*a)), (0, 1)))(*args))
        return eqns.count("dot_general"), eqns.count("conv_general_dilated")

    x, k = _data((2, 16, 16, 128), (3, 3, 128, 128))
    assert C.CONV2D_WINOGRAD_MIN_CHANNELS == 128
    assert ops(C.conv2d, x, k) == (48, 0)  # forward, dx and the kernel cotangent: 16 matmuls each
    monkeypatch.setattr(C, "CONV2D_WINOGRAD_MIN_CHANNELS", None)
    assert ops(C.conv2d, x, k)[1] > 0      # off
    monkeypatch.setattr(C, "CONV2D_WINOGRAD_MIN_CHANNELS", 128)
    assert ops(lambda x, k: C.conv2d(x, k, winograd=False), x, k)[1] > 0
    assert ops(lambda x, k: C.conv2d(x, k, custom_grad=False), x, k)[1] > 0
    assert ops(lambda x, k: C.conv2d(x, k, stride=2), x, k)[1] > 0
    xb, kb = x.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
    assert ops(C.conv2d, xb, kb)[1] > 0
    x64, k64 = _data((2, 16, 16, 64), (3, 3, 64, 64))
    assert ops(C.conv2d, x64, k64)[1] > 0                  # below CONV2D_WINOGRAD_MIN_CHANNELS
    assert ops(lambda x, k: C.conv2d(x, k, winograd=True), x64, k64) == (48, 0)
    xl, kl = _data((1, 72, 72, 128), (3, 3, 128, 128))
    assert ops(C.conv2d, xl, kl)[1] > 0                    # above WINOGRAD_MAX_PIXELS
    monkeypatch.setattr(C, "WINOGRAD_BACKENDS", ("gpu",))
    assert ops(C.conv2d, x, k)[1] > 0
