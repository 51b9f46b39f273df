"""2-D convolution (NHWC/HWIO) with a faster backward pass on XLA:CPU.

XLA:CPU runs a 3x3 conv forward near matmul peak, and its input gradient is as fast as the forward, but
its *kernel* gradient is slow for wide convs on large images: 128->128 channels at 256^2, B1, the kernel
gradient takes 7-8x the forward (see ``/work/shared/reference/performance.md``). :func:`conv2d` therefore
routes stride-1 convs that keep the image size (torch's symmetric ``k // 2`` padding for odd kernels, or
any ``(lo, hi)`` padding with ``lo + hi = k - 1``) through a ``jax.custom_vjp`` whose backward uses only
ops XLA runs fast:

* ``dx`` is a *forward* conv of ``dy`` with the kernel flipped spatially and its in/out axes swapped, and
  the padding mirrored (the transpose of a size-keeping stride-1 conv is one); it matches XLA's ``dx``;
* ``dk[i, j] = sum_{b,h,w} xpad[b, h+i, w+j, :]^T dy[b, h, w, :]``: one matmul per kernel tap on
  contiguous windows of the flattened padded input (see :func:`_grad_kernel`), accumulated in float32;
  for a narrow output (the decoder's 3-channel ``conv_out``) one matmul against shifted copies of ``dy``.

:func:`upsample_conv2d` is diffusers' ``Upsample2D`` (nearest 2x, then a 3x3 conv) as four 2x2 convs at
the input's resolution, and :func:`frozen_conv` a conv with a frozen kernel whose backward kernel the
caller transposes once (LPIPS). :func:`winograd_conv3x3` is a 3x3 "same" conv by Winograd's F(2x2, 3x3)
algorithm, for frozen kernels transformed once (:func:`winograd_kernel`; LPIPS-VGG's convs on small images),
and :func:`winograd_conv2d` the same conv with a trainable kernel and both gradients (0.37-0.5x the direct
conv's fwd+bwd time per conv for the sd-vae-ft-mse autoencoder's 512-channel layers at 32^2-64^2), which
:func:`conv2d` takes for convs of at least :data:`CONV2D_WINOGRAD_MIN_CHANNELS` channels on small images.

Measured per conv (fwd+bwd, same process, alternating): 0.15-0.7x XLA's time for 128-512 input channels
at 128^2-256^2, but slower for 32-64 channels, where XLA's own kernel gradient is fast. So by default
(``custom_grad=None``) the custom path is used only on XLA:CPU, above :data:`MIN_CHANNELS` and
:data:`MIN_PIXELS`.
The taps run in a ``fori_loop`` so that one window is live at a time: unrolled, XLA kept all nine alive
and the sd decoder's fwd+bwd temp memory grew from 2.4 to 5.8 GiB.
Everything else (strides, padding that changes the size, 1x1 kernels, mixed dtypes) is plain
``lax.conv_general_dilated`` with XLA's gradient. Forward values are identical on both paths (the forward
*is* that call).
"""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_DN = ("NHWC", "HWIO", "NHWC")


