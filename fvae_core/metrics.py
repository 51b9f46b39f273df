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
