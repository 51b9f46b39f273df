"""Image-quality metrics. Settings follow ``skimage.metrics`` so results are comparable with it.

The evaluation issue extends this module (SSIM, LPIPS, GMSD, colour errors).
"""
from __future__ import annotations

import numpy as np


def psnr(reference: np.ndarray, test: np.ndarray, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB, computed in float64 over all pixels and channels.

    ``data_range`` defaults to 255 for uint8 inputs and 1.0 for floats, matching
    ``skimage.metrics.peak_signal_noise_ratio`` for those dtypes. Identical images give ``inf``.
    """
    reference, test = np.asarray(reference), np.asarray(test)
    if reference.shape != test.shape:
        raise ValueError(f"psnr: shape mismatch {reference.shape} vs {test.shape}")
    if data_range is None:
        data_range = 255.0 if reference.dtype == np.uint8 else 1.0
    mse = np.mean(np.square(reference.astype(np.float64) - test.astype(np.float64)))
    return float("inf") if mse == 0 else float(10.0 * np.log10(data_range**2 / mse))


def delta_e_ok(reference, test) -> float:
    """Mean ΔE_OK: the Euclidean distance in Oklab (L in [0, 1]) per pixel, averaged, for float [0, 1]
    sRGB (or uint8) images; CSS Color 4's deltaEOK and coloraide's ``delta_e(method="ok")``. Values
    around 0.02 are a just-noticeable difference; reports often multiply by 100."""
    import jax.numpy as jnp

    from fvae_core.color import oklab_from_srgb

    reference, test = np.asarray(reference), np.asarray(test)
    if reference.shape != test.shape or reference.shape[-1] != 3:
        raise ValueError(f"delta_e_ok: need two equal-shape ...x3 images, got {reference.shape} vs {test.shape}")
    to01 = (lambda a: a.astype(np.float32) / 255.0) if reference.dtype == np.uint8 else (
        lambda a: a.astype(np.float32))
    a = np.asarray(oklab_from_srgb(jnp.asarray(to01(reference))), np.float64)
    b = np.asarray(oklab_from_srgb(jnp.asarray(to01(test))), np.float64)
    return float(np.mean(np.linalg.norm(a - b, axis=-1)))
