"""fvae_core.latents.compare on cases with known answers."""
import numpy as np
import pytest
from scipy import ndimage

from fvae_core.latents.compare import channel_moments, decode_spectrum_gap


def test_channel_moments_analytic():
    rng = np.random.default_rng(0)
    real = rng.normal([1.0, -2.0, 0.0], [1.0, 2.0, 4.0], size=(20000, 3))
    same = channel_moments(real, real)
    assert same["std_ratio"] == pytest.approx([1, 1, 1]) and same["mean_gap_in_real_std"] == pytest.approx([0, 0, 0])
    m = channel_moments((real - real.mean(0)) * 1.5 + real.mean(0) + real.std(0) * 0.2, real)
    assert m["std_ratio"] == pytest.approx([1.5] * 3)
    assert m["mean_gap_in_real_std"] == pytest.approx([0.2] * 3)
    with pytest.raises(ValueError, match="same channels"):
        channel_moments(real, real[:, :2])


def test_decode_spectrum_gap_signs():
    rng = np.random.default_rng(1)
    imgs = np.clip(ndimage.gaussian_filter(rng.random((8, 64, 64, 3)), (0, 2, 2, 0)) * 2 - 0.5, 0, 1)
    assert decode_spectrum_gap(imgs[:1], imgs[:1])["mean_db"] == pytest.approx([0, 0, 0], abs=1e-9)
    noisy = np.clip(imgs + rng.normal(0, 0.05, imgs.shape), 0, 1)
    blurred = ndimage.gaussian_filter(imgs, (0, 1.5, 1.5, 0))
    n, b = decode_spectrum_gap(noisy, imgs), decode_spectrum_gap(blurred, imgs)
    assert n["mean_db"][-1] > 3 and b["mean_db"][-1] < -3 and n["n"] == 8
    assert n["mean_db"][-1] > n["mean_db"][0]  # the noise is white: it shows most where the images are weak
