"""Metrics against skimage and coloraide."""
from __future__ import annotations

import coloraide
import numpy as np
import skimage.metrics

from fvae_core.metrics import delta_e_ok, psnr


def test_psnr_matches_skimage():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-9, 10, a.shape), 0, 255).astype(np.uint8)
    assert abs(psnr(a, b) - skimage.metrics.peak_signal_noise_ratio(a, b)) < 1e-9
    af, bf = a / 255.0, b / 255.0
    assert abs(psnr(af, bf) - skimage.metrics.peak_signal_noise_ratio(af, bf, data_range=1.0)) < 1e-9
    assert psnr(a, a) == float("inf")


def test_delta_e_ok_matches_coloraide():
    rng = np.random.default_rng(1)
    a, b = rng.random((40, 3)), rng.random((40, 3))
    want = np.mean([coloraide.Color("srgb", list(x)).delta_e(coloraide.Color("srgb", list(y)), method="ok")
                    for x, y in zip(a, b)])
    assert abs(delta_e_ok(a.reshape(5, 8, 3), b.reshape(5, 8, 3)) - want) < 1e-5
    u8 = (a * 255).round().astype(np.uint8)
    assert abs(delta_e_ok(u8, u8.copy())) < 1e-7
