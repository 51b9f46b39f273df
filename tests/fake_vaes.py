"""Fake "VAEs" with a known effect, for the evaluation and explorer tests (no model, no compile)."""
from __future__ import annotations

from scipy.ndimage import gaussian_filter


class Identity:
    """Returns its input: every error is exactly 0 and every spectral ratio 0 dB."""

    name = "identity"

    def __call__(self, x):
        return x.copy()


class Blur:
    """A Gaussian blur (per image, per channel): smoother, less high-band power, never overshoots."""

    name = "blur"

    def __init__(self, sigma: float = 1.2):
        self.sigma = sigma

    def __call__(self, x):
        return gaussian_filter(x, sigma=(0, self.sigma, self.sigma, 0), mode="reflect")
