"""The KL autoencoder of Stable Diffusion, in Flax (linen), NHWC.

This is an independent port of diffusers' ``AutoencoderKL`` (``diffusers/models/autoencoders/
autoencoder_kl.py`` with ``Encoder``/``Decoder`` from ``autoencoders/vae.py``), which itself follows
CompVis LDM's ``ldm/modules/diffusionmodules/model.py``. The parameter tree mirrors diffusers' module
names (``encoder.down_blocks_0.resnets_1.conv1.kernel`` <-> ``encoder.down_blocks.0.resnets.1.conv1.weight``)
so that :mod:`fvae_core.weights` can port weights strictly. Parity with diffusers' PyTorch model is
tested in ``tests/test_autoencoder_parity.py``.

Conventions (see :mod:`fvae_core.conventions`): images at the boundary are [-1, 1], NHWC.

Mixed precision: ``dtype`` is the compute dtype (e.g. ``jnp.bfloat16``); parameters are always created
and stored in float32 and cast at use. Group norms, the attention softmax and the posterior are computed
in float32; ``decode`` returns float32.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from fvae_core.conv import conv2d, upsample_conv2d

Dtype = Any


class ConfigError(ValueError):
    """An autoencoder config that diffusers' AutoencoderKL would not build (or that fvae does not support)."""


_ENCODER_BLOCK = "DownEncoderBlock2D"
_DECODER_BLOCK = "UpDecoderBlock2D"
_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch.nn.GELU() default is exact erf
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The fields of a diffusers ``AutoencoderKL`` ``config.json``, with diffusers' defaults.

    Only fields that change the network or the latent scaling are meaningful; ``sample_size``,
    ``force_upcast``, ``latents_mean`` and ``latents_std`` are carried through export unchanged.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = (_ENCODER_BLOCK,)
    up_block_types: tuple[str, ...] = (_DECODER_BLOCK,)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        n = len(self.block_out_channels)
        if n == 0:
            raise ConfigError("block_out_channels must not be empty")
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ConfigError(
                f"down_block_types ({len(self.down_block_types)}), up_block_types ({len(self.up_block_types)}) "
                f"and block_out_channels ({n}) must have the same length"
            )
        bad = sorted({t for t in self.down_block_types if t != _ENCODER_BLOCK}
                     | {t for t in self.up_block_types if t != _DECODER_BLOCK})
        if bad:
            raise ConfigError(f"unsupported block types {bad}: AutoencoderKL uses only "
                              f"{_ENCODER_BLOCK} and {_DECODER_BLOCK}")
        if self.act_fn not in _ACTIVATIONS:
            raise ConfigError(f"unsupported act_fn {self.act_fn!r}; expected one of {sorted(_ACTIVATIONS)}")
        for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        for c in self.block_out_channels:
            if not isinstance(c, int) or isinstance(c, bool) or c < 1:
                raise ConfigError(f"block_out_channels must be positive integers, got {self.block_out_channels!r}")
            if c % self.norm_num_groups:
                raise ConfigError(f"norm_num_groups={self.norm_num_groups} does not divide block channel count {c}")

    @property
    def downsample_factor(self) -> int:
        """Spatial factor between image and latent (8 for SD-style VAEs)."""
        return 2 ** (len(self.block_out_channels) - 1)

    # ---- diffusers config.json round trip -------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VAEConfig":
        """Build from a diffusers ``config.json`` dict. Keys starting with ``_`` are metadata; any other
        unknown key is an error (it would change the network in a way we do not implement)."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"a VAE config must be a JSON object, got {type(d).__name__}")
        cls_name = d.get("_class_name")
        if cls_name is not None and cls_name != "AutoencoderKL":
            raise ConfigError(f"config is for {cls_name!r}, not 'AutoencoderKL'")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if not k.startswith("_") and k not in fields)
        if unknown:
            raise ConfigError(f"unknown AutoencoderKL config keys: {unknown}")
        kw = {}
        for k, v in d.items():
            if k.startswith("_"):
                continue
            if isinstance(v, list):
                v = tuple(v)
            kw[k] = v
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """The diffusers ``config.json`` content for this config."""
        out: dict[str, Any] = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.42.1"}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def replace(self, **kw) -> "VAEConfig":
        return dataclasses.replace(self, **kw)


def _sd_like(**kw) -> VAEConfig:
    n = len(kw.get("block_out_channels", (128, 256, 512, 512)))
    base = dict(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32,
        down_block_types=(_ENCODER_BLOCK,) * n, up_block_types=(_DECODER_BLOCK,) * n,
    )
    base.update(kw)
    return VAEConfig(**base)


#: Architectures of well-known VAEs (public config.json values). Weights must be loaded separately.
PRESET_CONFIGS: dict[str, VAEConfig] = {
    "sd-vae-ft-mse": _sd_like(sample_size=256, scaling_factor=0.18215),
    "sdxl-vae": _sd_like(sample_size=1024, scaling_factor=0.13025),
    "flux-vae": _sd_like(sample_size=1024, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                         use_quant_conv=False, use_post_quant_conv=False),
    # Small SD-shaped model (f=8, 4 latent channels) for CPU demos and tests.
    "tiny-sd": _sd_like(block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=16,
                        sample_size=64),
    # SD-shaped (f=8, 4 latent channels) with its width at the low resolutions, where channels are cheap:
    # about 20% slower per step than tiny-sd on 2 CPU cores with 5.5x the parameters (6.8 M).
    "small-sd": _sd_like(block_out_channels=(32, 64, 128, 192), layers_per_block=1, norm_num_groups=16,
                         sample_size=128),
    # Smallest sensible model (f=2): smoke runs and tests, where compile time dominates.
    "micro": _sd_like(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=32),
}


# ---- posterior --------------------------------------------------------------------------------------
@flax.struct.dataclass
class DiagonalGaussian:
    """The encoder's posterior q(z|x) = N(mean, exp(logvar)), NHWC, float32.

    ``logvar`` is clamped to [-30, 20] as in LDM and diffusers.
    """

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
        moments = moments.astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, rng: jax.Array) -> jax.Array:
        return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self) -> jax.Array:
        """KL(q || N(0, I)) summed over latent dims, one value per sample (LDM's ``kl()``)."""
        return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=(1, 2, 3))


