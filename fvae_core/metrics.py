"""Full-reference image-quality metrics in NumPy/SciPy float64: PSNR, SSIM, GMSD and colour errors.

Settings follow ``skimage.metrics`` so that results are comparable with it, and every metric here is
tested against an independent implementation (``tests/test_metrics.py``). Nothing here runs JAX:
the colour metrics read Ottosson's Oklab matrices from their one home, :mod:`fvae_core.color`
(imported lazily, because that module imports ``jax``), and apply them in NumPy float64.
Edge, ringing and flat-colour metrics live in :mod:`fvae_core.edges`.

Inputs are sRGB images with the channels last, either float in the data range [0, 1] or ``uint8``
(divided by 255 where a metric needs [0, 1]).

Sources
-------
* SSIM: Z. Wang, A. C. Bovik, H. R. Sheikh, E. P. Simoncelli, "Image quality assessment: from error
  visibility to structural similarity", IEEE TIP 13(4), 2004 -- with skimage's Gaussian settings
  (sigma 1.5, truncate 3.5, i.e. an 11-tap window; reflect borders; population covariances).
* GMSD: W. Xue, L. Zhang, X. Mou, A. C. Bovik, "Gradient magnitude similarity deviation: a highly
  efficient perceptual image quality index", IEEE TIP 23(2), 2014 (arXiv 1308.3052, 2013).
* CIEDE2000: G. Sharma, W. Wu, E. N. Dalal, "The CIEDE2000 color-difference formula: implementation
  notes, supplementary test data, and mathematical observations", Color Res. Appl. 30(1), 2005.
* CIELAB (D65, 2 degree observer) from ``skimage.color.rgb2lab``: a colour space independent of the
  Oklab the losses are computed in.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = [
    "psnr",
    "ssim",
    "ssim_map",
    "gmsd",
    "ciede2000",
    "cielab_from_srgb",
    "oklab_np",
    "delta_e_ok",
    "colour_errors",
    "COLOUR_ERROR_KEYS",
]

# SSIM constants (Wang et al. 2004; skimage's gaussian_weights=True settings).
_SSIM_SIGMA = 1.5
_SSIM_TRUNCATE = 3.5
_SSIM_RADIUS = int(_SSIM_TRUNCATE * _SSIM_SIGMA + 0.5)  # 5: scipy's kernel radius -> 11 taps
_SSIM_K1, _SSIM_K2 = 0.01, 0.03

# GMSD constants (Xue et al.): BT.601 luma, Prewitt / 3, T = 170 for 8-bit data.
_LUMA_601 = np.array([0.299, 0.587, 0.114])
_PREWITT_X = np.array([[1.0, 0.0, -1.0]] * 3) / 3.0
_GMSD_C = 170.0 / 255.0**2

#: Keys of :func:`colour_errors`, in order.
COLOUR_ERROR_KEYS = (
    "delta_e_ok_mean", "delta_e_ok_p95", "ciede2000_mean", "ciede2000_p95",
    "L_mae", "a_mae", "b_mae", "L_bias", "a_bias", "b_bias",
    "chroma_mae", "chroma_bias", "hue_mae",
)


def _pair(reference, test, what: str) -> tuple[np.ndarray, np.ndarray]:
    reference, test = np.asarray(reference), np.asarray(test)
    if reference.shape != test.shape:
        raise ValueError(f"{what}: shape mismatch {reference.shape} vs {test.shape}")
    return reference, test


def _unit_float64(x: np.ndarray) -> np.ndarray:
    """uint8 -> [0, 1] float64; anything else is taken to be in [0, 1] already."""
    return x.astype(np.float64) / 255.0 if x.dtype == np.uint8 else x.astype(np.float64)


def _rgb_pair(reference, test, what: str) -> tuple[np.ndarray, np.ndarray]:
    reference, test = _pair(reference, test, what)
    if reference.ndim < 1 or reference.shape[-1] != 3:
        raise ValueError(f"{what}: need channels-last (..., 3) sRGB images, got {reference.shape}")
    return _unit_float64(reference), _unit_float64(test)


# --------------------------------------------------------------------------------------------- PSNR


def psnr(reference: np.ndarray, test: np.ndarray, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB, computed in float64 over all pixels and channels.

    ``data_range`` defaults to 255 for uint8 inputs and 1.0 for floats, matching
    ``skimage.metrics.peak_signal_noise_ratio`` for those dtypes. Identical images give ``inf``.
    """
    reference, test = _pair(reference, test, "psnr")
    if data_range is None:
        data_range = 255.0 if reference.dtype == np.uint8 else 1.0
    mse = np.mean(np.square(reference.astype(np.float64) - test.astype(np.float64)))
    return float("inf") if mse == 0 else float(10.0 * np.log10(data_range**2 / mse))