def _same_pad(kernel_shape) -> tuple[tuple[int, int], tuple[int, int]]:
    kh, kw = kernel_shape[:2]
    return ((kh // 2, kh // 2), (kw // 2, kw // 2))


def _conv(x, kernel, pad):
    return lax.conv_general_dilated(x, kernel, (1, 1), [tuple(p) for p in pad], dimension_numbers=_DN)


def _keeps_size(kernel_shape, pad) -> bool:
    """A stride-1 conv with this padding has the input's spatial size (``lo + hi = k - 1`` per axis)."""
    return all(lo >= 0 and hi >= 0 and lo + hi == k - 1 for (lo, hi), k in zip(pad, kernel_shape[:2]))


#: A conv whose ``kh * kw * C_out`` is at most this gets its kernel gradient from one matmul against shifted
#: copies of ``dy`` (:func:`_grad_kernel_narrow`) instead of the per-tap loop: for the decoder's ``conv_out``
#: (128 -> 3 at 256^2) 9 ms instead of 48 ms (loop) or 164 ms (XLA's own), B1; 45 / 223 / 181 ms at B4.
NARROW_COLUMNS = 64


def grad_kernel(x, dy, kh: int, kw: int, pad=None):
    """dL/dkernel, ``[kh, kw, C_in, C_out]`` accumulated in float32, of a stride-1 conv of NHWC ``x`` that
    keeps its size (``pad``: two ``(lo, hi)`` pairs with ``lo + hi = k - 1``; default torch's symmetric
    ``k // 2`` for odd kernels), for the output cotangent ``dy``."""
    pad = _same_pad((kh, kw)) if pad is None else tuple(tuple(p) for p in pad)
    if not _keeps_size((kh, kw), pad):
        raise ValueError(f"grad_kernel: padding {pad} does not keep the size for a {kh}x{kw} kernel")
    if kh * kw * dy.shape[-1] <= NARROW_COLUMNS:
        return _grad_kernel_narrow(x, dy, kh, kw, pad)
    return _grad_kernel(x, dy, kh, kw, pad)


def _grad_kernel_narrow(x, dy, kh: int, kw: int, pad):
    """:func:`grad_kernel` for a narrow output: with ``xpad`` = x padded by ``(pt, pl)`` at the top-left,
    ``dk[i, j] = sum_p xpad[p + (i, j)]^T dy[p] = sum_q x[q]^T dy[q + (pt - i, pl - j)]`` (dy zero outside
    the image), so the ``kh kw`` shifted copies of the few channels of dy are stacked into
    ``[B H W, kh kw C_out]`` and x is read once by a single matmul."""
    b, h, w, cin = x.shape
    cout = dy.shape[-1]
    (pt, _), (pl, _) = pad
    dyp = jnp.pad(dy, ((0, 0), (kh - 1, kh - 1), (kw - 1, kw - 1), (0, 0)))
    cols = jnp.concatenate([dyp[:, kh - 1 + pt - i: kh - 1 + pt - i + h, kw - 1 + pl - j: kw - 1 + pl - j + w]
                            for i in range(kh) for j in range(kw)], axis=-1)
    g = lax.dot_general(x.reshape(-1, cin), cols.reshape(-1, kh * kw * cout), (((0,), (0,)), ((), ())),
                        preferred_element_type=jnp.float32)
    return jnp.transpose(g.reshape(cin, kh, kw, cout), (1, 2, 0, 3))


def _grad_kernel(x, dy, kh: int, kw: int, pad):
    """dL/dkernel of a size-keeping stride-1 conv, [kh, kw, C_in, C_out], accumulated in float32.

    Pad x by the conv padding (plus one extra bottom row so that every tap window stays in bounds) and pad
    dy on the right by ``kw - 1`` zero columns; then rows of both have width ``W + kw - 1`` and tap (i, j)
    reads the contiguous window of flattened x starting at ``i * (W + kw - 1) + j``; the zero columns of
    dy cancel the wrapped-around terms. dy is transposed once to [C_out, B, N] so that every tap is a
    plain [C_out, B*N] @ [B*N, C_in] matmul on a contiguous window (measured fastest of: per-tap strided
    slices, one im2col matmul, x transposed instead of dy).
    """
    b, h, w, cin = x.shape
    cout = dy.shape[-1]
    (pt, pb), (pl, pr) = pad
    wp = w + kw - 1
    n = h * wp
    xp = jnp.pad(x, ((0, 0), (pt, pb + 1), (pl, pr), (0, 0))).reshape(b, -1, cin)
    dy_t = jnp.transpose(jnp.pad(dy, ((0, 0), (0, 0), (0, kw - 1), (0, 0))).reshape(b, n, cout), (2, 0, 1))

    def tap(t, acc):
        off = (t // kw) * wp + t % kw
        window = lax.dynamic_slice_in_dim(xp, off, n, axis=1)
        g = lax.dot_general(dy_t, window, (((1, 2), (0, 1)), ((), ())), preferred_element_type=jnp.float32)
        return lax.dynamic_update_index_in_dim(acc, g, t, axis=0)

    taps = lax.fori_loop(0, kh * kw, tap, jnp.zeros((kh * kw, cout, cin), jnp.float32))
    return jnp.transpose(taps.reshape(kh, kw, cout, cin), (0, 1, 3, 2))


def transposed_kernel(kernel):
    """The kernel of a stride-1 conv's input gradient: flipped spatially, in/out swapped,
    ``[kh, kw, C_out, C_in]`` (works on numpy and jax arrays). With padding ``(lo, hi)`` per axis for the
    conv, its input gradient is the conv of ``dy`` with this kernel and padding ``(hi, lo)``."""
    return kernel[::-1, ::-1].swapaxes(2, 3)


def _mirror(pad):
    return tuple((hi, lo) for lo, hi in pad)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_keep_size(x, kernel, pad):
    return _conv(x, kernel, pad)


def _conv_keep_size_fwd(x, kernel, pad):
    return _conv(x, kernel, pad), (x, kernel)


def _conv_keep_size_bwd(pad, res, dy):
    x, kernel = res
    kh, kw = kernel.shape[:2]
    dy = dy.astype(x.dtype)
    dx = _conv(dy, transposed_kernel(kernel), _mirror(pad))
    dk = grad_kernel(x, dy, kh, kw, pad).astype(kernel.dtype)
    return dx, dk


_conv_keep_size.defvjp(_conv_keep_size_fwd, _conv_keep_size_bwd)


@jax.custom_vjp
def frozen_conv(x, kernel, kernel_t):
    """Stride-1 "same" conv (odd kernel, ``k // 2`` padding) of NHWC ``x`` with a *frozen* HWIO ``kernel``,
    differentiable w.r.t. ``x`` only (the kernels get zero cotangents). ``kernel_t`` must be
    :func:`transposed_kernel` of ``kernel``: the input gradient is the forward conv of ``dy`` with it, which
    is what XLA computes too. Pass it precomputed to skip the per-step relayout of a large frozen kernel
    (XLA:CPU's transpose emitter took 10-19 ms per 3x3x512x512 kernel), or computed in the program where
    the kernel is small. Used by :mod:`fvae_core.lpips` for the convs that do not run as Winograd
    (:func:`frozen_winograd_conv`)."""
    return _conv(x, kernel, _same_pad(kernel.shape))


def _frozen_conv_fwd(x, kernel, kernel_t):
    return frozen_conv(x, kernel, kernel_t), (kernel, kernel_t)


def _frozen_conv_bwd(res, dy):
    kernel, kernel_t = res
    return _conv(dy, kernel_t, _same_pad(kernel.shape)), None, None


frozen_conv.defvjp(_frozen_conv_fwd, _frozen_conv_bwd)


def _normalize_padding(padding, kernel_shape) -> tuple[tuple[int, int], ...]:
    if isinstance(padding, str):
        if padding.upper() == "SAME_TORCH":
            return _same_pad(kernel_shape)
        raise ValueError(f"unsupported padding {padding!r}; use 'SAME_TORCH' or explicit (lo, hi) pairs")
    pad = tuple(tuple(int(v) for v in p) for p in padding)
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
#: 1.32x slower (H200, bf16, B32; ``benchmarks/gpu_step.py``, ``benchmarks/results/history.md``, the first GPU runs).
CUSTOM_GRAD_BACKENDS = ("cpu",)


_LOOP = threading.local()


@contextlib.contextmanager
def loop_body():
    """Trace-time context for code that runs inside a ``lax.scan``/``while`` body (several train steps per
    call, gradient accumulation): every conv that :func:`conv2d` or :func:`upsample_conv2d` traces in it with
    ``custom_grad=None`` takes the custom gradient wherever it applies, whatever its size, on
    :data:`CUSTOM_GRAD_BACKENDS`.

    XLA:CPU (jax 0.10) runs a conv's *kernel* gradient inside a loop body as one of its own slow compiled
    loops: a 3x3 conv (B8, 64^2, 64 -> 64) took 2984 ms inside ``lax.scan(length=1)`` against 84 ms jitted
    alone (36x), and the tiny-cpu step 4.0-4.6 s against 0.41 s. The custom gradient is matmuls, which run
    at full speed in a loop (``benchmarks/results/history.md``, eleventh and twelfth rounds)."""
    depth = getattr(_LOOP, "depth", 0)
    _LOOP.depth = depth + 1
    try:
        yield
    finally:
        _LOOP.depth = depth


def in_loop_body() -> bool:
    """True while tracing inside :func:`loop_body`."""
    return getattr(_LOOP, "depth", 0) > 0


def _auto_custom_grad(cin: int, pixels: int, columns: int) -> bool:
    """The ``custom_grad=None`` rule: on :data:`CUSTOM_GRAD_BACKENDS`, wide convs on large images, or a narrow
    output (``columns = kh * kw * C_out``); every conv inside :func:`loop_body`."""
    return (jax.default_backend() in CUSTOM_GRAD_BACKENDS
            and (in_loop_body() or (cin >= MIN_CHANNELS and pixels >= MIN_PIXELS) or columns <= NARROW_COLUMNS))


def conv2d(x: jax.Array, kernel: jax.Array, stride: int | Sequence[int] = 1,
           padding: str | Sequence[Sequence[int]] = "SAME_TORCH", custom_grad: bool | None = None,
           winograd: bool | None = None) -> jax.Array:
    """Conv of NHWC ``x`` with HWIO ``kernel``; the forward values of ``lax.conv_general_dilated`` (exactly,
    or up to float rounding on the Winograd path).

    ``padding`` is ``"SAME_TORCH"`` (symmetric ``k // 2`` on each side, torch's ``padding=k//2``) or two
    explicit ``(lo, hi)`` pairs. ``winograd``: ``None`` uses :func:`winograd_conv2d` for a float32 3x3
    stride-1 conv with padding 1 where :data:`CONV2D_WINOGRAD_MIN_CHANNELS` is set and
    :func:`use_winograd` says so for it, unless ``custom_grad`` is given;
    ``True`` wherever it applies (tests); ``False`` never. ``custom_grad``: ``None`` picks the
    custom-gradient path where it was measured faster (a backend in :data:`CUSTOM_GRAD_BACKENDS`, stride 1,
    a padding that keeps the size, same dtypes, and either input channels >= :data:`MIN_CHANNELS` and H*W
    >= :data:`MIN_PIXELS`, or a narrow output, ``kh * kw * C_out <= NARROW_COLUMNS``); ``True``
    uses it wherever it applies (tests); ``False`` never does. Where neither applies this is plain
    ``lax.conv_general_dilated``.
    """
    strides = (stride, stride) if isinstance(stride, int) else tuple(stride)
    pad = _normalize_padding(padding, kernel.shape)
    kh, kw, cin, cout = kernel.shape
    applies = (strides == (1, 1) and _keeps_size(kernel.shape, pad)
               and x.dtype == kernel.dtype and x.ndim == 4 and (kh, kw) != (1, 1))
    if winograd is None:
        winograd = (custom_grad is None and CONV2D_WINOGRAD_MIN_CHANNELS is not None
                    and use_winograd(x.shape, kernel.shape, x.dtype, CONV2D_WINOGRAD_MIN_CHANNELS))
    if applies and winograd and (kh, kw) == (3, 3) and pad == ((1, 1), (1, 1)) and x.dtype == jnp.float32:
        return winograd_conv2d(x, kernel)
    if custom_grad is None:
        custom_grad = _auto_custom_grad(cin, x.shape[1] * x.shape[2], kh * kw * cout)
    if applies and custom_grad:
        return _conv_keep_size(x, kernel, pad)
    return lax.conv_general_dilated(x, kernel, strides, pad, dimension_numbers=_DN)


#: Padding of the two output phases' 2x2 convs along one axis (see :func:`upsample_conv2d`).
_PHASE_PAD = ((1, 0), (0, 1))


def subpixel_kernels(kernel):
    """The 3x3 ``kernel`` of a conv applied after a nearest 2x upsample, as the four 2x2 kernels that give the
    output pixels of each phase from the *un-upsampled* input: ``[a][b]`` for output rows ``2i + a`` and
    columns ``2j + b``. Along one axis, output ``2i`` reads upsampled rows ``2i - 1, 2i, 2i + 1``, which are
    input rows ``i - 1, i, i``, so its taps are ``(w0, w1 + w2)`` on rows ``(i - 1, i)``; output ``2i + 1``
    reads input rows ``i, i, i + 1``: taps ``(w0 + w1, w2)`` on ``(i, i + 1)``."""
    if kernel.shape[:2] != (3, 3):
        raise ValueError(f"subpixel_kernels: needs a 3x3 kernel, got {kernel.shape}")
    rows = (jnp.stack([kernel[0], kernel[1] + kernel[2]]), jnp.stack([kernel[0] + kernel[1], kernel[2]]))
    return [[jnp.stack([r[:, 0], r[:, 1] + r[:, 2]], 1), jnp.stack([r[:, 0] + r[:, 1], r[:, 2]], 1)]
            for r in rows]


def _interleave_phases(phases) -> jax.Array:
    """``phases[a][c]``, four ``[B, H, W, C]`` arrays, as the ``[B, 2H, 2W, C]`` image whose pixel
    ``(2i + a, 2j + c)`` is ``phases[a][c][i, j]``."""
    b, h, w, ch = phases[0][0].shape
    y = jnp.stack([jnp.stack(row, axis=3) for row in phases], axis=2)  # [B, H, 2 (a), W, 2 (c), C]
    return y.reshape(b, 2 * h, 2 * w, ch)


def upsample_conv2d(x: jax.Array, kernel: jax.Array, dtype=None, custom_grad: bool | None = None) -> jax.Array:
    """``conv2d(nearest_upsample_2x(x), kernel)`` for a 3x3 ``kernel`` with padding 1 (diffusers'
    ``Upsample2D``), computed from ``x`` at its own resolution: each of the four output phases is a 2x2 conv
    of ``x`` with :func:`subpixel_kernels` (summed in float32, then cast to ``dtype``, default x's), and the
    phases are interleaved. That is 4/9 of the FLOPs of the conv at the upsampled size, forward and both
    gradients, and the upsampled input is never built. Equal to the upsample-then-conv up to float rounding
    (the summed weights); ``tests/test_conv.py`` checks values and gradients against it. The phase convs'
    gradient path is chosen as :func:`conv2d` would choose it for the 3x3 conv at the upsampled size
    (``custom_grad``, as there)."""
    dtype = x.dtype if dtype is None else dtype
    b, h, w, cin = x.shape
    if custom_grad is None:  # as conv2d would choose for the 3x3 conv at the upsampled size
        custom_grad = _auto_custom_grad(cin, 4 * h * w, 9 * kernel.shape[-1])
    ks = subpixel_kernels(kernel.astype(jnp.float32))
    x = x.astype(dtype)
    phases = [[conv2d(x, ks[a][c].astype(dtype), 1, (_PHASE_PAD[a], _PHASE_PAD[c]), custom_grad)
               for c in range(2)] for a in range(2)]
    return _interleave_phases(phases)


# ----------------------------------------------------------------------------------------------------
# Winograd F(2x2, 3x3)
# ----------------------------------------------------------------------------------------------------
#
# Each 2x2 block of outputs of a 3x3 conv is ``A^T [(G g G^T) * (B^T d B)] A`` (Lavin & Gray 2016, "Fast
# Algorithms for Convolutional Neural Networks") for the 4x4 input tile ``d`` under it: 16 products per
# (input, output) channel pair instead of 36, that is 4/9 of the multiply-adds, as 16 matmuls
# ``[tiles, C_in] @ [C_in, C_out]``. The transforms are a few adds per element, fused by XLA into the
# matmuls' producers and consumer.

#: ``G``: the kernel transform, ``U = G g G^T`` per (in, out) channel pair.
_WINO_G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]], np.float32)
#: Flipping a 3x3 kernel spatially permutes the 4x4 transformed kernel: ``G J = S G``, with ``J`` the 3x3
#: reversal and ``S`` the swap of rows 0 and 3 (rows 1 and 2 of ``G`` are palindromes).
_WINO_FLIP = (3, 1, 2, 0)