# ---- layers -----------------------------------------------------------------------------------------
def _grads_first(fn, x, params):
    """``fn(x, params)``, differentiated so that every gradient of ``params`` is complete before anything can
    use the gradient of ``x``, as in torch, where a layer's backward returns both at once.

    Autodiff makes a layer's parameter gradient a separate reduction (GroupNorm scale and bias, conv bias,
    1x1 and 3x3 conv kernels) whose result is next needed by the optimiser at the very end of the step, so
    XLA:CPU's memory-optimised scheduler ran those reductions last and kept their full-resolution inputs
    alive through the rest of the backward: 634 MB of the sd-vae-ft-mse B1 step's peak. Here the input
    gradient carries ``0 * sum(max(g) for each param grad g)``, a data dependency that makes the scheduler
    compute them first. A ``max``, not a ``sum``: XLA merges a sum of a sum-reduction into one reduction of
    the full-resolution input, and the original reduction then stays deferred. (JAX has no control
    dependencies, and its optimisation barriers were gone from XLA:CPU's optimised HLO here.) The cost is
    one read of each parameter gradient; values are unchanged (``+ 0``), unless a gradient is non-finite,
    when the step is skipped anyway (``train_steps.all_finite``). Only on :data:`GRADS_FIRST_BACKENDS`;
    elsewhere plain ``fn(x, params)``."""
    if not _grads_first_here():
        return fn(x, params)
    return _grads_first_vjp(fn, x, params)


def _grads_first_here() -> bool:
    return jax.default_backend() in GRADS_FIRST_BACKENDS


#: Backends on which :func:`_grads_first` ties each layer's input gradient to its parameter gradients. A fix
#: for XLA:CPU's memory-optimised scheduler; on the GPU it is an extra pass over every input gradient (and
#: the step has memory to spare): the sd-vae-ft-mse B32 bf16 step without it and with updates as ``where``
#: (``train_steps.COND_UPDATE_BACKENDS``) took 187 instead of 193 ms on an H100
#: (``benchmarks/results/history.md``, seventh round).
GRADS_FIRST_BACKENDS = ("cpu",)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _grads_first_vjp(fn, x, params):
    return fn(x, params)


def _grads_first_fwd(fn, x, params):
    return jax.vjp(fn, x, params)


def _grads_first_bwd(fn, vjp, dy):
    dx, dp = vjp(dy)
    tie = sum(jnp.max(g.astype(jnp.float32)) for g in jax.tree_util.tree_leaves(dp)) * 0.0
    return dx + tie.astype(dx.dtype), dp


