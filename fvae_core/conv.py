"""2-D convolution (NHWC/HWIO) with a faster backward pass on XLA:CPU.

XLA:CPU runs a 3x3 conv forward near matmul peak, and its input gradient is as fast as the forward, but
its *kernel* gradient is slow for wide convs on large images: 128->128 channels at 256^2, B1, the kernel
gradient takes 7-8x the forward (see ``/work/shared/reference/performance.md``). :func:`conv2d` therefore
routes stride-1 "same" convs (odd kernel, torch-style symmetric ``k // 2`` padding) through a
``jax.custom_vjp`` whose backward uses only ops XLA runs fast:

* ``dx`` is a *forward* conv of ``dy`` with the kernel flipped spatially and its in/out axes swapped (the
  transpose of a stride-1 "same" conv is a "same" conv); it matches XLA's ``dx`` bit for bit here;
* ``dk[i, j] = sum_{b,h,w} xpad[b, h+i, w+j, :]^T dy[b, h, w, :]``: one matmul per kernel tap on
  contiguous windows of the flattened padded input (see :func:`_grad_kernel`), accumulated in float32.

Measured per conv (fwd+bwd, same process, alternating): 0.15-0.7x XLA's time for 128-512 input channels
at 128^2-256^2, but slower for 32-64 channels, where XLA's own kernel gradient is fast. So by default
(``custom_grad=None``) the custom path is used only on XLA:CPU, above :data:`MIN_CHANNELS` and
:data:`MIN_PIXELS`.
The taps run in a ``fori_loop`` so that one window is live at a time: unrolled, XLA kept all nine alive
and the sd decoder's fwd+bwd temp memory grew from 2.4 to 5.8 GiB.
Everything else (strides, explicit or asymmetric padding, 1x1 or even kernels, mixed dtypes) is plain
``lax.conv_general_dilated`` with XLA's gradient. Forward values are identical on both paths (the forward
*is* that call).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

_DN = ("NHWC", "HWIO", "NHWC")


def _same_pad(kernel_shape) -> list[tuple[int, int]]:
    kh, kw = kernel_shape[:2]
    return [(kh // 2, kh // 2), (kw // 2, kw // 2)]


def _conv(x, kernel, pad):
    return lax.conv_general_dilated(x, kernel, (1, 1), pad, dimension_numbers=_DN)


def _grad_kernel(x, dy, kh: int, kw: int):
    """dL/dkernel of a stride-1 "same" conv, [kh, kw, C_in, C_out], accumulated in float32.

    Pad x by the conv padding (plus one extra bottom row so that every tap window stays in bounds) and pad
    dy on the right by ``kw - 1`` zero columns; then rows of both have width ``W + kw - 1`` and tap (i, j)
    reads the contiguous window of flattened x starting at ``i * (W + kw - 1) + j``; the zero columns of
    dy cancel the wrapped-around terms. dy is transposed once to [C_out, B, N] so that every tap is a
    plain [C_out, B*N] @ [B*N, C_in] matmul on a contiguous window (measured fastest of: per-tap strided
    slices, one im2col matmul, x transposed instead of dy).
    """
    b, h, w, cin = x.shape
    cout = dy.shape[-1]
    ph, pw = kh // 2, kw // 2
    wp = w + 2 * pw
    n = h * wp
    xp = jnp.pad(x, ((0, 0), (ph, ph + 1), (pw, pw), (0, 0))).reshape(b, -1, cin)
    dy_t = jnp.transpose(jnp.pad(dy, ((0, 0), (0, 0), (0, 2 * pw), (0, 0))).reshape(b, n, cout), (2, 0, 1))

    def tap(t, acc):
        off = (t // kw) * wp + t % kw
        window = lax.dynamic_slice_in_dim(xp, off, n, axis=1)
        g = lax.dot_general(dy_t, window, (((1, 2), (0, 1)), ((), ())), preferred_element_type=jnp.float32)
        return lax.dynamic_update_index_in_dim(acc, g, t, axis=0)

    taps = lax.fori_loop(0, kh * kw, tap, jnp.zeros((kh * kw, cout, cin), jnp.float32))
    return jnp.transpose(taps.reshape(kh, kw, cout, cin), (0, 1, 3, 2))


@jax.custom_vjp
def _conv_same(x, kernel):
    return _conv(x, kernel, _same_pad(kernel.shape))


def _conv_same_fwd(x, kernel):
    return _conv_same(x, kernel), (x, kernel)


def _conv_same_bwd(res, dy):
    x, kernel = res
    kh, kw = kernel.shape[:2]
    dy = dy.astype(x.dtype)
    kernel_t = jnp.flip(kernel, (0, 1)).swapaxes(2, 3)  # [kh, kw, C_out, C_in]
    dx = _conv(dy, kernel_t, _same_pad(kernel.shape))
    dk = _grad_kernel(x, dy, kh, kw).astype(kernel.dtype)
    return dx, dk


_conv_same.defvjp(_conv_same_fwd, _conv_same_bwd)


def _normalize_padding(padding, kernel_shape) -> list[tuple[int, int]]:
    if isinstance(padding, str):
        if padding.upper() == "SAME_TORCH":
            return _same_pad(kernel_shape)
        raise ValueError(f"unsupported padding {padding!r}; use 'SAME_TORCH' or explicit (lo, hi) pairs")
    pad = [tuple(int(v) for v in p) for p in padding]
    if len(pad) != 2 or any(len(p) != 2 for p in pad):
        raise ValueError(f"padding must be two (lo, hi) pairs, got {padding!r}")
    return pad


#: Auto dispatch thresholds for the custom gradient (measured on 2-core AVX-512 EPYC, XLA:CPU, jax 0.10):
#: with >= 128 input channels at >= 128^2 pixels per image our backward takes 0.15-0.7x XLA's (also for
#: 128 -> 3, the decoder's conv_out); for 32-64 input channels XLA's is faster (1.1-1.3x), and at 64^2 with
#: 128-512 channels the two are within 10%, and including those convs made the sd decoder 8% slower.
MIN_CHANNELS = 128
MIN_PIXELS = 128 * 128
#: Backends on which ``custom_grad=None`` may pick the custom gradient. Only XLA:CPU's conv backward is slow;
#: on GPU XLA's own conv gradients are cuDNN kernels, and forcing the custom one made the sd-vae-ft-mse step
#: 1.32x slower (H200, bf16, B32; ``benchmarks/gpu_step.py``, ``benchmarks/RESULTS.md``).
CUSTOM_GRAD_BACKENDS = ("cpu",)


def conv2d(x: jax.Array, kernel: jax.Array, stride: int | Sequence[int] = 1,
           padding: str | Sequence[Sequence[int]] = "SAME_TORCH", custom_grad: bool | None = None) -> jax.Array:
    """Conv of NHWC ``x`` with HWIO ``kernel``; same forward values as ``lax.conv_general_dilated``.

    ``padding`` is ``"SAME_TORCH"`` (symmetric ``k // 2`` on each side, torch's ``padding=k//2``) or two
    explicit ``(lo, hi)`` pairs. ``custom_grad``: ``None`` picks the custom-gradient path where it was
    measured faster (a backend in :data:`CUSTOM_GRAD_BACKENDS`, stride 1, odd kernel, symmetric ``k // 2``
    padding, same dtypes, input channels >= :data:`MIN_CHANNELS` and H*W >= :data:`MIN_PIXELS`); ``True``
    uses it wherever it applies (tests); ``False`` never does. Where it does not apply this is plain
    ``lax.conv_general_dilated``.
    """
    strides = (stride, stride) if isinstance(stride, int) else tuple(stride)
    pad = _normalize_padding(padding, kernel.shape)
    kh, kw, cin, cout = kernel.shape
    applies = (strides == (1, 1) and kh % 2 == 1 and kw % 2 == 1 and pad == _same_pad(kernel.shape)
               and x.dtype == kernel.dtype and x.ndim == 4 and (kh, kw) != (1, 1))
    if custom_grad is None:
        custom_grad = (jax.default_backend() in CUSTOM_GRAD_BACKENDS
                       and cin >= MIN_CHANNELS and x.shape[1] * x.shape[2] >= MIN_PIXELS)
    if applies and custom_grad:
        return _conv_same(x, kernel)
    return lax.conv_general_dilated(x, kernel, strides, pad, dimension_numbers=_DN)