#: Backends where :func:`use_winograd` may say yes. Measured on XLA:CPU only (cuDNN picks its own algorithms).
WINOGRAD_BACKENDS = ("cpu",)
#: Winograd is used for convs with at least this many input and output channels ...
WINOGRAD_MIN_CHANNELS = 64
#: ... on images of at most this many pixels. Measured per conv, forward, same process, alternating
#: (2-core EPYC, XLA:CPU, jax 0.10; ``benchmarks/results/history.md``, fourth round): 0.36-0.65x XLA's direct
#: conv at 32^2 and below (LPIPS-VGG16's 128-512-channel layers at B8, 64^2 crops), 0.56-0.9x for 256-512
#: channels at 16^2-64^2 (B1-B4, 256^2 crops), 0.91x for 64 channels at 64^2, B8; but 1.2x for 128 channels at
#: 128^2 and 1.7x for 64 channels at 256^2, where XLA's direct conv runs near the matmul peak.
WINOGRAD_MAX_PIXELS = 64 * 64
#: :func:`conv2d` (the autoencoder's convs) uses :func:`winograd_conv2d` from this many channels (and
#: :func:`use_winograd`'s image-size and backend rule); None: never. 128 since the thirteenth round: the
#: sd-vae-ft-mse B1 step (4 steps per call) took 5.59 s against 6.39 s without (0.87x; encoder only 6.21 s,
#: decoder only 5.87 s), for 355 MB more peak RSS in the same process, which B1's margin under PyTorch's now
#: holds (it did not in the fifth round, when it was first measured: +218 MB took B1 to 1.05x torch's), and
#: 15 s more compile; in ``benchmarks/train_step.py`` B1 went from 1.01x to 0.92-0.94x torch's time, B4 from
#: 0.77-0.79x to 0.68-0.70x. The tiny presets' convs (at most 64 channels) are unaffected: 64 would reach
#: them (7% faster, but 20 s (50%) more compile, which the test suite would pay at every step it compiles;
#: fifth round). See ``benchmarks/results/history.md``, fifth and thirteenth rounds.
CONV2D_WINOGRAD_MIN_CHANNELS: int | None = 128


