"""Small helpers of the teaching notebooks (``01_data_prep``, ``02_recipe``) that are not recipe logic.

The recipe itself lives in its own homes (:mod:`fvae_core.color`, :mod:`fvae_core.losses`,
:mod:`fvae_core.data`, ...). What is here only *describes* data or builds demonstration inputs, so that
the notebooks stay thin (``/work/shared/STYLE.md``: no helper longer than about ten lines in a notebook):

* :func:`colour_stats` -- how "flat" an image is: distinct colours, flat-region and edge fractions from
  :func:`fvae_core.edges.edge_masks` on Oklab L, mean Oklab chroma and lightness.
* :func:`write_bad_inputs` -- a folder of good images plus the broken files a real dataset holds
  (truncated, empty, not an image, too small, no image suffix), with the skip reason
  :func:`fvae_core.data.prepare.prepare` must give for each.
* :func:`ema_half_life_images` -- how many *images* an EMA with a given decay and batch size averages over.
"""
from __future__ import annotations

import io
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np

__all__ = ["BAD_INPUT_REASONS", "IGNORED_NAME", "colour_stats", "ema_half_life_images", "write_bad_inputs"]

#: File written by :func:`write_bad_inputs` -> a regex its skip reason in a prepare report must match.
BAD_INPUT_REASONS = {
    "truncated.png": r"truncated",
    "empty.png": r"empty file",
    "not_an_image.png": r"not an image",
    "too_small.png": r"too small",
}
#: The file :func:`write_bad_inputs` writes without an image suffix (listed as ignored, never read).
IGNORED_NAME = "notes.txt"


def colour_stats(rgb_u8, sigma: float = 2.0) -> dict:
    """Colour statistics of one uint8 HxWx3 sRGB image (a dict of plain Python numbers).

    * ``distinct_colours``: the number of different RGB triplets;
    * ``flat_fraction`` / ``edge_fraction``: the share of pixels in the ``flat`` mask / on a Canny edge of
      :func:`fvae_core.edges.edge_masks` applied to Oklab L (``sigma`` is Canny's);
    * ``mean_chroma``: the mean of ``C = sqrt(a² + b²)`` in Oklab; ``mean_lightness``: the mean of L.
    Oklab is :func:`fvae_core.metrics.oklab_np` (float64, the same map as the losses use).
    """
    from fvae_core.edges import edge_masks
    from fvae_core.metrics import oklab_np

    rgb = np.asarray(rgb_u8)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"colour_stats wants uint8 HxWx3, got {rgb.dtype} {rgb.shape}")
    lab = oklab_np(rgb)
    masks = edge_masks(lab[..., 0], sigma=sigma)
    packed = rgb.reshape(-1, 3).astype(np.uint32) @ np.array([1 << 16, 1 << 8, 1], np.uint32)
    return {"height": int(rgb.shape[0]), "width": int(rgb.shape[1]),
            "distinct_colours": int(np.unique(packed).size),
            "flat_fraction": float(masks.flat.mean()), "edge_fraction": float(masks.edges.mean()),
            "mean_chroma": float(np.hypot(lab[..., 1], lab[..., 2]).mean()),
            "mean_lightness": float(lab[..., 0].mean())}


def write_bad_inputs(folder, good: Mapping[str, np.ndarray], small_side: int = 64) -> dict[str, str]:
    """Write ``good`` (name -> uint8 HxWx3) as ``name.png`` into ``folder``, plus broken files.

    The broken files are those of :data:`BAD_INPUT_REASONS`: the first good PNG cut in half
    (``truncated.png``), a zero-byte ``empty.png``, a text file named ``not_an_image.png``, and the
    top-left ``small_side`` square of the first good image (``too_small.png``: below a ``min_side``
    larger than ``small_side``). Also ``notes.txt``, which has no image suffix. Returns
    :data:`BAD_INPUT_REASONS` (file name -> regex of the expected skip reason).
    """
    from PIL import Image

    if not good:
        raise ValueError("write_bad_inputs needs at least one good image")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, rgb in good.items():
        Image.fromarray(np.asarray(rgb, np.uint8)).save(folder / f"{name}.png")
    first = np.asarray(next(iter(good.values())), np.uint8)
    if min(first.shape[:2]) <= small_side:
        raise ValueError(f"the first good image ({first.shape[1]}x{first.shape[0]}) must be larger than "
                         f"small_side={small_side}")
    buf = io.BytesIO()
    Image.fromarray(first).save(buf, format="PNG")
    png = buf.getvalue()
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "not_an_image.png").write_text("a text file with a .png suffix\n")
    Image.fromarray(first[:small_side, :small_side]).save(folder / "too_small.png")
    (folder / IGNORED_NAME).write_text("not an image suffix: listed as ignored, never read\n")
    return dict(BAD_INPUT_REASONS)


def ema_half_life_images(decay: float, batch_size: int) -> float:
    """Images seen while an EMA's weight on the current params halves: ``B ln(1/2) / ln(decay)``.

    After ``n`` updates the weight of a past value is ``decay**n``; it halves after
    ``n = ln(1/2) / ln(decay)`` steps, i.e. ``B n`` images at batch size ``B``.
    """
    if not 0.0 < decay < 1.0:
        raise ValueError(f"decay must be in (0, 1), got {decay}")
    return batch_size * math.log(0.5) / math.log(decay)
