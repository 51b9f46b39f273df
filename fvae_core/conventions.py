"""The image conventions of fvae, stated once.

* **Layout.** Every image array is NHWC (batch, height, width, channel), channels in RGB order.
* **Data pipeline range.** Images leave the data pipeline (and enter metrics, colour conversions and
  plots) as float32 in **[0, 1]**, sRGB-encoded. On disk they are 8-bit sRGB.
* **Model range.** The autoencoder's boundary (``encode`` input, ``decode`` output) and LPIPS use
  **[-1, 1]**, exactly as diffusers' ``AutoencoderKL`` and LDM do. Decoder outputs are not clamped
  by the model; callers that need a displayable image clip after :func:`from_model_range`.

Convert only through the two functions below, so that a wrong range is a bug in exactly one place.
"""
from __future__ import annotations

import numpy as np

LAYOUT = "NHWC"
DATA_RANGE = (0.0, 1.0)
MODEL_RANGE = (-1.0, 1.0)


def to_model_range(x01):
    """[0, 1] data-pipeline image -> [-1, 1] model-boundary image (works for numpy and jax arrays)."""
    return x01 * 2.0 - 1.0


def from_model_range(xm):
    """[-1, 1] model-boundary image -> [0, 1] image (not clipped)."""
    return (xm + 1.0) * 0.5


def uint8_from_unit(x01) -> np.ndarray:
    """[0, 1] float image -> uint8 with clipping and round-half-to-even (numpy)."""
    return np.clip(np.rint(np.asarray(x01, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


def unit_from_uint8(x: np.ndarray) -> np.ndarray:
    """uint8 image -> float32 [0, 1]."""
    return np.asarray(x, dtype=np.float32) / 255.0