def _combine(coeffs, items):
    """``[sum_j coeffs[i, j] items[j] for each row i]`` for a small constant matrix, skipping its zeros (the
    Winograd transforms are a few adds and halvings)."""
    out = []
    for row in np.asarray(coeffs):
        acc = None
        for c, item in zip(row, items):
            if c != 0:
                term = item if c == 1 else -item if c == -1 else float(c) * item
                acc = term if acc is None else acc + term
        out.append(acc)
    return out


def _kernel_transform(kernel, columns_first: bool = False) -> tuple[jax.Array, ...]:
    """``G g G^T`` of a 3x3 HWIO kernel as 16 ``[C_in, C_out]`` arrays, entry ``4 a + b`` (traceable);
    ``columns_first``: summed in the other order, as :func:`_input_tiles`."""
    if columns_first:
        cols = _combine(_WINO_G, [kernel[:, s] for s in range(3)])  # [b] x [3 (r), C_in, C_out]
        by_col = [_combine(_WINO_G, [c[r] for r in range(3)]) for c in cols]  # [b][a]
        return tuple(by_col[b][a] for a in range(4) for b in range(4))
    rows = _combine(_WINO_G, [kernel[r] for r in range(3)])  # 4 x [3, C_in, C_out]
    return tuple(m for r in rows for m in _combine(_WINO_G, [r[s] for s in range(3)]))