# --------------------------------------------------------------------------------------------- SSIM


def ssim_map(reference: np.ndarray, test: np.ndarray, data_range: float | None = None) -> np.ndarray:
    """Per-pixel SSIM (Wang et al. 2004) of HxW or HxWxC images, same shape as the input, float64.

    ``S = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))`` with
    ``C1 = (0.01 R)^2``, ``C2 = (0.03 R)^2``, ``R = data_range``; the local means, variances and
    covariance are Gaussian-weighted (sigma 1.5, truncated at 3.5 sigma: 11 taps, ``reflect``
    borders), population (not sample) moments, each channel separately. These are the settings of
    ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False)``. ``data_range`` defaults to 255 for uint8 and 1.0 otherwise.

    Raises ``ValueError`` if a spatial side is below 11 px (the window), as skimage does.
    """
    reference, test = _pair(reference, test, "ssim")
    if reference.ndim not in (2, 3):
        raise ValueError(f"ssim: need HxW or HxWxC images, got shape {reference.shape}")
    window = 2 * _SSIM_RADIUS + 1
    if min(reference.shape[:2]) < window:
        raise ValueError(f"ssim: images must be at least {window}x{window} (the Gaussian window, "
                         f"sigma {_SSIM_SIGMA} truncated at {_SSIM_TRUNCATE} sigma), got {reference.shape}")
    if data_range is None:
        data_range = 255.0 if reference.dtype == np.uint8 else 1.0
    x, y = reference.astype(np.float64), test.astype(np.float64)
    # All five local moments in one filter call: a leading stack axis and the channel axis unfiltered.
    sigma = (0.0, _SSIM_SIGMA, _SSIM_SIGMA) + (0.0,) * (x.ndim - 2)
    mu_x, mu_y, m_xx, m_yy, m_xy = ndimage.gaussian_filter(
        np.stack([x, y, x * x, y * y, x * y]), sigma, truncate=_SSIM_TRUNCATE, mode="reflect")
    var_x, var_y, cov_xy = m_xx - mu_x * mu_x, m_yy - mu_y * mu_y, m_xy - mu_x * mu_y
    c1, c2 = (_SSIM_K1 * data_range) ** 2, (_SSIM_K2 * data_range) ** 2
    return ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)
            / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)))


def ssim(reference: np.ndarray, test: np.ndarray, data_range: float | None = None) -> float:
    """Mean SSIM of HxW or HxWxC images: :func:`ssim_map` averaged over all channels and over the
    interior that skimage averages (a border of 5 px, the window radius, is dropped).

    Equal to ``skimage.metrics.structural_similarity(ref, test, data_range=..., channel_axis=-1,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`` (tested to 1e-5), except that
    ``data_range`` defaults to 1.0 for floats instead of raising, and the computation is always float64.
    """
    r = _SSIM_RADIUS
    return float(np.mean(ssim_map(reference, test, data_range)[r:-r, r:-r]))


# --------------------------------------------------------------------------------------------- GMSD


def _luma(image: np.ndarray) -> np.ndarray:
    """BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` of [0, 1] sRGB (or uint8); HxW passes through."""
    image = _unit_float64(image)
    if image.ndim == 2:
        return image
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"gmsd: need HxW or HxWx3 images, got shape {image.shape}")
    return image @ _LUMA_601


def _prewitt_magnitude(y: np.ndarray) -> np.ndarray:
    # Zero padding, as the authors' MATLAB code (conv2 'same'); sign of the kernel is irrelevant.
    gx = ndimage.correlate(y, _PREWITT_X, mode="constant", cval=0.0)
    gy = ndimage.correlate(y, _PREWITT_X.T, mode="constant", cval=0.0)
    return np.sqrt(gx * gx + gy * gy)