_grads_first_vjp.defvjp(_grads_first_fwd, _grads_first_bwd)


def _torch_uniform(fan_in_axes):
    """PyTorch's default Conv/Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""

    def init(rng, shape, dtype=jnp.float32, fan_in=None):
        bound = 1.0 / math.sqrt(fan_in)
        return jax.random.uniform(rng, shape, dtype, -bound, bound)

    return init


class Conv(nn.Module):
    """2-D convolution, NHWC/HWIO, params in float32, computed in ``dtype``."""

    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: Any = "SAME_TORCH"  # symmetric k//2 padding as torch's padding=k//2; or explicit pairs
    dtype: Dtype = jnp.float32
    upsample: bool = False  # nearest 2x upsample of the input first (diffusers Upsample2D)

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        cin = x.shape[-1]
        fan_in = cin * k * k
        init = _torch_uniform(None)
        kernel = self.param("kernel", lambda r, s: init(r, s, fan_in=fan_in), (k, k, cin, self.features))
        bias = self.param("bias", lambda r, s: init(r, s, fan_in=fan_in), (self.features,))
        return _grads_first(functools.partial(_conv_layer, k=k, stride=self.stride, padding=self.padding,
                                              dtype=self.dtype, upsample=self.upsample), x, (kernel, bias))


def _conv_layer(x, params, *, k, stride, padding, dtype, upsample):
    """:class:`Conv`'s computation: ``(kernel, bias)`` applied to ``x``."""
    kernel, bias = params
    if upsample and _subpixel_applies(k, stride, padding):
        return upsample_conv2d(x, kernel, dtype) + bias.astype(dtype)
    if upsample:
        x = _upsample_nearest2x(x)
    pad = [(k // 2, k // 2)] * 2 if padding == "SAME_TORCH" else padding
    if k == 1 and stride == 1:
        y = jnp.einsum("bhwc,cd->bhwd", x.astype(dtype), kernel[0, 0].astype(dtype))
    else:
        # lax.conv_general_dilated, with a faster gradient for wide stride-1 convs (fvae_core.conv).
        y = conv2d(x.astype(dtype), kernel.astype(dtype), stride, pad)
    return y + bias.astype(dtype)


class Linear(nn.Module):
    """Dense layer with torch's default init; kernel stored [in, out]."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cin = x.shape[-1]
        init = _torch_uniform(None)
        kernel = self.param("kernel", lambda r, s: init(r, s, fan_in=cin), (cin, self.features))
        bias = self.param("bias", lambda r, s: init(r, s, fan_in=cin), (self.features,))
        return x.astype(self.dtype) @ kernel.astype(self.dtype) + bias.astype(self.dtype)


def _group_norm_grads_first(x, scale, bias, *, groups, eps, act, dtype):
    return _grads_first(lambda x, p: _group_norm_act(x, *p, groups, eps, act, dtype), x, (scale, bias))


def _group_norm_act(x, scale, bias, groups: int, eps: float, act: str | None, dtype):
    """GroupNorm statistics as per-channel sums over the image first, then over each group's few channels:
    the image-wide reductions then run along the contiguous channel axis. Reduced over (H, W, channels of
    the group) in one go, XLA:CPU's reduction was 2-5x slower (tiny decoder, 32 channels in 16 groups: the
    innermost reduced axis had 2 elements), forward and backward. Two passes, as torch: the variance is
    that of the centred values."""
    b, h, w, c = x.shape
    xf = x.astype(jnp.float32)
    n = h * w * (c // groups)

    def group_mean(per_channel_sum):  # [b, c] -> each channel's group mean, [b, 1, 1, c]
        s = per_channel_sum.reshape(b, groups, c // groups).sum(-1, keepdims=True)
        return jnp.broadcast_to(s / n, (b, groups, c // groups)).reshape(b, 1, 1, c)

    mean = group_mean(jnp.sum(xf, axis=(1, 2)))
    var = group_mean(jnp.sum(jnp.square(xf - mean), axis=(1, 2)))
    return group_norm_apply(xf, mean, var, scale, bias, eps, act, dtype)


def group_norm_apply(x, mean, var, scale, bias, eps: float, act: str | None, dtype):
    """The second half of :class:`GroupNorm`: ``act((x - mean) / sqrt(var + eps) * scale + bias)`` in float32,
    cast to ``dtype``, from statistics broadcastable to ``x`` (per sample and channel). Also what
    :mod:`fvae_core.tiling` applies with statistics gathered over a whole image, band by band."""
    y = (x.astype(jnp.float32) - mean) * lax.rsqrt(var + eps) * scale + bias
    if act is not None:
        y = _ACTIVATIONS[act](y)
    return y.astype(dtype)


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm (biased variance, affine), computed in float32, returned in ``dtype``; with
    ``act``, the activation that follows it (``act(GroupNorm(x))``, applied in float32 before the cast).

    On the backends in :data:`REMAT_BACKENDS` the norm (and activation) is rematerialised
    (``jax.checkpoint``): its backward recomputes the
    statistics and the normalised values from ``x``, which is the only thing kept for it. Without that,
    autodiff keeps the centred input, the normalised values and the activation's sigmoid per norm as
    well, and the sd decoder's fwd+bwd temp memory was 10.0 GiB at B4, 256^2, fp32 (torch: about 6); the
    recomputation is elementwise work fused into the backward.
    """

    num_groups: int
    eps: float = 1e-6
    act: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        fn = functools.partial(_group_norm_grads_first, groups=self.num_groups, eps=self.eps, act=self.act,
                               dtype=self.dtype)
        if _remat_here():
            fn = jax.checkpoint(fn)
        return fn(x, scale, bias)


class ResnetBlock(nn.Module):
    """diffusers ``ResnetBlock2D`` without time embedding (pre-norm, output_scale_factor 1, dropout 0)."""

    out_channels: int
    groups: int
    act: str
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = GroupNorm(self.groups, act=self.act, dtype=self.dtype, name="norm1")(x)
        h = checkpoint_name(Conv(self.out_channels, 3, dtype=self.dtype, name="conv1")(h), _KEEP)
        h = GroupNorm(self.groups, act=self.act, dtype=self.dtype, name="norm2")(h)
        h = Conv(self.out_channels, 3, dtype=self.dtype, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = Conv(self.out_channels, 1, dtype=self.dtype, name="conv_shortcut")(x)
        return x.astype(self.dtype) + h


#: Backends on which the decoder and encoder are rematerialised (:class:`GroupNorm`, :func:`_remat`). On
#: XLA:CPU (sd decoder fwd+bwd, B4, 256^2, fp32) the norms' remat cut the temp memory from 10.0 to 8.2 GiB,
#: and the resnet blocks' from 6.6 to 5.5 GiB (with the memory-optimised scheduler), with step times within
#: 2%; on GPU the step was measured without it (``benchmarks/gpu_step.py``) and memory is not short.
REMAT_BACKENDS = ("cpu",)


def _remat_here() -> bool:
    return jax.default_backend() in REMAT_BACKENDS


#: The one activation a :class:`ResnetBlock` keeps for its backward besides its input (``conv1``'s output).
_KEEP = "fvae_resnet_keep"


def _remat(module_cls, *names):
    """``module_cls`` rematerialised (same params and names): its backward keeps only its inputs and the
    values tagged with ``checkpoint_name(., n)`` for ``n`` in ``names``, and recomputes the rest from them.

    In a :class:`ResnetBlock` the tag is on ``conv1``'s output; the norm+activation outputs are recomputed,
    elementwise, in the backward. The convs are *not* recomputed: their outputs are not needed by any
    backward rule (a conv's VJP reads its input and kernel), so the recomputed convs are dead code
    (checked: the step's FLOP count is unchanged). With this the sd decoder keeps 2 activations per resnet
    for its backward where autodiff kept about 6 (``jax``'s residuals at B4: 4.17 -> 2.24 GiB; torch keeps
    the inputs of both norms, both SiLUs and both convs).
    """
    return nn.remat(module_cls, policy=jax.checkpoint_policies.save_only_these_names(*names))


def _attend(q, k, v, query_chunk: int = 4096):
    """Single-head softmax attention in float32; queries are processed in chunks so that very large
    images (mid-block at 128x128 or more) do not materialise an N x N score matrix at once."""
    scale = 1.0 / math.sqrt(q.shape[-1])

    def block(qc):
        s = jnp.einsum("bqc,bkc->bqk", qc, k, preferred_element_type=jnp.float32) * scale
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        return jnp.einsum("bqk,bkc->bqc", p, v)

    n = q.shape[1]
    if n <= query_chunk:
        return block(q)
    n_chunks = -(-n // query_chunk)
    qp = jnp.pad(q, ((0, 0), (0, n_chunks * query_chunk - n), (0, 0)))
    qs = jnp.moveaxis(qp.reshape(q.shape[0], n_chunks, query_chunk, q.shape[2]), 1, 0)
    out = lax.map(block, qs)
    return jnp.moveaxis(out, 0, 1).reshape(q.shape[0], -1, q.shape[2])[:, :n]


class AttentionBlock(nn.Module):
    """diffusers ``Attention`` as built by ``UNetMidBlock2D`` for the VAE: group norm, one head of
    width C, q/k/v/out linear layers, residual connection."""

    groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        t = GroupNorm(self.groups, dtype=self.dtype, name="group_norm")(x).reshape(b, h * w, c)
        q = Linear(c, dtype=self.dtype, name="to_q")(t)
        k = Linear(c, dtype=self.dtype, name="to_k")(t)
        v = Linear(c, dtype=self.dtype, name="to_v")(t)
        o = Linear(c, dtype=self.dtype, name="to_out_0")(_attend(q, k, v))
        return x.astype(self.dtype) + o.reshape(b, h, w, c)


class MidBlock(nn.Module):
    """diffusers ``UNetMidBlock2D``: resnet, (attention), resnet."""

    groups: int
    act: str
    add_attention: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        x = _resnet_block(c, self.groups, self.act, self.dtype, name="resnets_0")(x)
        if self.add_attention:
            x = AttentionBlock(self.groups, self.dtype, name="attentions_0")(x)
        return _resnet_block(c, self.groups, self.act, self.dtype, name="resnets_1")(x)


def _upsample_nearest2x(x):
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
    return x.reshape(b, 2 * h, 2 * w, c)


#: Backends on which diffusers' ``Upsample2D`` (nearest 2x, then a 3x3 conv) is computed as four 2x2 convs at
#: the input's resolution (:func:`fvae_core.conv.upsample_conv2d`): 4/9 of the FLOPs, and the upsampled
#: input is never built. The sd decoder's upsample convs are 28% of its forward FLOPs; on XLA:CPU their
#: fwd+bwd went from 890 to 419 ms (512 ch, 64^2 -> 128^2) and from 1072 to 456 ms (256 ch, 128^2 -> 256^2).
#: On an H100 the sd-vae-ft-mse B32 bf16 step went from 207 to 195 ms (cuDNN; ``benchmarks/results/history.md``,
#: seventh round).
#: Not measured on TPU.
SUBPIXEL_BACKENDS = ("cpu", "gpu")


def _subpixel_here() -> bool:
    return jax.default_backend() in SUBPIXEL_BACKENDS


def _subpixel_applies(kernel_size: int, stride: int, padding) -> bool:
    return kernel_size == 3 and stride == 1 and padding == "SAME_TORCH" and _subpixel_here()


_RematResnetBlock = _remat(ResnetBlock, _KEEP)
#: diffusers ``Upsample2D`` in its upsample-then-conv form, rematerialised: it keeps the pre-upsample input
#: (4x smaller than the conv's input) and redoes the upsample, a copy, in the backward. (The sub-pixel form
#: keeps only that input anyway.)
_RematConv = _remat(Conv)


def _resnet_block(*args, **kw):
    return (_RematResnetBlock if _remat_here() else ResnetBlock)(*args, **kw)


def _upsample_conv(*args, **kw):
    remat = _remat_here() and not _subpixel_here()  # the sub-pixel form keeps only its input anyway
    return (_RematConv if remat else Conv)(*args, upsample=True, **kw)


class Encoder(nn.Module):
    config: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.config, self.dtype
        g, act = cfg.norm_num_groups, cfg.act_fn
        h = Conv(cfg.block_out_channels[0], 3, dtype=dt, name="conv_in")(x)
        n = len(cfg.block_out_channels)
        for i, ch in enumerate(cfg.block_out_channels):
            for j in range(cfg.layers_per_block):
                h = _resnet_block(ch, g, act, dt, name=f"down_blocks_{i}_resnets_{j}")(h)
            if i < n - 1:
                # diffusers Downsample2D(padding=0): pad right/bottom by one, then a stride-2 3x3 conv.
                h = Conv(ch, 3, stride=2, padding=((0, 1), (0, 1)), dtype=dt,
                         name=f"down_blocks_{i}_downsamplers_0_conv")(h)
        h = MidBlock(g, act, cfg.mid_block_add_attention, dt, name="mid_block")(h)
        h = GroupNorm(g, act="silu", dtype=dt, name="conv_norm_out")(h)  # SiLU whatever act_fn (as diffusers)
        return Conv(2 * cfg.latent_channels, 3, dtype=dt, name="conv_out")(h)


class Decoder(nn.Module):
    config: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z, return_features: bool = False):
        cfg, dt = self.config, self.dtype
        g, act = cfg.norm_num_groups, cfg.act_fn
        rev = list(reversed(cfg.block_out_channels))
        h = Conv(rev[0], 3, dtype=dt, name="conv_in")(z)
        h = MidBlock(g, act, cfg.mid_block_add_attention, dt, name="mid_block")(h)
        for i, ch in enumerate(rev):
            for j in range(cfg.layers_per_block + 1):
                h = _resnet_block(ch, g, act, dt, name=f"up_blocks_{i}_resnets_{j}")(h)
            if i < len(rev) - 1:
                h = _upsample_conv(ch, 3, dtype=dt, name=f"up_blocks_{i}_upsamplers_0_conv")(h)
        h = GroupNorm(g, act="silu", dtype=dt, name="conv_norm_out")(h)  # SiLU whatever act_fn (as diffusers)
        y = Conv(cfg.out_channels, 3, dtype=dt, name="conv_out")(h)
        return (y, h) if return_features else y


class AutoencoderKL(nn.Module):
    """Flax ``AutoencoderKL``. Use :meth:`encode` / :meth:`decode` through ``apply(..., method=...)``
    or the helpers :func:`encode` / :func:`decode` below.

    ``dtype`` is the compute dtype; params are float32.
    """

    config: VAEConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg, self.dtype)
        self.decoder = Decoder(cfg, self.dtype)
        if cfg.use_quant_conv:
            self.quant_conv = Conv(2 * cfg.latent_channels, 1, dtype=self.dtype)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = Conv(cfg.latent_channels, 1, dtype=self.dtype)

    def encode(self, x) -> DiagonalGaussian:
        """[-1, 1] NHWC images -> posterior over NHWC latents (unscaled, as diffusers)."""
        moments = self.encoder(x)
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, z) -> jax.Array:
        """Unscaled NHWC latents -> [-1, 1] NHWC images (float32, not clamped)."""
        return self.decode_with_features(z)[0]  # the unused features cost nothing under jit (DCE)

    def decode_with_features(self, z) -> tuple[jax.Array, jax.Array]:
        """:meth:`decode`, plus the input of ``decoder.conv_out`` (the last layer), from which the
        gradient of any image-space loss w.r.t. the last-layer kernel follows cheaply (adaptive GAN weight)."""
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        y, h = self.decoder(z, return_features=True)
        return y.astype(jnp.float32), h

    def __call__(self, x, rng=None):
        """Reconstruct: decode(sample) when ``rng`` is given, else decode(mode)."""
        post = self.encode(x)
        z = post.mode() if rng is None else post.sample(rng)
        return self.decode(z), post


def init_params(config: VAEConfig, rng: jax.Array | int = 0, image_size: int | None = None) -> dict:
    """Random float32 params with PyTorch's default init distribution."""
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    s = image_size or 2 * config.downsample_factor
    x = jnp.zeros((1, s, s, config.in_channels), jnp.float32)
    return jax.jit(AutoencoderKL(config).init)(rng, x)["params"]


def abstract_params(config: VAEConfig) -> dict:
    """The param tree's shapes and dtypes, without computing anything."""
    s = 2 * config.downsample_factor
    x = jax.ShapeDtypeStruct((1, s, s, config.in_channels), jnp.float32)
    return jax.eval_shape(lambda r, x: AutoencoderKL(config).init(r, x), jax.random.PRNGKey(0), x)["params"]


def scale_latents(z, config: VAEConfig):
    """Unscaled latents -> the diffusion model's latent space: (z - shift) * scaling_factor."""
    return (z - (config.shift_factor or 0.0)) * config.scaling_factor


def unscale_latents(zs, config: VAEConfig):
    """Inverse of :func:`scale_latents`."""
    return zs / config.scaling_factor + (config.shift_factor or 0.0)