def _kernel_transform_t(du) -> jax.Array:
    """The transpose of :func:`_kernel_transform`: 16 ``[C_in, C_out]`` cotangents -> the ``[3, 3, C_in,
    C_out]`` kernel cotangent ``G^T du G``."""
    cols = [_combine(_WINO_G.T, [du[4 * a + b] for a in range(4)]) for b in range(4)]  # [b][r]
    return jnp.stack([jnp.stack(_combine(_WINO_G.T, [cols[b][r] for b in range(4)])) for r in range(3)])


def winograd_kernel(kernel) -> tuple[jax.Array, ...]:
    """The Winograd F(2x2, 3x3) transform of a 3x3 HWIO ``kernel``: 16 float32 ``[C_in, C_out]`` matrices,
    entry ``4 a + b`` holding ``(G g G^T)[a, b]`` for every channel pair. For a frozen kernel, computed
    once, and kept as 16 separate arrays: slices of one ``[16, C_in, C_out]`` array were copied by XLA in
    every step (about 100 MB per LPIPS-VGG16 step)."""
    if tuple(kernel.shape[:2]) != (3, 3) or len(kernel.shape) != 4:
        raise ValueError(f"winograd_kernel: needs a 3x3 HWIO kernel, got shape {tuple(kernel.shape)}")
    return _kernel_transform(jnp.asarray(kernel, jnp.float32))


