"""Metrics against independent oracles: skimage (PSNR, SSIM, CIEDE2000, CIELAB), coloraide (Oklab,
ΔE_OK, ΔE00), Sharma et al. 2005's published CIEDE2000 pairs, and analytic cases (GMSD, colour errors)."""
from __future__ import annotations

import coloraide
import numpy as np
import pytest
import scipy.ndimage
import skimage.color
import skimage.metrics

from fvae_core.metrics import (COLOUR_ERROR_KEYS, ciede2000, cielab_from_srgb, colour_errors, delta_e_ok,
                               gmsd, oklab_np, psnr, ssim, ssim_map)


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


# ------------------------------------------------------------------------------------ PSNR and SSIM

SKIMAGE_SSIM = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)


def _structured(h, w, seed=0):
    """A smooth colour gradient with a disc, a bar and mild texture, in [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([0.2 + 0.6 * xx, 0.3 + 0.4 * yy, 0.5 + 0.3 * np.sin(6 * xx + 3 * yy)], axis=-1)
    img[(yy - 0.5) ** 2 + (xx - 0.4) ** 2 < 0.06] = (0.9, 0.2, 0.1)
    img[:, int(0.7 * w):int(0.8 * w)] = (0.1, 0.1, 0.8)
    return np.clip(img + 0.02 * rng.standard_normal(img.shape), 0.0, 1.0)


def _image_pairs():
    rng = np.random.default_rng(3)
    pairs = []
    for shape in [(37, 53, 3), (64, 48, 3), (11, 11, 3), (29, 31)]:
        a = rng.random(shape)
        pairs.append((f"random{shape}", a, np.clip(a + 0.1 * rng.standard_normal(shape), 0, 1)))
    s = _structured(45, 61)
    pairs.append(("structured-noise", s, np.clip(s + 0.05 * rng.standard_normal(s.shape), 0, 1)))
    pairs.append(("structured-blur", s, scipy.ndimage.gaussian_filter(s, (1.2, 1.2, 0))))
    pairs.append(("structured-identical", s, s.copy()))
    return pairs


@pytest.mark.parametrize("name,a,b", _image_pairs(), ids=[p[0] for p in _image_pairs()])
def test_psnr_and_ssim_match_skimage(name, a, b):
    channel_axis = -1 if a.ndim == 3 else None
    if name.endswith("identical"):
        assert psnr(a, b) == float("inf") and abs(ssim(a, b) - 1.0) < 1e-12
    else:
        want = skimage.metrics.peak_signal_noise_ratio(a, b, data_range=1.0)
        assert abs(psnr(a, b) - want) < 1e-5
    want = skimage.metrics.structural_similarity(a, b, data_range=1, channel_axis=channel_axis,
                                                 **SKIMAGE_SSIM)
    assert abs(ssim(a, b) - want) < 1e-5
    ua, ub = (np.round(x * 255).astype(np.uint8) for x in (a, b))
    want = skimage.metrics.structural_similarity(ua, ub, channel_axis=channel_axis, **SKIMAGE_SSIM)
    assert abs(ssim(ua, ub) - want) < 1e-5  # uint8 -> data_range 255, as skimage
    assert abs(ssim(ua / 255.0, ub / 255.0) - want) < 1e-5  # same value from [0, 1] floats
    if not name.endswith("identical"):
        assert abs(psnr(ua, ub) - skimage.metrics.peak_signal_noise_ratio(ua, ub)) < 1e-5
    assert ssim_map(a, b).shape == a.shape


@pytest.mark.parametrize("side", [7, 10])
def test_ssim_too_small_raises_like_skimage(side):
    # With sigma 1.5 / truncate 3.5 the window is 11 px, so skimage needs >= 11x11 (its message
    # says "at least 7x7", the size for its uniform window); both raise ValueError below 11.
    a = np.random.default_rng(0).random((side, side, 3))
    with pytest.raises(ValueError):
        skimage.metrics.structural_similarity(a, a, data_range=1, channel_axis=-1, **SKIMAGE_SSIM)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(a, a)


def test_ssim_orders_distortions():
    s = _structured(40, 40)
    noise = np.random.default_rng(0).standard_normal(s.shape)
    assert ssim(s, s + 0.01 * noise) > ssim(s, s + 0.05 * noise) > ssim(s, s + 0.2 * noise)


# --------------------------------------------------------------------------------------------- GMSD


def test_gmsd_identical_is_exactly_zero():
    s = _structured(37, 53)
    assert gmsd(s, s.copy()) == 0.0
    assert gmsd(s, s.copy(), downsample=False) == 0.0
    u8 = np.round(s * 255).astype(np.uint8)
    assert gmsd(u8, u8.copy()) == 0.0


def test_gmsd_grows_with_noise_and_sees_contrast_loss():
    s = _structured(64, 64)
    noise = np.random.default_rng(1).standard_normal(s.shape)
    scores = [gmsd(s, s + sigma * noise) for sigma in (0.005, 0.01, 0.02, 0.05, 0.1)]
    assert all(a < b for a, b in zip(scores, scores[1:])), scores
    assert gmsd(s, 0.5 * s) > 0.01  # halving the contrast halves every gradient
    # Blur is a structural distortion too, and the downsampled variant is a different number.
    blurred = scipy.ndimage.gaussian_filter(s, (1.5, 1.5, 0))
    assert gmsd(s, blurred) > 0 and gmsd(s, blurred, downsample=False) != gmsd(s, blurred)


def test_gmsd_matches_a_direct_transcription_on_an_even_image():
    # The paper's steps written out by hand on the 0-255 scale: 2x2 block mean, Prewitt/3 by slicing
    # a zero-padded copy, T = 170 (GMS is invariant to rescaling the data with T).
    rng = np.random.default_rng(2)
    a = rng.random((20, 26, 3))
    b = np.clip(a + 0.1 * rng.standard_normal(a.shape), 0, 1)

    def paper(img):
        y = 255.0 * (0.299 * img[..., 0] + 0.587 * img[..., 1] + 0.114 * img[..., 2])
        y = 0.25 * (y[0::2, 0::2] + y[1::2, 0::2] + y[0::2, 1::2] + y[1::2, 1::2])
        p = np.pad(y, 1)
        gx = (p[:-2, :-2] + p[1:-1, :-2] + p[2:, :-2] - p[:-2, 2:] - p[1:-1, 2:] - p[2:, 2:]) / 3
        gy = (p[:-2, :-2] + p[:-2, 1:-1] + p[:-2, 2:] - p[2:, :-2] - p[2:, 1:-1] - p[2:, 2:]) / 3
        return np.hypot(gx, gy)

    m1, m2 = paper(a), paper(b)
    want = np.std((2 * m1 * m2 + 170) / (m1**2 + m2**2 + 170))
    assert abs(gmsd(a, b) - want) < 1e-12


# ---------------------------------------------------------------------------------------- CIEDE2000

#: Sharma, Wu & Dalal (2005), Table 1: the 34 test pairs, "L1 a1 b1 L2 a2 b2 ΔE00". Transcribed from
#: the paper's supplementary data (as redistributed in scikit-image's
#: skimage/color/tests/ciede2000_test_data.txt); every row also checked against
#: skimage.color.deltaE_ciede2000.
SHARMA_2005 = np.array([
    [50.0000, 2.6772, -79.7751, 50.0000, 0.0000, -82.7485, 2.0425],
    [50.0000, 3.1571, -77.2803, 50.0000, 0.0000, -82.7485, 2.8615],
    [50.0000, 2.8361, -74.0200, 50.0000, 0.0000, -82.7485, 3.4412],
    [50.0000, -1.3802, -84.2814, 50.0000, 0.0000, -82.7485, 1.0000],
    [50.0000, -1.1848, -84.8006, 50.0000, 0.0000, -82.7485, 1.0000],
    [50.0000, -0.9009, -85.5211, 50.0000, 0.0000, -82.7485, 1.0000],
    [50.0000, 0.0000, 0.0000, 50.0000, -1.0000, 2.0000, 2.3669],
    [50.0000, -1.0000, 2.0000, 50.0000, 0.0000, 0.0000, 2.3669],
    [50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0009, 7.1792],
    [50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0010, 7.1792],
    [50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0011, 7.2195],
    [50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0012, 7.2195],
    [50.0000, -0.0010, 2.4900, 50.0000, 0.0009, -2.4900, 4.8045],
    [50.0000, -0.0010, 2.4900, 50.0000, 0.0010, -2.4900, 4.8045],
    [50.0000, -0.0010, 2.4900, 50.0000, 0.0011, -2.4900, 4.7461],
    [50.0000, 2.5000, 0.0000, 50.0000, 0.0000, -2.5000, 4.3065],
    [50.0000, 2.5000, 0.0000, 73.0000, 25.0000, -18.0000, 27.1492],
    [50.0000, 2.5000, 0.0000, 61.0000, -5.0000, 29.0000, 22.8977],
    [50.0000, 2.5000, 0.0000, 56.0000, -27.0000, -3.0000, 31.9030],
    [50.0000, 2.5000, 0.0000, 58.0000, 24.0000, 15.0000, 19.4535],
    [50.0000, 2.5000, 0.0000, 50.0000, 3.1736, 0.5854, 1.0000],
    [50.0000, 2.5000, 0.0000, 50.0000, 3.2972, 0.0000, 1.0000],
    [50.0000, 2.5000, 0.0000, 50.0000, 1.8634, 0.5757, 1.0000],
    [50.0000, 2.5000, 0.0000, 50.0000, 3.2592, 0.3350, 1.0000],
    [60.2574, -34.0099, 36.2677, 60.4626, -34.1751, 39.4387, 1.2644],
    [63.0109, -31.0961, -5.8663, 62.8187, -29.7946, -4.0864, 1.2630],
    [61.2901, 3.7196, -5.3901, 61.4292, 2.2480, -4.9620, 1.8731],
    [35.0831, -44.1164, 3.7933, 35.0232, -40.0716, 1.5901, 1.8645],
    [22.7233, 20.0904, -46.6940, 23.0331, 14.9730, -42.5619, 2.0373],
    [36.4612, 47.8580, 18.3852, 36.2715, 50.5065, 21.2231, 1.4146],
    [90.8027, -2.0831, 1.4410, 91.1528, -1.6435, 0.0447, 1.4441],
    [90.9257, -0.5406, -0.9208, 88.6381, -0.8985, -0.7239, 1.5381],
    [6.7747, -0.2908, -2.4247, 5.8714, -0.0985, -2.2286, 0.6377],
    [2.0776, 0.0795, -1.1350, 0.9033, -0.0636, -0.5514, 0.9082],
])


def test_ciede2000_reproduces_sharma_2005_table1():
    assert SHARMA_2005.shape == (34, 7)
    lab1, lab2, want = SHARMA_2005[:, :3], SHARMA_2005[:, 3:6], SHARMA_2005[:, 6]
    # The table's ΔE00 is rounded to 4 decimals, so agreement is to half a unit in the last place.
    np.testing.assert_allclose(ciede2000(lab1, lab2), want, rtol=0, atol=1e-4)
    np.testing.assert_allclose(ciede2000(lab2, lab1), want, rtol=0, atol=1e-4)  # symmetric
    # The transcription itself, against an independent implementation.
    np.testing.assert_allclose(skimage.color.deltaE_ciede2000(lab1, lab2), want, rtol=0, atol=1e-4)


def test_ciede2000_matches_skimage_on_random_lab():
    rng = np.random.default_rng(4)
    n = 2000
    lab1 = np.c_[rng.uniform(0, 100, n), rng.uniform(-128, 128, (n, 2))]
    lab2 = np.concatenate([np.c_[rng.uniform(0, 100, n // 2), rng.uniform(-128, 128, (n // 2, 2))],
                           lab1[n // 2:] + rng.normal(0, 2, (n // 2, 3))])  # far and near pairs
    lab1[:5, 1:] = 0  # neutral colours: the hue conventions of Sharma et al.
    np.testing.assert_allclose(ciede2000(lab1, lab2), skimage.color.deltaE_ciede2000(lab1, lab2),
                               rtol=0, atol=1e-8)
    img = lab1[:60].reshape(6, 10, 3)
    assert ciede2000(img, img).shape == (6, 10) and np.all(ciede2000(img, img) == 0)


def test_ciede2000_matches_coloraide_on_its_own_lab():
    rng = np.random.default_rng(5)
    for x, y in zip(rng.random((10, 3)), rng.random((10, 3))):
        c1, c2 = coloraide.Color("srgb", list(x)), coloraide.Color("srgb", list(y))
        lab1, lab2 = (np.array(c.convert("lab-d65").coords()) for c in (c1, c2))
        assert abs(ciede2000(lab1, lab2) - c1.delta_e(c2, method="2000")) < 1e-9


# ------------------------------------------------------------------------------------ colour errors


def test_oklab_f64_matches_coloraide():
    rng = np.random.default_rng(6)
    rgb = np.r_[rng.random((20, 3)), np.eye(3), np.zeros((1, 3)), np.ones((1, 3))]
    want = np.array([coloraide.Color("srgb", list(c)).convert("oklab").coords() for c in rgb])
    np.testing.assert_allclose(oklab_np(rgb), want, rtol=0, atol=1e-7)
    np.testing.assert_allclose(oklab_np(np.array([1.0, 1.0, 1.0])), [1, 0, 0], atol=1e-7)


def test_colour_errors_identical_is_all_zero():
    s = _structured(9, 12)
    errs = colour_errors(s, s.copy())
    assert tuple(errs) == COLOUR_ERROR_KEYS
    assert all(v == 0.0 for v in errs.values()), errs
    u8 = np.round(s * 255).astype(np.uint8)
    assert all(v == 0.0 for v in colour_errors(u8, u8.copy()).values())


def _from_oklab(lab):
    """Oklab -> sRGB through coloraide (an independent inverse), float64."""
    return np.array([coloraide.Color("oklab", list(p)).convert("srgb").coords() for p in lab.reshape(-1, 3)]
                    ).reshape(lab.shape)


def test_colour_errors_lightness_shift_is_pure_lightness():
    rng = np.random.default_rng(7)
    ref = 0.3 + 0.4 * rng.random((6, 7, 3))  # mid tones, so that L + 0.05 stays in gamut
    lab = oklab_np(ref)
    shift = 0.05
    test = _from_oklab(lab + np.array([shift, 0.0, 0.0]))
    assert test.min() >= 0 and test.max() <= 1
    e = colour_errors(ref, test)
    assert abs(e["L_bias"] - shift) < 1e-6 and abs(e["L_mae"] - shift) < 1e-6
    assert abs(e["delta_e_ok_mean"] - shift) < 1e-6 and abs(e["delta_e_ok_p95"] - shift) < 1e-6
    for k in ("a_mae", "b_mae", "a_bias", "b_bias", "chroma_mae", "chroma_bias", "hue_mae"):
        assert abs(e[k]) < 1e-6, (k, e[k])
    assert e["ciede2000_mean"] > 1.0  # a visible lightness change in CIELAB as well


def test_colour_errors_chroma_and_hue_cases():
    rng = np.random.default_rng(8)
    ref = 0.3 + 0.4 * rng.random((5, 5, 3))
    lab = oklab_np(ref)
    # Desaturate by 20 %: a pure chroma change, negative bias, no hue change.
    desat = _from_oklab(lab * np.array([1.0, 0.8, 0.8]))
    e = colour_errors(ref, desat)
    chroma = np.hypot(lab[..., 1], lab[..., 2])
    assert abs(e["chroma_bias"] + 0.2 * chroma.mean()) < 1e-6 and e["hue_mae"] < 1e-6
    assert abs(e["L_bias"]) < 1e-6
    # Rotate the hue by 10 degrees: chroma kept, ΔH = 2 C sin(5 degrees).
    t = np.radians(10.0)
    rot = lab.copy()
    rot[..., 1] = lab[..., 1] * np.cos(t) - lab[..., 2] * np.sin(t)
    rot[..., 2] = lab[..., 1] * np.sin(t) + lab[..., 2] * np.cos(t)
    e = colour_errors(ref, _from_oklab(rot))
    assert e["chroma_mae"] < 1e-6
    assert abs(e["hue_mae"] - np.mean(2 * chroma * np.sin(t / 2))) < 1e-6
    assert abs(e["hue_mae"] - e["delta_e_ok_mean"]) < 1e-6


def test_colour_errors_delta_e_match_coloraide_per_pixel():
    rng = np.random.default_rng(9)
    ref, test = rng.random((3, 4, 3)), rng.random((3, 4, 3))
    pairs = [(coloraide.Color("srgb", list(x)), coloraide.Color("srgb", list(y)))
             for x, y in zip(ref.reshape(-1, 3), test.reshape(-1, 3))]
    de_ok = np.array([c1.delta_e(c2, method="ok") for c1, c2 in pairs])
    de00 = np.array([c1.delta_e(c2, method="2000") for c1, c2 in pairs])
    e = colour_errors(ref, test)
    assert abs(e["delta_e_ok_mean"] - de_ok.mean()) < 1e-7
    assert abs(e["delta_e_ok_p95"] - np.percentile(de_ok, 95)) < 1e-7
    assert abs(delta_e_ok(ref, test) - de_ok.mean()) < 1e-7
    # CIEDE2000 goes through skimage's rgb2lab, whose 6-digit sRGB->XYZ matrix moves Lab by up to
    # ~0.01 from coloraide's; ΔE00 then differs by a few 1e-3 (the formula itself agrees to 1e-9 above).
    assert abs(e["ciede2000_mean"] - de00.mean()) < 0.02
    lab = cielab_from_srgb(ref)
    assert lab.shape == ref.shape and abs(cielab_from_srgb(np.ones(3))[0] - 100) < 1e-6
