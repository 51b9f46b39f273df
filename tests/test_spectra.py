"""fvae_core.spectra against analytic oracles: Parseval, bin-centred sinusoids, white noise (flat at
sigma^2), synthesised 1/f^alpha noise (slope -alpha), Gaussian blur (known transfer function), a
period-8 tile (grid peaks) and the bin-count fraction of the high band."""
from __future__ import annotations

import numpy as np
import pytest

from fvae_core import spectra as S


def _fft_freqs(h, w):
    """|f| per fft bin, computed here independently of the module."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[None, :]
    return np.sqrt(fy ** 2 + fx ** 2)


def _power_law_noise(rng, shape, alpha):
    """White noise shaped in Fourier by |f|^(-alpha/2): power ~ |f|^-alpha (periodic field, DC = 0)."""
    f = _fft_freqs(*shape[-2:])
    amp = np.zeros_like(f)
    amp[f > 0] = f[f > 0] ** (-alpha / 2)
    return np.fft.ifft2(np.fft.fft2(rng.standard_normal(shape)) * amp).real


def _gaussian_blur(x, sigma):
    """Periodic Gaussian blur: transfer function exp(-2 pi^2 sigma^2 |f|^2)."""
    f = _fft_freqs(*x.shape[-2:])
    return np.fft.ifft2(np.fft.fft2(x) * np.exp(-2 * np.pi ** 2 * sigma ** 2 * f ** 2)).real


# --- 1. Parseval -------------------------------------------------------------------------------

@pytest.mark.parametrize("hw", [(24, 20), (17, 21)])  # even and odd widths (rfft completion)
def test_parseval(hw):
    x = 0.3 + np.random.default_rng(0).standard_normal((2, 3, *hw))
    P = S.power_spectrum_2d(x, window=False, remove_mean=False)
    assert P.shape == x.shape
    np.testing.assert_allclose(P.sum(axis=(-2, -1)) / (hw[0] * hw[1]), np.mean(x ** 2, axis=(-2, -1)),
                               rtol=1e-10)
    P = S.power_spectrum_2d(x, window=False, remove_mean=True)
    np.testing.assert_allclose(P.sum(axis=(-2, -1)) / (hw[0] * hw[1]), np.var(x, axis=(-2, -1)), rtol=1e-10)


def test_power_spectrum_matches_direct_fft2():
    x = np.random.default_rng(1).standard_normal((3, 16, 13))
    def hann(n):  # periodic Hann
        return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)

    win = np.outer(hann(16), hann(13))
    xc = x - x.mean(axis=(-2, -1), keepdims=True)
    want = np.abs(np.fft.fft2(xc * win)) ** 2 / np.sum(win ** 2)
    np.testing.assert_allclose(S.power_spectrum_2d(x), want, rtol=1e-12, atol=1e-14)


def test_radial_bins():
    centres, index = S.radial_bins(48, 64)
    np.testing.assert_allclose(centres, np.arange(25) / 48)
    f = _fft_freqs(48, 64)
    assert np.all(index[f > 0.5] == -1) and np.all(index[f <= 0.5] >= 0)
    inside = f <= 0.5
    # Every included bin lies within half a bin width (1/48) of its centre.
    assert np.all(np.abs(f[inside] - centres[index[inside]]) <= 0.5 / 48 + 1e-12)
    assert np.all(np.bincount(index[inside]) > 0)
    np.testing.assert_allclose(S.radial_frequencies(48, 64), f)


# --- 2. Sinusoids --------------------------------------------------------------------------------

@pytest.mark.parametrize("ky,kx", [(0, 5), (7, 0), (3, 4)])  # (3, 4): diagonal, |f| = 5/N
def test_sinusoid_single_peak_windowed(ky, kx):
    n = 64
    y, x = np.mgrid[:n, :n]
    img = np.cos(2 * np.pi * (ky * y + kx * x) / n + 0.3)
    k = round(np.hypot(ky, kx))
    freqs, P = S.radial_power_spectrum(img)
    assert freqs[np.argmax(P)] == pytest.approx(k / n)
    P2 = S.power_spectrum_2d(img)
    _, index = S.radial_bins(n, n)
    assert P2[np.abs(index - k) <= 1].sum() / P2.sum() > 0.99


def test_sinusoid_exact_bins_unwindowed():
    h, w, k = 48, 63, 9  # odd width: the -k column comes from the Hermitian completion
    x = np.cos(2 * np.pi * k / w * np.arange(w))[None, :].repeat(h, 0)
    P = S.power_spectrum_2d(x, window=False, remove_mean=False)
    nz = np.argwhere(P > 1e-12 * P.max())
    assert sorted(map(tuple, nz)) == [(0, k), (0, w - k)]
    np.testing.assert_allclose(P[0, k], h * w / 4, rtol=1e-12)  # (A/2)^2 |HW|^2 / (HW), A = 1


# --- 3. White noise --------------------------------------------------------------------------------

@pytest.mark.parametrize("window", [True, False])
def test_white_noise_flat_at_variance(window):
    sigma = 0.5
    x = sigma * np.random.default_rng(2).standard_normal((8, 256, 256))
    freqs, P = S.radial_power_spectrum(x, window=window)
    # Bins 0-1 hold the removed mean (spread by the window); the next few rings hold too few bins
    # (the window leaves ~26% effective samples) for a tight per-bin bound.
    Pm = P.mean(axis=0)[8:]
    assert abs(Pm.mean() / sigma ** 2 - 1) < 0.03
    assert np.all(np.abs(Pm / sigma ** 2 - 1) < 0.35)
    assert abs(S.spectral_slope(freqs, P.mean(axis=0))) < 0.05


# --- 4. 1/f^alpha noise ------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [1, 2, 3])
def test_power_law_slope(alpha):
    rng = np.random.default_rng(3 + alpha)
    x = _power_law_noise(rng, (4, 256, 256), alpha)
    freqs, P = S.radial_power_spectrum(x)
    assert S.spectral_slope(freqs, P.mean(axis=0)) == pytest.approx(-alpha, abs=0.1)
    assert np.all(np.abs(S.spectral_slope(freqs, P) + alpha) < 0.15)  # per image (more scatter)


def test_window_removes_border_leakage():
    """A non-periodic crop of steep 1/f^3 noise: the window keeps the slope; without it the border
    discontinuity (an f^-2 cross) flattens it."""
    rng = np.random.default_rng(7)
    crop = _power_law_noise(rng, (4, 512, 512), 3)[:, 128:384, 64:320]
    freqs, P = S.radial_power_spectrum(crop)
    _, Pn = S.radial_power_spectrum(crop, window=False)
    windowed = S.spectral_slope(freqs, P.mean(0))
    assert windowed == pytest.approx(-3, abs=0.1)
    assert S.spectral_slope(freqs, Pn.mean(0)) > windowed + 0.05  # typically +0.1 .. +0.2


# --- 5. High-band change -----------------------------------------------------------------------------

def test_high_band_change():
    x = _power_law_noise(np.random.default_rng(8), (3, 128, 128), 2)
    blurred = _gaussian_blur(x, 1.0)
    assert np.all(S.high_band_change_db(blurred, x, 0.25) < -3)
    assert np.all(S.high_band_change_db(blurred, x, 1 / 16) < 0)
    assert np.all(S.high_band_change_db(x, x.copy(), 0.25) == 0.0)
    np.testing.assert_allclose(S.high_band_change_db(2 * x, x, 0.25), 20 * np.log10(2), atol=1e-9)
    noisy = x + 0.1 * np.random.default_rng(9).standard_normal(x.shape)
    assert np.all(S.high_band_change_db(noisy, x, 0.25) > 0)


def test_spectral_ratio_db():
    P = np.array([1.0, 2.0, 0.0, 1.0])
    np.testing.assert_allclose(S.spectral_ratio_db(4 * P[:2], P[:2]), 10 * np.log10(4))
    r = S.spectral_ratio_db(np.array([0.0, 0.0]), np.array([0.0, 1.0]))
    assert r[0] == 0.0 and np.isfinite(r[1]) and r[1] < -200


def test_band_energy_checks_shape_and_sums():
    P = np.random.default_rng(10).random((2, 32, 40))
    f = _fft_freqs(32, 40)
    np.testing.assert_allclose(S.band_energy(P, 32, 40, 0.1, 0.3), P[:, (f > 0.1) & (f <= 0.3)].sum(-1))
    np.testing.assert_allclose(S.band_energy(P, 32, 40, -1.0), P.sum(axis=(-2, -1)))
    with pytest.raises(ValueError):
        S.band_energy(P, 40, 32, 0.1)


# --- 6. Grid peaks ----------------------------------------------------------------------------------

def test_grid_peaks():
    rng = np.random.default_rng(11)
    x = _power_law_noise(rng, (16, 128, 128), 2)
    x /= x.std(axis=(-2, -1), keepdims=True)
    tile = rng.standard_normal((8, 8))
    tile = (tile - tile.mean()) / tile.std()
    assert np.all(S.grid_peak_ratio(x + 0.5 * np.tile(tile, (16, 16))) > 6)  # typically 11-20 dB
    neutral = S.grid_peak_ratio(x)
    # One image has only 6 periodogram bins (±2 dB spread): pool over the 16 images in linear power.
    assert abs(10 * np.log10(np.mean(10 ** (neutral / 10)))) < 1.5
    assert np.all(np.abs(neutral) < 8)
    # Lines 2 bins off the grid frequencies (k/8 + 2/128) are not grid peaks; the periodic Hann
    # window puts none of their power on the grid bins, and the median mostly ignores the 6 ring bins
    # they hit (about -0.6 dB; a peak bin off by one would read > +15 dB).
    n = np.arange(128)
    off = sum(0.5 * np.cos(2 * np.pi * (16 * k + 2) / 128 * n) for k in (1, 2, 3))
    off_grid = S.grid_peak_ratio(x + off[:, None] + off[None, :])
    assert abs(10 * np.log10(np.mean(10 ** (off_grid / 10)))) < 3
    with pytest.raises(ValueError, match="multiples"):
        S.grid_peak_ratio(x[:, :60])
    with pytest.raises(ValueError, match="multiples"):
        S.grid_peak_ratio(x[..., :60])


# --- 7. Error high band -----------------------------------------------------------------------------

@pytest.mark.parametrize("fc", [0.25, 1 / 16])
def test_error_high_band_white_noise_is_area_fraction(fc):
    rng = np.random.default_rng(12)
    x = _power_law_noise(rng, (4, 128, 128), 2)
    sigma = 0.1
    energy, share = S.error_high_band(x + sigma * rng.standard_normal(x.shape), x, fc)
    frac = np.mean(_fft_freqs(128, 128) > fc)  # white noise is flat: share = bin-count fraction
    np.testing.assert_allclose(share, frac, rtol=0.05)  # per image; ~1.2% scatter
    # energy is a window-weighted mean square (~26% effective samples): check it over the 4 images.
    assert np.mean(energy) == pytest.approx(sigma ** 2 * frac, rel=0.04)


def test_error_high_band_low_and_high_pass_errors():
    rng = np.random.default_rng(13)
    x = _power_law_noise(rng, (3, 128, 128), 2)
    # A low-pass (blurred) error field has almost no high-band share.
    _, share = S.error_high_band(x + _gaussian_blur(0.1 * rng.standard_normal(x.shape), 2.0), x, 0.25)
    assert np.all(share < 1e-3)
    # Blurring the image moves the error into the high band: its share exceeds the image's own.
    _, share = S.error_high_band(_gaussian_blur(x, 1.0), x, 0.25)
    P = S.power_spectrum_2d(x, remove_mean=False)
    own = S.band_energy(P, 128, 128, 0.25) / P.sum(axis=(-2, -1))
    assert np.all(share > 2 * own)
    energy, share = S.error_high_band(x, x.copy())
    assert np.all(energy == 0) and np.all(share == 0)


def test_error_keeps_mean():
    """A colour shift is error: it sits in the lowest bins (DC and the window's ±1 spread)."""
    x = _power_law_noise(np.random.default_rng(14), (2, 64, 64), 2)
    _, P = S.error_spectrum(x + 0.1, x)
    assert np.all(P[:, 0] > 0) and np.all(P[:, 2:] < 1e-20)
    P2 = S.power_spectrum_2d((x + 0.1) - x, remove_mean=False)
    np.testing.assert_allclose(P2.sum(axis=(-2, -1)) / 64 ** 2, 0.01, rtol=1e-9)  # window-weighted MSE
    _, share = S.error_high_band(x + 0.1, x)
    assert np.all(share < 1e-20)


# --- 8. Shapes and the per-image bundle ---------------------------------------------------------------

def test_leading_dims_broadcast():
    rng = np.random.default_rng(15)
    orig = _power_law_noise(rng, (2, 3, 64, 64), 2)
    rec = _gaussian_blur(orig, 0.7) + 0.01 * rng.standard_normal(orig.shape)
    freqs, P = S.radial_power_spectrum(orig)
    assert P.shape == (2, 3, 33) and freqs.shape == (33,)
    dhf = S.high_band_change_db(rec, orig, 0.25)
    grid = S.grid_peak_ratio(orig)
    slope = S.spectral_slope(freqs, P)
    energy, share = S.error_high_band(rec, orig)
    for a in (dhf, grid, slope, energy, share):
        assert a.shape == (2, 3)
    i, c = 1, 2
    np.testing.assert_allclose(S.radial_power_spectrum(orig[i, c])[1], P[i, c], rtol=1e-12)
    np.testing.assert_allclose(S.high_band_change_db(rec[i, c], orig[i, c], 0.25), dhf[i, c], rtol=1e-12)
    np.testing.assert_allclose(S.grid_peak_ratio(orig[i, c]), grid[i, c], rtol=1e-12)
    np.testing.assert_allclose(S.error_high_band(rec[i, c], orig[i, c])[1], share[i, c], rtol=1e-12)


def test_spectral_metrics_and_radial_spectra():
    rng = np.random.default_rng(16)
    orig = _power_law_noise(rng, (3, 64, 96), 2)
    rec = _gaussian_blur(orig, 0.8) + np.array([0.02, -0.01, 0.0])[:, None, None]  # blur + colour shift
    m = S.spectral_metrics(orig, rec)
    want_keys = {"dhf_db@0.25", "dhf_db@0.0625", "err_hf_energy@0.25", "err_hf_share@0.25",
                 "err_hf_energy@0.0625", "err_hf_share@0.0625", "slope_orig", "slope_rec",
                 "grid_peak_db_orig", "grid_peak_db_rec"}
    assert set(m) == want_keys
    assert all(v.shape == (3,) for v in m.values())
    np.testing.assert_allclose(m["dhf_db@0.25"], S.high_band_change_db(rec, orig, 0.25), rtol=1e-12)
    for fc in (0.25, 1 / 16):
        energy, share = S.error_high_band(rec, orig, fc)
        np.testing.assert_allclose(m[f"err_hf_energy@{fc:g}"], energy, rtol=1e-12)
        np.testing.assert_allclose(m[f"err_hf_share@{fc:g}"], share, rtol=1e-12)
    np.testing.assert_allclose(m["grid_peak_db_rec"], S.grid_peak_ratio(rec), rtol=1e-12)
    assert np.all(m["slope_rec"] < m["slope_orig"])  # blur steepens the spectrum
    freqs, P_orig, P_rec, P_err = S.radial_spectra(orig, rec)
    assert freqs.shape == (33,) and P_orig.shape == P_rec.shape == P_err.shape == (3, 33)
    np.testing.assert_allclose(m["slope_orig"], S.spectral_slope(freqs, P_orig), rtol=1e-12)
    np.testing.assert_allclose(P_err, S.error_spectrum(rec, orig)[1], rtol=1e-12)
    with pytest.raises(ValueError):
        S.spectral_metrics(orig, rec[:, :, :88])