def winograd_fits(kernel_shape, dtype, min_channels: int = WINOGRAD_MIN_CHANNELS) -> bool:
    """The shape-independent half of :func:`use_winograd`: a float32 3x3 kernel with at least
    ``min_channels`` input and output channels (worth transforming at load time)."""
    kh, kw, cin, cout = kernel_shape
    return (kh, kw) == (3, 3) and min(cin, cout) >= min_channels and jnp.dtype(dtype) == jnp.float32


def use_winograd(x_shape, kernel_shape, dtype, min_channels: int = WINOGRAD_MIN_CHANNELS) -> bool:
    """Whether a stride-1, padding-1 3x3 conv of NHWC ``x_shape`` is faster as :func:`winograd_conv3x3`: on
    :data:`WINOGRAD_BACKENDS`, :func:`winograd_fits` with ``min_channels``, and at most
    :data:`WINOGRAD_MAX_PIXELS` per image."""
    return (jax.default_backend() in WINOGRAD_BACKENDS and winograd_fits(kernel_shape, dtype, min_channels)
            and x_shape[1] * x_shape[2] <= WINOGRAD_MAX_PIXELS)


#: ``B^T`` of the input transform ``B^T d B``.
_WINO_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)


def _input_tiles(x, columns_first: bool = False):
    """``B^T d B`` for every 4x4 input tile (stride 2) of NHWC ``x`` padded by 1 (and to an even size):
    ``[4][4]`` arrays ``[B, H'/2, W'/2, C]``. ``columns_first`` sums in the other order (same values up to
    rounding), so that XLA cannot merge the backward pass's tiles with the forward's (see
    :func:`winograd_conv2d`)."""
    b, h, w, cin = x.shape
    he, we = h + h % 2, w + w % 2
    xp = jnp.pad(x, ((0, 0), (1, 1 + he - h), (1, 1 + we - w), (0, 0)))
    if columns_first:
        cols = _combine(_WINO_BT, [xp[:, :, c:c + we:2] for c in range(4)])
        by_col = [_combine(_WINO_BT, [t[:, r:r + he:2] for r in range(4)]) for t in cols]  # [c][a]
        return [[by_col[c][a] for c in range(4)] for a in range(4)]
    rows = _combine(_WINO_BT, [xp[:, r:r + he:2] for r in range(4)])
    return [_combine(_WINO_BT, [t[:, :, c:c + we:2] for c in range(4)]) for t in rows]