def gmsd(reference: np.ndarray, test: np.ndarray, downsample: bool = True) -> float:
    """Gradient magnitude similarity deviation (Xue et al. 2013/2014); 0 for identical images, larger
    is worse (about 0.1-0.3 for clearly distorted images).

    Steps, following the paper and its MATLAB code:

    1. Luma ``Y = 0.299 R + 0.587 G + 0.114 B`` of [0, 1] sRGB (uint8 is divided by 255; an HxW
       input is used as Y directly).
    2. If ``downsample`` (the paper's setting): average 2x2 blocks and keep one sample per block,
       i.e. a 2x2 mean filter then decimation by 2. An odd last row/column is dropped (the MATLAB
       code averages it with zero padding instead; this only touches a one-pixel border).
    3. Gradient magnitude ``m = sqrt((Y*h_x)^2 + (Y*h_y)^2)`` with the Prewitt kernels divided by 3
       (``h_x = [[1, 0, -1]] * 3 / 3``, ``h_y = h_x^T``), zero padding at the border as in the paper.
    4. ``GMS = (2 m_r m_d + c) / (m_r^2 + m_d^2 + c)`` with ``c = 170/255^2`` (the paper's T = 170
       for 8-bit data, rescaled to [0, 1] data: GMS is unchanged by the rescaling).
    5. ``GMSD = std(GMS)``, the population standard deviation (the paper's 1/N definition).

    ``gmsd(x, x)`` is exactly 0: the numerator and the denominator are then the same float.
    """
    reference, test = _pair(reference, test, "gmsd")
    y_r, y_d = _luma(reference), _luma(test)
    if downsample:
        if min(y_r.shape) < 2:
            raise ValueError(f"gmsd: images must be at least 2x2 to downsample, got {reference.shape}")
        h, w = (y_r.shape[0] // 2) * 2, (y_r.shape[1] // 2) * 2
        y_r, y_d = (y[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3)) for y in (y_r, y_d))
    m_r, m_d = _prewitt_magnitude(y_r), _prewitt_magnitude(y_d)
    gms = (2.0 * m_r * m_d + _GMSD_C) / (m_r * m_r + m_d * m_d + _GMSD_C)
    return float(np.std(gms))


# ----------------------------------------------------------------------------------------- CIEDE2000


