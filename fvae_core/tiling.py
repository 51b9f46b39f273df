"""Exact tiled decode and encode: any image size in bounded memory, equal to the untiled network.

The anchors and their flaws: diffusers' ``enable_tiling()`` runs each tile through the whole network with
that tile's own GroupNorm statistics and blends the overlaps, so tone shifts from tile to tile and seams
remain; the multidiffusion upscaler's "Tiled VAE" estimates the statistics over the whole image. Here
nothing is estimated:

* **Bands, layer by layer.** The network runs one layer at a time over horizontal bands of the image (full
  width, a few rows). A 3x3 conv reads its band plus one row of halo on each side (two output rows for the
  upsampling conv; two input rows for the stride-2 downsampling one), computes with the model's own code
  (:func:`fvae_core.autoencoder._conv_layer`: the same padding, sub-pixel upsampling and kernels) and keeps
  the rows that the halo made exact. Columns are whole, so no vertical seam can exist.
* **GroupNorm from the whole image.** Every activation a GroupNorm reads is written to a :class:`Store`
  band by band, and per-channel sums of it are accumulated as it is written (shifted by a per-group
  constant, in float64 across bands, so the variance does not cancel). The norm then applies those
  statistics (:func:`fvae_core.autoencoder.group_norm_apply`) band by band: exactly the untiled
  computation, up to the order of float32 summation.
* **Attention** (the mid block, at the latent's resolution) is global: its keys and values are computed band
  by band and kept whole, and each band's queries attend to all of them. At a 512² latent (4096² image)
  with 512 channels that is 1 GiB; the scores are computed a band of queries at a time.
* **Where activations live.** A :class:`Store` is a NumPy array in memory, or a file read and written with
  ``pread``/``pwrite`` once it is larger than ``ram_limit`` bytes: the page cache then holds it, which is
  not the process's memory, and the process keeps only the bands in flight. So peak memory is set by the
  band size and the attention's keys and values, not by the image.

The price: each activation is written once and read once or twice, and the sums are extra passes over
bands already in memory. ``benchmarks/tiling.py`` measures it against untiled and against diffusers.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fvae_core.autoencoder import VAEConfig, _attend, _conv_layer, group_norm_apply

__all__ = ["Store", "TileError", "tiled_decode", "tiled_encode", "tiled_reconstruct", "band_rows"]

GN_EPS = 1e-6  # diffusers' VAE GroupNorm eps (autoencoder.GroupNorm's default)


class TileError(ValueError):
    """A tiled call that cannot run as asked; the message is one line."""


# ---- stores --------------------------------------------------------------------------------------------
class Store:
    """One image's activation, ``(H, W, C)`` float32, written and read by rows; in memory, or in a file
    when larger than ``ram_limit`` bytes. With ``stats_groups`` it accumulates the GroupNorm statistics
    of what is written (:meth:`group_stats`)."""

    def __init__(self, h: int, w: int, c: int, ram_limit: int, stats_groups: int | None = None, tmpdir=None):
        self.shape = (h, w, c)
        self.row_bytes = w * c * 4
        self.on_disk = h * self.row_bytes > ram_limit
        self._fd = None
        if self.on_disk:
            fd, path = tempfile.mkstemp(prefix="fvae-tile-", suffix=".f32", dir=tmpdir)
            os.unlink(path)  # anonymous: gone when closed, even if the process dies
            os.ftruncate(fd, h * self.row_bytes)
            self._fd = fd
        else:
            self._mem = np.empty((h, w, c), np.float32)
        self.groups = stats_groups
        self._shift = self._s1 = self._s2 = None

    def write(self, r0: int, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, np.float32)
        if self.groups:
            self._accumulate(rows)
        if self.on_disk:
            view = memoryview(rows).cast("B")
            off, done = r0 * self.row_bytes, 0
            while done < len(view):
                done += os.pwrite(self._fd, view[done:], off + done)
        else:
            self._mem[r0:r0 + len(rows)] = rows

    def read(self, r0: int, r1: int) -> np.ndarray:
        r0, r1 = max(r0, 0), min(r1, self.shape[0])
        if not self.on_disk:
            return self._mem[r0:r1]
        n = (r1 - r0) * self.row_bytes
        buf = bytearray(n)
        view, off, done = memoryview(buf), r0 * self.row_bytes, 0
        while done < n:
            got = os.preadv(self._fd, [view[done:]], off + done)
            if got <= 0:
                raise TileError("a tile store's file ended early (disk full or removed?)")
            done += got
        return np.frombuffer(buf, np.float32).reshape(r1 - r0, *self.shape[1:])

    def _accumulate(self, rows: np.ndarray) -> None:
        c, g = self.shape[2], self.groups
        if self._shift is None:  # a per-group constant near the mean keeps E[x²] - E[x]² from cancelling
            self._shift = np.repeat(rows.reshape(-1, g, c // g).mean(axis=(0, 2), dtype=np.float64), c // g)
            self._s1, self._s2 = np.zeros(c), np.zeros(c)
        s1, s2 = _shifted_sums(jnp.asarray(rows), jnp.asarray(self._shift, jnp.float32))
        self._s1 += np.asarray(s1, np.float64)
        self._s2 += np.asarray(s2, np.float64)

    def group_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel ``(mean, var)`` of each channel's group over the whole image (float32, ``[C]``),
        the biased variance as torch's GroupNorm."""
        h, w, c = self.shape
        g = self.groups
        n = h * w * (c // g)
        d1 = self._s1.reshape(g, -1).sum(1) / n  # E[x - K] per group
        d2 = self._s2.reshape(g, -1).sum(1) / n  # E[(x - K)²]
        shift = self._shift.reshape(g, -1)[:, 0]
        mean, var = shift + d1, np.maximum(d2 - d1 * d1, 0.0)
        return np.repeat(mean, c // g).astype(np.float32), np.repeat(var, c // g).astype(np.float32)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._mem = None


@jax.jit
def _shifted_sums(rows, shift):
    d = rows - shift
    return jnp.sum(d, axis=(0, 1)), jnp.sum(d * d, axis=(0, 1))


# ---- band computations (jitted once per shape) --------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("k", "stride", "padding", "upsample", "act", "norm"))
def _norm_conv(x, mean, var, scale, bias, kernel, kbias, *, k, stride, padding, upsample, act, norm):
    """``conv(act(GroupNorm(x)))`` (or ``conv(x)`` without ``norm``) on one band, with the model's code."""
    if norm:
        x = group_norm_apply(x[None], mean, var, scale, bias, GN_EPS, act, jnp.float32)[0]
    y = _conv_layer(x[None], (kernel, kbias), k=k, stride=stride, padding=padding, dtype=jnp.float32,
                    upsample=upsample)
    return y[0]


@jax.jit
def _add(a, b):
    return a + b


@jax.jit
def _qkv(x, mean, var, scale, bias, wq, bq, wk, bk, wv, bv):
    t = group_norm_apply(x[None], mean, var, scale, bias, GN_EPS, None, jnp.float32)[0]
    t = t.reshape(-1, t.shape[-1])
    return t @ wq + bq, t @ wk + bk, t @ wv + bv


@functools.partial(jax.jit, static_argnames=("chunk",))
def _attend_band(x, q, k, v, wo, bo, *, chunk):
    o = _attend(q[None], k[None], v[None], query_chunk=chunk)[0] @ wo + bo
    return x + o.reshape(x.shape)


# ---- the plan: what runs, band by band ----------------------------------------------------------------
def band_rows(width: int, channels: int, band_bytes: int) -> int:
    """Rows per band so that one band of a ``width`` x ``channels`` float32 activation is at most
    ``band_bytes`` (at least 1 row)."""
    return max(1, band_bytes // (width * channels * 4))


@dataclasses.dataclass
class _Runner:
    groups: int
    act: str
    ram_limit: int
    band_bytes: int
    attn_chunk: int
    tmpdir: str | None = None
    live: list = dataclasses.field(default_factory=list)

    def store(self, h, w, c, stats=True) -> Store:
        s = Store(h, w, c, self.ram_limit, self.groups if stats else None, self.tmpdir)
        self.live.append(s)
        return s

    def free(self, *stores: Store) -> None:
        for s in stores:
            s.close()
            if s in self.live:
                self.live.remove(s)

    # a conv layer over bands of its *output*; ``norm``: GroupNorm (+ act) of the input first
    def conv(self, x: Store, p: dict, *, norm: dict | None = None, act: str | None = None, upsample=False,
             stride=1, pad=None, stats=True) -> Store:
        h, w, cin = x.shape
        kernel, kbias = np.asarray(p["kernel"]), np.asarray(p["bias"])
        k, cout = kernel.shape[0], kernel.shape[-1]
        if stride == 2:
            ho, wo = (h + 1 - k) // 2 + 1, (w + 1 - k) // 2 + 1
        else:
            ho, wo = (2 * h, 2 * w) if upsample else (h, w)
        out = self.store(ho, wo, cout, stats)
        if norm is not None:
            mean, var = x.group_stats()
            gn = (mean, var, np.asarray(norm["scale"]), np.asarray(norm["bias"]))
        else:
            gn = (np.zeros(cin, np.float32), np.ones(cin, np.float32), np.ones(cin, np.float32),
                  np.zeros(cin, np.float32))
        rows = band_rows(max(w, wo), max(cin, cout) * (4 if upsample else 1), self.band_bytes)
        halo = k // 2
        for o0 in range(0, ho, rows):
            o1 = min(o0 + rows, ho)
            if stride == 2:  # Downsample2D: out row r reads input rows 2r .. 2r+2, the image padded below by 1
                i0, i1 = 2 * o0, min(2 * o1 + 1, h)
                padding = ((0, 1 if i1 == h else 0), (0, 1))
                y = _norm_conv(x.read(i0, i1), *gn, kernel, kbias, k=k, stride=2, padding=padding,
                               upsample=False, act=act, norm=norm is not None)
                out.write(o0, np.asarray(y)[: o1 - o0])
                continue
            s = 2 if upsample else 1
            i0, i1 = o0 // s - halo, -(-o1 // s) + halo  # input rows with halo (clipped by read)
            band = x.read(i0, i1)
            y = np.asarray(_norm_conv(band, *gn, kernel, kbias, k=k, stride=1, padding="SAME_TORCH",
                                      upsample=upsample, act=act, norm=norm is not None))
            first = max(i0, 0) * s  # the output row the band's first row maps to
            out.write(o0, y[o0 - first: o1 - first])
        return out

    def resnet(self, x: Store, p: dict) -> Store:
        h = self.conv(x, p["conv1"], norm=p["norm1"], act=self.act)
        y = self.conv(h, p["conv2"], norm=p["norm2"], act=self.act, stats=False)
        self.free(h)
        skip = self.conv(x, p["conv_shortcut"], stats=False) if "conv_shortcut" in p else x
        out = self.store(*y.shape)
        rows = band_rows(y.shape[1], y.shape[2], self.band_bytes)
        for r0 in range(0, y.shape[0], rows):
            out.write(r0, np.asarray(_add(skip.read(r0, r0 + rows), y.read(r0, r0 + rows))))
        self.free(y, *([skip] if skip is not x else []))
        return out

    def attention(self, x: Store, p: dict) -> Store:
        h, w, c = x.shape
        mean, var = x.group_stats()
        lin = lambda name: (np.asarray(p[name]["kernel"]), np.asarray(p[name]["bias"]))  # noqa: E731
        gn = (mean, var, np.asarray(p["group_norm"]["scale"]), np.asarray(p["group_norm"]["bias"]))
        rows = band_rows(w, 3 * c, self.band_bytes)
        q = np.empty((h * w, c), np.float32)
        k, v = np.empty_like(q), np.empty_like(q)
        for r0 in range(0, h, rows):
            r1 = min(r0 + rows, h)
            qb, kb, vb = _qkv(x.read(r0, r1), *gn, *lin("to_q"), *lin("to_k"), *lin("to_v"))
            q[r0 * w:r1 * w], k[r0 * w:r1 * w], v[r0 * w:r1 * w] = qb, kb, vb
        out = self.store(h, w, c)
        kj, vj = jnp.asarray(k), jnp.asarray(v)
        del k, v
        rows = max(1, min(rows, self.attn_chunk // w or 1))
        for r0 in range(0, h, rows):
            r1 = min(r0 + rows, h)
            y = _attend_band(x.read(r0, r1), jnp.asarray(q[r0 * w:r1 * w]), kj, vj, *lin("to_out_0"),
                             chunk=self.attn_chunk)
            out.write(r0, np.asarray(y))
        return out

    def mid(self, x: Store, p: dict, attention: bool) -> Store:
        y = self.resnet(x, p["resnets_0"])
        if attention:
            y2 = self.attention(y, p["attentions_0"])
            self.free(y)
            y = y2
        y2 = self.resnet(y, p["resnets_1"])
        self.free(y)
        return y2

    def close(self) -> None:
        self.free(*list(self.live))


def _runner(config: VAEConfig, ram_limit: int, band_bytes: int, attn_chunk: int, tmpdir) -> _Runner:
    if band_bytes < 1 or ram_limit < 0 or attn_chunk < 1:
        raise TileError(f"need band_bytes >= 1, ram_limit >= 0, attn_chunk >= 1; got {band_bytes}, "
                        f"{ram_limit}, {attn_chunk}")
    return _Runner(config.norm_num_groups, config.act_fn, ram_limit, band_bytes, attn_chunk, tmpdir)


def _one(run: _Runner, x: np.ndarray, layers: Callable[[_Runner], list]) -> np.ndarray:
    """One image through ``layers(run)``, the network's steps in order (each ``Store -> Store``); a step's
    input is freed as soon as its output exists."""
    try:
        h = run.store(*x.shape, stats=False)
        h.write(0, x)
        for step in layers(run):
            nxt = step(h)
            run.free(h)
            h = nxt
        return np.array(h.read(0, h.shape[0]))
    finally:
        run.close()


#: Defaults: bands of at most 64 MiB, activations above 1 GiB in files, 4,096 queries at a time.
BAND_BYTES, RAM_LIMIT, ATTN_CHUNK = 64 << 20, 1 << 30, 4096


def tiled_decode(config: VAEConfig, params, z, *, band_bytes: int = BAND_BYTES, ram_limit: int = RAM_LIMIT,
                 attn_chunk: int = ATTN_CHUNK, tmpdir=None) -> np.ndarray:
    """``AutoencoderKL.decode`` of NHWC unscaled latents ``z`` (float32 [-1, 1] images, not clamped), layer by
    layer over bands with whole-image GroupNorm statistics (module docstring): equal to the untiled decode up
    to float32 summation order, in memory set by ``band_bytes`` and the attention's keys and values."""
    z = np.asarray(z, np.float32)
    if z.ndim != 4 or z.shape[-1] != config.latent_channels:
        raise TileError(f"need NHWC latents with {config.latent_channels} channels, got shape {z.shape}")
    p = jax.tree_util.tree_map(np.asarray, params)
    d = p["decoder"]
    rev = list(reversed(config.block_out_channels))

    def layers(run: _Runner) -> list:
        steps = []
        if config.use_post_quant_conv:
            steps.append(lambda s: run.conv(s, p["post_quant_conv"], stats=False))
        steps.append(lambda s: run.conv(s, d["conv_in"]))
        steps.append(lambda s: run.mid(s, d["mid_block"], config.mid_block_add_attention))
        for i in range(len(rev)):
            for j in range(config.layers_per_block + 1):
                steps.append(lambda s, i=i, j=j: run.resnet(s, d[f"up_blocks_{i}_resnets_{j}"]))
            if i < len(rev) - 1:
                steps.append(lambda s, i=i: run.conv(s, d[f"up_blocks_{i}_upsamplers_0_conv"], upsample=True))
        steps.append(lambda s: run.conv(s, d["conv_out"], norm=d["conv_norm_out"], act="silu", stats=False))
        return steps

    return np.stack([_one(_runner(config, ram_limit, band_bytes, attn_chunk, tmpdir), zi, layers) for zi in z])


def tiled_encode(config: VAEConfig, params, x, *, band_bytes: int = BAND_BYTES, ram_limit: int = RAM_LIMIT,
                 attn_chunk: int = ATTN_CHUNK, tmpdir=None) -> np.ndarray:
    """The posterior moments ``AutoencoderKL.encode`` computes (NHWC, ``2 * latent_channels``: mean then
    log-variance, before clamping) for NHWC [-1, 1] images ``x``, tiled as :func:`tiled_decode`."""
    x = np.asarray(x, np.float32)
    f = config.downsample_factor
    if x.ndim != 4 or x.shape[-1] != config.in_channels or x.shape[1] % f or x.shape[2] % f:
        raise TileError(f"need NHWC images with {config.in_channels} channels and sides a multiple of {f}, "
                        f"got shape {x.shape}")
    p = jax.tree_util.tree_map(np.asarray, params)
    e = p["encoder"]
    n = len(config.block_out_channels)

    def layers(run: _Runner) -> list:
        steps = [lambda s: run.conv(s, e["conv_in"])]
        for i in range(n):
            for j in range(config.layers_per_block):
                steps.append(lambda s, i=i, j=j: run.resnet(s, e[f"down_blocks_{i}_resnets_{j}"]))
            if i < n - 1:
                steps.append(lambda s, i=i: run.conv(s, e[f"down_blocks_{i}_downsamplers_0_conv"], stride=2))
        steps.append(lambda s: run.mid(s, e["mid_block"], config.mid_block_add_attention))
        steps.append(lambda s: run.conv(s, e["conv_out"], norm=e["conv_norm_out"], act="silu",
                                        stats=False))
        if config.use_quant_conv:
            steps.append(lambda s: run.conv(s, p["quant_conv"], stats=False))
        return steps

    return np.stack([_one(_runner(config, ram_limit, band_bytes, attn_chunk, tmpdir), xi, layers) for xi in x])


def tiled_reconstruct(config: VAEConfig, params, x, *, band_bytes: int = BAND_BYTES, rng=None) -> np.ndarray:
    """Encode NHWC [-1, 1] images ``x`` to the posterior mean (or, with ``rng``, a sample) and decode, both
    tiled: what ``AutoencoderKL`` reconstructs, in bounded memory ([-1, 1], not clamped)."""
    from fvae_core.autoencoder import DiagonalGaussian

    post = DiagonalGaussian.from_moments(jnp.asarray(tiled_encode(config, params, x, band_bytes=band_bytes)))
    z = post.mode() if rng is None else post.sample(rng)
    return tiled_decode(config, params, z, band_bytes=band_bytes)