#: ``A`` of the output transform ``A^T m A``: output phase ``i`` of a tile takes ``sum_a A[a, i] m[a]``.
_WINO_A = np.array([[1, 0], [1, 1], [1, -1], [0, -1]], np.float32)


def _output_cotangent_tiles(dy):
    """The transpose of the output transform: ``dm[a][c] = sum_ij A[a, i] A[c, j] dy[:, i::2, j::2]`` (dy
    zero-padded to an even size), ``[4][4]`` arrays ``[B, H'/2, W'/2, C]``."""
    b, h, w, _ = dy.shape
    dyp = jnp.pad(dy, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    phase = [[dyp[:, i::2, j::2] for j in range(2)] for i in range(2)]
    rows = [_combine(_WINO_A, [phase[i][j] for i in range(2)]) for j in range(2)]  # [j][a]
    return [_combine(_WINO_A, [rows[j][a] for j in range(2)]) for a in range(4)]


def winograd_conv3x3(x: jax.Array, u, transpose: bool = False) -> jax.Array:
    """The stride-1 conv of NHWC float32 ``x``, padding 1 (torch's ``padding=1``), with the 3x3 kernel whose
    :func:`winograd_kernel` is ``u`` (16 ``[C_in, C_out]`` matrices). With ``transpose``: the conv with
    :func:`transposed_kernel` of that kernel instead, which is the conv's input gradient (``u`` permuted and
    contracted over its output channels, so one transformed kernel serves both directions). Odd sizes are
    padded by one zero row or column, which no kept output reads. Equal to ``lax.conv_general_dilated`` up
    to float rounding (the transforms add a few roundings: about 4e-6 absolute on unit-scale outputs)."""
    b, h, w, cin = x.shape
    shapes = {tuple(m.shape) for m in u}
    mat_shape = next(iter(shapes)) if len(shapes) == 1 else ()
    if len(u) != 16 or len(mat_shape) != 2 or mat_shape[transpose] != cin:
        raise ValueError(f"winograd_conv3x3: transformed kernel {sorted(shapes)} x {len(u)} does not fit input "
                         f"{x.shape}")
    cout = mat_shape[1 - transpose]
    he, we = h + h % 2, w + w % 2
    tiles = _input_tiles(x)

    def product(a, c):  # [tiles, C_out] for tile position (a, c)
        v = tiles[a][c].reshape(-1, cin)
        if transpose:  # the flipped kernel's transform, contracted over its output channels
            mat, contract = u[4 * _WINO_FLIP[a] + _WINO_FLIP[c]], 1
        else:
            mat, contract = u[4 * a + c], 0
        return lax.dot_general(v, mat, (((1,), (contract,)), ((), ())), preferred_element_type=jnp.float32)

    m = [[product(a, c) for c in range(4)] for a in range(4)]
    # A^T m A: rows, then columns; then the four output phases interleaved.
    t = [_combine(_WINO_A.T, [m[a][c] for a in range(4)]) for c in range(4)]  # [c][i]
    phases = [_combine(_WINO_A.T, [t[c][i] for c in range(4)]) for i in range(2)]  # [i][j]
    shape = (b, he // 2, we // 2, cout)
    y = _interleave_phases([[p.reshape(shape) for p in row] for row in phases]).astype(x.dtype)
    return y[:, :h, :w] if (he, we) != (h, w) else y


@jax.custom_vjp
def winograd_conv2d(x, kernel):
    """The stride-1, padding-1 conv of NHWC float32 ``x`` with a trainable 3x3 HWIO ``kernel`` by Winograd
    F(2x2, 3x3), both gradients included: the kernel is transformed in the step (16 ``[C_in, C_out]``
    matrices, cheap next to the conv), ``dx`` is :func:`winograd_conv3x3` of ``dy`` with ``transpose=True``
    on the same matrices, and the transformed kernel's cotangent is 16 matmuls of the input tiles against
    the output cotangent's tiles (4/9 of the direct kernel gradient's multiply-adds), mapped back by
    ``G^T . G``. Only ``x`` and the kernel are kept for the backward pass."""
    return winograd_conv3x3(x, _kernel_transform(kernel))


def _winograd_conv2d_fwd(x, kernel):
    return winograd_conv3x3(x, _kernel_transform(kernel)), (x, kernel)


def _winograd_conv2d_bwd(res, dy):
    # The input tiles and the transformed kernel are recomputed, summed in the other order. Kept from the
    # forward, or computed the same way (XLA's CSE merges the two, and on CPU ignores an optimization
    # barrier), they stay live from the forward to the backward pass: 4x every input and 16/9 of every
    # kernel, 0.5 GB more temp memory in the sd-vae-ft-mse B1 step.
    x, kernel = res
    u = _kernel_transform(kernel, columns_first=True)
    cin, cout = x.shape[-1], dy.shape[-1]
    v, dm = _input_tiles(x, columns_first=True), _output_cotangent_tiles(dy)
    du = [lax.dot_general(v[a][c].reshape(-1, cin), dm[a][c].reshape(-1, cout), (((0,), (0,)), ((), ())),
                          preferred_element_type=jnp.float32) for a in range(4) for c in range(4)]
    return winograd_conv3x3(dy, u, transpose=True), _kernel_transform_t(du)


winograd_conv2d.defvjp(_winograd_conv2d_fwd, _winograd_conv2d_bwd)


@jax.custom_vjp
def frozen_winograd_conv(x, u):
    """:func:`winograd_conv3x3` with a *frozen* transformed kernel ``u``, differentiable w.r.t. ``x`` only
    (``u`` gets a zero cotangent): the input gradient is :func:`winograd_conv3x3` of ``dy`` with
    ``transpose=True``. Used by :mod:`fvae_core.lpips` where :func:`use_winograd` says so."""
    return winograd_conv3x3(x, u)


def _frozen_winograd_fwd(x, u):
    return winograd_conv3x3(x, u), u


def _frozen_winograd_bwd(u, dy):
    return winograd_conv3x3(dy, u, transpose=True), None


frozen_winograd_conv.defvjp(_frozen_winograd_fwd, _frozen_winograd_bwd)
