"""Image-to-image reconstruction (the card's ``pipeline_tag``): encode, then decode, any image size.

Images of any size are padded to a multiple of the VAE's downsampling factor with symmetric (mirror)
padding, reconstructed, and cropped back, so the output has exactly the input's size. Mirror padding
keeps the padded border statistically like the image, so edge pixels are reconstructed as well as
interior ones (zero padding would put an artificial edge there).
"""
from __future__ import annotations

import dataclasses
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fvae_core.autoencoder import AutoencoderKL, VAEConfig
from fvae_core.conventions import from_model_range, to_model_range, uint8_from_unit, unit_from_uint8
from fvae_core.images import ImageError, load_rgb, save_png


def pad_to_multiple(x: np.ndarray, multiple: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Mirror-pad an HWC image at the bottom/right to a multiple of ``multiple``; returns (padded, (h, w))."""
    h, w = x.shape[:2]
    ph, pw = (-h) % multiple, (-w) % multiple
    return np.pad(x, ((0, ph), (0, pw), (0, 0)), mode="symmetric"), (h, w)


@lru_cache(maxsize=8)
def _reconstruct_fn(config: VAEConfig, mode: str, dtype_name: str):
    model = AutoencoderKL(config, dtype=jnp.dtype(dtype_name))

    @jax.jit
    def run(params, x, rng):
        post = model.apply({"params": params}, x, method=model.encode)
        z = post.mode() if mode == "mean" else post.sample(rng)
        return model.apply({"params": params}, z, method=model.decode)

    return run


#: Images whose widest activation (pixels x ``block_out_channels[0]`` x 4 bytes) is above this are
#: reconstructed tiled when no ``tile`` is given: 1 GiB is a 1448² image through sd-vae-ft-mse (128 channels),
#: whose untiled decode holds several such activations at once.
AUTO_TILE_BYTES = 1 << 30
#: The band height (image rows) of automatic tiling: 64 rows of a 4096-wide sd-vae-ft-mse image are 128 MiB.
AUTO_TILE_ROWS = 64


def tile_band_bytes(config: VAEConfig, height: int, width: int, tile: int | None) -> int | None:
    """The band size :mod:`fvae_core.tiling` gets for an image (``height`` x ``width`` pixels), or None for an
    untiled reconstruction. ``tile``: None decides by size (:data:`AUTO_TILE_BYTES`); 0 never tiles; ``N > 0``
    tiles in bands of ``N`` image rows (the widest activation's rows: ``N x width x block_out_channels[0]``
    floats)."""
    if tile is not None and tile < 0:
        raise ValueError(f"tile must be >= 0 (0: never tile), got {tile}")
    row = width * config.block_out_channels[0] * 4
    if tile is None:
        return AUTO_TILE_ROWS * row if height * row > AUTO_TILE_BYTES else None
    return tile * row if tile else None


def reconstruct_array(config: VAEConfig, params, rgb_u8: np.ndarray, *, mode: str = "mean",
                      rng: jax.Array | None = None, dtype: str = "float32", tile: int | None = 0,
                      log=None) -> np.ndarray:
    """uint8 HxWx3 sRGB -> reconstructed uint8 HxWx3 (same size). ``tile`` as :func:`tile_band_bytes`
    (default 0: untiled); tiled, the result equals the untiled one up to float32 summation order
    (:mod:`fvae_core.tiling`), and ``log`` is told that it was tiled."""
    if mode not in ("mean", "sample"):
        raise ValueError(f"mode must be 'mean' or 'sample', got {mode!r}")
    if mode == "sample" and rng is None:
        raise ValueError("mode='sample' needs an rng")
    padded, (h, w) = pad_to_multiple(rgb_u8, config.downsample_factor)
    x = to_model_range(unit_from_uint8(padded))[None]
    rng = rng if rng is not None else jax.random.PRNGKey(0)
    auto_float32_only = tile is None and jnp.dtype(dtype) != jnp.float32  # tiling computes in float32
    band = None if auto_float32_only else tile_band_bytes(config, *padded.shape[:2], tile)
    if band is None:
        y = _reconstruct_fn(config, mode, jnp.dtype(dtype).name)(params, x, rng)
    else:
        from fvae_core.tiling import tiled_reconstruct

        if jnp.dtype(dtype) != jnp.float32:
            raise ValueError(f"tiled reconstruction computes in float32, not {dtype}")
        if log is not None:
            log(f"{padded.shape[1]}x{padded.shape[0]} reconstructed in bands of {band >> 20} MiB "
                f"(exact: whole-image GroupNorm statistics; --tile 0 for one piece)")
        y = tiled_reconstruct(config, params, x, band_bytes=band, rng=rng if mode == "sample" else None)
    y = np.asarray(from_model_range(y[0, :h, :w]))
    return uint8_from_unit(y)


@lru_cache(maxsize=8)
def _decode_fn(config: VAEConfig, dtype_name: str):
    model = AutoencoderKL(config, dtype=jnp.dtype(dtype_name))
    return jax.jit(lambda params, z: model.apply({"params": params}, z, method=model.decode))


def decode_latents(config: VAEConfig, params, z, *, batch: int = 16, dtype: str = "float32",
                   uint8: bool = True) -> np.ndarray:
    """Unscaled NHWC latents (what ``encode`` gives and ``decode`` takes; e.g. a latent model's samples)
    -> uint8 NHWC sRGB images (``uint8=False``: float32 in [0, 1], unquantised), ``batch`` latents at a time."""
    z = np.asarray(z, np.float32)
    if z.ndim != 4 or z.shape[-1] != config.latent_channels:
        raise ValueError(f"need NHWC latents with {config.latent_channels} channels, got shape {z.shape}")
    run = _decode_fn(config, jnp.dtype(dtype).name)
    out = [np.asarray(from_model_range(run(params, jnp.asarray(z[i:i + batch])))) for i in range(0, len(z), batch)]
    y = np.concatenate(out)
    return uint8_from_unit(y) if uint8 else np.clip(y, 0.0, 1.0).astype(np.float32)


@lru_cache(maxsize=8)
def _encode_mean_fn(config: VAEConfig, dtype_name: str):
    model = AutoencoderKL(config, dtype=jnp.dtype(dtype_name))
    return jax.jit(lambda params, x: model.apply({"params": params}, x, method=model.encode).mode())


def encode_latents(config: VAEConfig, params, x01, *, batch: int = 16, dtype: str = "float32") -> np.ndarray:
    """Float NHWC images in [0, 1] (sides a multiple of the downsampling factor) -> the posterior means,
    unscaled NHWC float32 latents, ``batch`` images at a time."""
    x = np.asarray(x01, np.float32)
    f = config.downsample_factor
    if x.ndim != 4 or x.shape[1] % f or x.shape[2] % f:
        raise ValueError(f"need NHWC images with sides a multiple of {f}, got shape {x.shape}")
    run = _encode_mean_fn(config, jnp.dtype(dtype).name)
    return np.concatenate([np.asarray(run(params, jnp.asarray(to_model_range(x[i:i + batch]))))
                           for i in range(0, len(x), batch)])


@dataclasses.dataclass
class ReconstructReport:
    written: list[Path]
    failed: list[tuple[Path, str]]


def _unique_name(stem: str, used: set[str]) -> str:
    name, i = stem, 1
    while name in used:
        name, i = f"{stem}-{i}", i + 1
    used.add(name)
    return name


def reconstruct_files(config: VAEConfig, params, paths: Sequence[str | Path], out_dir: str | Path, *,
                      mode: str = "mean", seed: int = 0, dtype: str = "float32", progress: bool = True,
                      tile: int | None = None, log=print) -> ReconstructReport:
    """Reconstruct each image file into ``out_dir/<stem>.png``. A file that cannot be read is reported
    (one line) and skipped; the others still get done. ``tile``: see :func:`tile_band_bytes` (None: large
    images are tiled, and ``log`` says so)."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(20, "output path exists and is not a folder", str(out_dir))
    inputs = {Path(p).resolve() for p in paths}
    report = ReconstructReport([], [])
    used: set[str] = set()
    base = jax.random.PRNGKey(seed)
    params = jax.device_put(params)
    bar = tqdm(list(enumerate(paths)), disable=not progress or len(paths) < 2, unit="img", desc="reconstruct")
    for i, p in bar:
        p = Path(p)
        try:
            rgb = load_rgb(p)
        except ImageError as e:
            report.failed.append((p, str(e)))
            log(f"skipped: {e}")
            continue
        y = reconstruct_array(config, params, rgb, mode=mode, rng=jax.random.fold_in(base, i), dtype=dtype,
                              tile=tile, log=lambda m, p=p: log(f"{p}: {m}"))
        dest = out_dir / (_unique_name(p.stem, used) + ".png")
        if dest.resolve() in inputs:
            msg = f"{p}: refusing to overwrite an input image with its reconstruction; choose another --out"
            report.failed.append((p, msg))
            log(f"skipped: {msg}")
            continue
        try:
            save_png(dest, y)
        except OSError as e:
            report.failed.append((p, f"cannot write {dest}: {e.strerror or e}"))
            log(f"skipped: {p}: cannot write {dest}: {e.strerror or e}")
            continue
        report.written.append(dest)
    return report