def ciede2000(lab1, lab2) -> np.ndarray:
    """CIEDE2000 colour difference of CIELAB arrays ``(..., 3)`` (broadcast together), kL = kC = kH = 1.

    Implements equations (1)-(22) of Sharma, Wu & Dalal (2005) in float64, including their
    conventions for the corner cases: the hue angle of a neutral colour (a' = b = 0) is 0; the hue
    difference is 0 and the mean hue is the plain sum ``h1' + h2'`` when either chroma C' is 0; the
    mean hue of two hues more than 180 degrees apart is taken around the short way (eq. 14).
    Reproduces all 34 test pairs of the paper's Table 1 (see the tests). Returns ``lab1.shape[:-1]``
    (broadcast).
    """
    lab1, lab2 = np.asarray(lab1, np.float64), np.asarray(lab2, np.float64)
    if lab1.shape[-1:] != (3,) or lab2.shape[-1:] != (3,):
        raise ValueError(f"ciede2000: need (..., 3) Lab arrays, got {lab1.shape} and {lab2.shape}")
    l1, a1, b1 = np.moveaxis(lab1, -1, 0)
    l2, a2, b2 = np.moveaxis(lab2, -1, 0)
    pow25_7 = 25.0**7

    # (2)-(7): a' rescaling of a, C' and h' (degrees, [0, 360)).
    c_bar = 0.5 * (np.hypot(a1, b1) + np.hypot(a2, b2))
    c_bar7 = c_bar**7
    g = 0.5 * (1.0 - np.sqrt(c_bar7 / (c_bar7 + pow25_7)))
    a1p, a2p = (1.0 + g) * a1, (1.0 + g) * a2
    c1p, c2p = np.hypot(a1p, b1), np.hypot(a2p, b2)
    # atan2(-0., -0.) is -180 degrees, so neutral colours get 0 explicitly.
    h1p = np.where(c1p == 0, 0.0, np.degrees(np.arctan2(b1, a1p)) % 360.0)
    h2p = np.where(c2p == 0, 0.0, np.degrees(np.arctan2(b2, a2p)) % 360.0)

    # (8)-(11): differences.
    d_lp = l2 - l1
    d_cp = c2p - c1p
    chroma_prod = c1p * c2p
    dh = h2p - h1p
    dh = np.where(dh > 180.0, dh - 360.0, np.where(dh < -180.0, dh + 360.0, dh))
    dh = np.where(chroma_prod == 0, 0.0, dh)
    d_hp = 2.0 * np.sqrt(chroma_prod) * np.sin(np.radians(dh) / 2.0)

    # (12)-(22): means, weighting functions and the rotation term.
    l_barp = 0.5 * (l1 + l2)
    c_barp = 0.5 * (c1p + c2p)
    h_sum = h1p + h2p
    h_barp = np.where(
        chroma_prod == 0, h_sum,
        np.where(np.abs(h1p - h2p) <= 180.0, 0.5 * h_sum,
                 np.where(h_sum < 360.0, 0.5 * (h_sum + 360.0), 0.5 * (h_sum - 360.0))))
    t = (1.0 - 0.17 * np.cos(np.radians(h_barp - 30.0)) + 0.24 * np.cos(np.radians(2.0 * h_barp))
         + 0.32 * np.cos(np.radians(3.0 * h_barp + 6.0)) - 0.20 * np.cos(np.radians(4.0 * h_barp - 63.0)))
    d_theta = 30.0 * np.exp(-(((h_barp - 275.0) / 25.0) ** 2))
    c_barp7 = c_barp**7
    r_c = 2.0 * np.sqrt(c_barp7 / (c_barp7 + pow25_7))
    l50 = (l_barp - 50.0) ** 2
    s_l = 1.0 + 0.015 * l50 / np.sqrt(20.0 + l50)
    s_c = 1.0 + 0.045 * c_barp
    s_h = 1.0 + 0.015 * c_barp * t
    r_t = -np.sin(np.radians(2.0 * d_theta)) * r_c
    dl, dc, dhh = d_lp / s_l, d_cp / s_c, d_hp / s_h
    return np.sqrt(dl * dl + dc * dc + dhh * dhh + r_t * dc * dhh)


def cielab_from_srgb(rgb01) -> np.ndarray:
    """CIELAB (D65 white, 2 degree observer; L in [0, 100]) of [0, 1] sRGB (or uint8), via
    ``skimage.color.rgb2lab``: a colour space independent of Oklab, so CIEDE2000 on it is not
    computed in the space an Oklab loss optimises."""
    from skimage.color import rgb2lab

    rgb = np.asarray(rgb01)
    if rgb.ndim < 1 or rgb.shape[-1] != 3:
        raise ValueError(f"cielab_from_srgb: need (..., 3) sRGB, got {rgb.shape}")
    return rgb2lab(_unit_float64(rgb), illuminant="D65", observer="2", channel_axis=-1)


# ---------------------------------------------------------------------------------------- Oklab, ΔE


def oklab_np(rgb01) -> np.ndarray:
    """Oklab of [0, 1] sRGB (or uint8) ``(..., 3)`` in NumPy float64, for metrics.

    The same map as :func:`fvae_core.color.oklab_from_srgb` (the differentiable JAX version used by
    the losses), with the matrices and transfer constants imported from there: decode sRGB
    (odd-extended outside [0, 1], as there), ``lms = rgb @ M1.T``, ``lab = cbrt(lms) @ M2.T``. The
    C1 patch of the cube root near 0 is not needed here (no gradients), so ``np.cbrt`` is used.
    """
    from fvae_core import color  # lazy: color imports jax; only its NumPy constants are used

    c = np.asarray(rgb01)
    if c.ndim < 1 or c.shape[-1] != 3:
        raise ValueError(f"oklab_np: need (..., 3) sRGB, got {c.shape}")
    c = _unit_float64(c)
    mag = np.abs(c)
    curve = ((mag + color._OFFSET) / (1.0 + color._OFFSET)) ** color._GAMMA
    linear = np.where(mag <= color._DECODE_THRESHOLD, c / color._LINEAR_SLOPE, np.sign(c) * curve)
    return np.cbrt(linear @ color.LMS_FROM_LINEAR.T) @ color.OKLAB_FROM_LMS_CBRT.T


