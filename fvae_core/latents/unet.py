"""A small UNet that predicts the rectified-flow velocity of SD-shaped latents (issue 28), in Flax (linen), NHWC.

The layout is the DDPM/ADM UNet (Ho et al. 2020; Dhariwal & Nichol 2021) cut down for 8^2-16^2 latents on
a CPU: a sinusoidal embedding of t through a 2-layer MLP, added to every residual block; residual blocks
with group norm and SiLU; self-attention at the coarse level(s); skip connections concatenated on the way up;
the output convolution initialised to zero, so that the untrained model predicts v = 0.

``velocity_fn(params, config)`` returns the ``velocity(x, t)`` that :func:`fvae_core.latents.flow.sample`
integrates.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """``channels``: latent channels (4 for SD). ``widths``: channels per level, one 2x downsampling between
    levels (so a latent side must be divisible by 2^(len(widths) - 1)). ``attention``: per level, whether
    its blocks end in self-attention (the middle block always has one)."""

    channels: int = 4
    widths: tuple[int, ...] = (64, 128)
    blocks: int = 2
    attention: tuple[bool, ...] = (False, True)
    groups: int = 16
    heads: int = 4
    time_dim: int = 256

    def __post_init__(self):
        if not self.widths or any(w <= 0 or w % self.groups for w in self.widths):
            raise ValueError(f"UNet widths {self.widths} must be positive multiples of groups={self.groups}")
        if len(self.attention) != len(self.widths):
            raise ValueError(f"UNet attention {self.attention} needs one flag per level ({len(self.widths)})")
        if self.blocks < 1 or self.channels < 1 or self.heads < 1 or any(w % self.heads for w in self.widths):
            raise ValueError(f"invalid UNet config: blocks={self.blocks}, channels={self.channels}, "
                             f"heads={self.heads} (must divide every width)")

    @property
    def multiple(self) -> int:
        """Latent sides must be a multiple of this."""
        return 2 ** (len(self.widths) - 1)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal features of t in [0, 1] (scaled by 1000 first, as DDPM's integer steps), shape (B, dim):
    cos then sin over log-spaced frequencies (Vaswani et al. 2017; ADM's ``timestep_embedding``)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = (1000.0 * t.astype(jnp.float32))[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class ResBlock(nn.Module):
    width: int
    groups: int

    @nn.compact
    def __call__(self, x, temb):
        h = nn.silu(nn.GroupNorm(self.groups)(x))
        h = nn.Conv(self.width, (3, 3))(h)
        h = h + nn.Dense(self.width)(nn.silu(temb))[:, None, None, :]
        h = nn.silu(nn.GroupNorm(self.groups)(h))
        h = nn.Conv(self.width, (3, 3), kernel_init=nn.initializers.zeros)(h)
        skip = x if x.shape[-1] == self.width else nn.Conv(self.width, (1, 1))(x)
        return skip + h


class SelfAttention(nn.Module):
    groups: int
    heads: int

    @nn.compact
    def __call__(self, x):
        b, hgt, wid, c = x.shape
        h = nn.GroupNorm(self.groups)(x).reshape(b, hgt * wid, c)
        h = nn.MultiHeadDotProductAttention(num_heads=self.heads, out_kernel_init=nn.initializers.zeros)(h, h)
        return x + h.reshape(b, hgt, wid, c)


class LatentUNet(nn.Module):
    config: UNetConfig

    @nn.compact
    def __call__(self, x, t):
        c = self.config
        if x.shape[1] % c.multiple or x.shape[2] % c.multiple:
            raise ValueError(f"latent size {x.shape[1]}x{x.shape[2]} is not a multiple of {c.multiple}")
        temb = timestep_embedding(t, c.time_dim)
        temb = nn.Dense(c.time_dim)(nn.silu(nn.Dense(c.time_dim)(temb)))
        h = nn.Conv(c.widths[0], (3, 3))(x)
        skips = [h]
        for level, (w, attn) in enumerate(zip(c.widths, c.attention)):
            for _ in range(c.blocks):
                h = ResBlock(w, c.groups)(h, temb)
                if attn:
                    h = SelfAttention(c.groups, c.heads)(h)
                skips.append(h)
            if level < len(c.widths) - 1:
                h = nn.Conv(w, (3, 3), strides=(2, 2))(h)
                skips.append(h)
        h = ResBlock(c.widths[-1], c.groups)(h, temb)
        h = SelfAttention(c.groups, c.heads)(h)
        h = ResBlock(c.widths[-1], c.groups)(h, temb)
        for level in reversed(range(len(c.widths))):
            w, attn = c.widths[level], c.attention[level]
            for _ in range(c.blocks + 1):
                h = ResBlock(w, c.groups)(jnp.concatenate([h, skips.pop()], axis=-1), temb)
                if attn:
                    h = SelfAttention(c.groups, c.heads)(h)
            if level > 0:
                b, hh, ww, ch = h.shape
                h = jax.image.resize(h, (b, 2 * hh, 2 * ww, ch), "nearest")
                h = nn.Conv(w, (3, 3))(h)
        h = nn.silu(nn.GroupNorm(c.groups)(h))
        return nn.Conv(c.channels, (3, 3), kernel_init=nn.initializers.zeros)(h)


def init_params(config: UNetConfig, rng: jax.Array | int = 0, size: int = 8) -> dict:
    key = jax.random.PRNGKey(rng) if isinstance(rng, int) else rng
    x = jnp.zeros((1, size, size, config.channels), jnp.float32)
    return jax.jit(LatentUNet(config).init)(key, x, jnp.zeros((1,)))["params"]


def velocity_fn(params, config: UNetConfig):
    """``velocity(x, t)`` for :func:`fvae_core.latents.flow.sample`."""
    model = LatentUNet(config)
    return lambda x, t: model.apply({"params": params}, x, t)


def param_count(params) -> int:
    return int(sum(p.size for p in jax.tree_util.tree_leaves(params)))