def delta_e_ok(reference, test) -> float:
    """Mean ΔE_OK: the Euclidean distance in Oklab (L in [0, 1]) per pixel, averaged, for float [0, 1]
    sRGB (or uint8) images; CSS Color 4's deltaEOK and coloraide's ``delta_e(method="ok")``. Values
    around 0.02 are a just-noticeable difference; reports often multiply by 100."""
    reference, test = _rgb_pair(reference, test, "delta_e_ok")
    diff = oklab_np(test) - oklab_np(reference)
    return float(np.mean(np.linalg.norm(diff, axis=-1)))


def colour_errors(reference, test) -> dict[str, float]:
    """Colour-error summary of a test image against its reference, both (..., 3) sRGB in [0, 1] (or
    uint8). All differences are ``test - reference``, per pixel, then reduced over all pixels:

    * ``delta_e_ok_mean``, ``delta_e_ok_p95``: mean and 95th percentile of ΔE_OK, the Euclidean
      distance in Oklab (L in [0, 1]; ~0.02 is just noticeable).
    * ``ciede2000_mean``, ``ciede2000_p95``: mean and 95th percentile of CIEDE2000 on CIELAB (D65,
      :func:`cielab_from_srgb`; L in [0, 100]; ~1 is just noticeable). Independent of Oklab.
    * ``L_mae``, ``a_mae``, ``b_mae``: mean absolute error of each Oklab channel.
    * ``L_bias``, ``a_bias``, ``b_bias``: signed mean error of each Oklab channel (a positive
      ``L_bias`` means the test image is lighter).
    * ``chroma_mae``, ``chroma_bias``: mean absolute and signed error of the Oklab chroma
      ``C = sqrt(a^2 + b^2)`` (a negative bias means the test image is desaturated).
    * ``hue_mae``: mean Oklab hue difference ``ΔH = sqrt(max(0, ΔE^2 - ΔL^2 - ΔC^2))``, the part of
      ΔE_OK that is neither lightness nor chroma (same units as ΔE_OK; ``ΔE^2 = ΔL^2 + ΔC^2 + ΔH^2``).

    Percentiles use NumPy's default linear interpolation.
    """
    reference, test = _rgb_pair(reference, test, "colour_errors")
    ok_r, ok_t = oklab_np(reference), oklab_np(test)
    d = (ok_t - ok_r).reshape(-1, 3)
    de_ok = np.linalg.norm(d, axis=-1)
    de00 = ciede2000(cielab_from_srgb(reference), cielab_from_srgb(test)).reshape(-1)
    chroma_r = np.hypot(ok_r[..., 1], ok_r[..., 2]).reshape(-1)
    chroma_t = np.hypot(ok_t[..., 1], ok_t[..., 2]).reshape(-1)
    d_c = chroma_t - chroma_r
    # ΔE² - ΔL² = Δa² + Δb² exactly; written that way to avoid cancelling the larger ΔL².
    d_h = np.sqrt(np.maximum(0.0, d[:, 1] ** 2 + d[:, 2] ** 2 - d_c**2))
    out = {
        "delta_e_ok_mean": np.mean(de_ok),
        "delta_e_ok_p95": np.percentile(de_ok, 95),
        "ciede2000_mean": np.mean(de00),
        "ciede2000_p95": np.percentile(de00, 95),
    }
    for i, ch in enumerate("Lab"):
        out[f"{ch}_mae"] = np.mean(np.abs(d[:, i]))
    for i, ch in enumerate("Lab"):
        out[f"{ch}_bias"] = np.mean(d[:, i])
    out.update(chroma_mae=np.mean(np.abs(d_c)), chroma_bias=np.mean(d_c), hue_mae=np.mean(d_h))
    return {k: float(out[k]) for k in COLOUR_ERROR_KEYS}
