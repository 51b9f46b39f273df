"""Frequency-domain analysis of reconstructions: power spectra, radial averages, band energies,
spectral slope and the up-sampling grid peaks of an f=8 decoder.

Pure numpy in float64 (no JAX: this runs on decoded images, not inside a training step). Every
function takes arrays shaped ``(..., H, W)``; the leading axes (images and/or channels, e.g. the
Oklab L, a, b planes) are kept, so a whole batch is one vectorised call. Frequencies are in
cycles/pixel, Nyquist is 0.5.

Recipe (``reference/evaluation.md``, "Frequency-domain analysis"), per channel:
subtract the mean, apply a separable 2-D Hann window ``w``, take ``P = |fft2(w (x - mean))|^2 / sum(w^2)``,
average ``P`` over rings of width ``1/N`` (``N = min(H, W)``). With that normalisation white noise of
variance ``sigma^2`` has ``E[P] = sigma^2`` in every bin, windowed or not.

Sources
-------
* Periodogram with a data taper (Hann window) and ``sum(w^2)`` normalisation: Welch (1967), "The
  use of the FFT for the estimation of power spectra"; Harris (1978), "On the use of windows for
  harmonic analysis with the DFT", Proc. IEEE 66(1) (periodic vs symmetric windows).
* Azimuthally averaged spectra to expose generator artefacts: Durall, Keuper & Keuper (2020),
  "Watch your up-convolution: CNN based generative deep neural networks are failing to reproduce
  spectral distributions", CVPR.
* Periodic peaks left by up-sampling (seen in DCT log spectra): Frank et al. (2020), "Leveraging
  frequency analysis for deep fake image recognition", ICML.
* Fitting the high band of the radial spectrum (decay/slope): Dzanic, Shah & Witherden (2020),
  "Fourier spectrum discrepancies in deep network generated images", NeurIPS.
* Natural images have ``P(f) ~ f^-2``: van der Schaaf & van Hateren (1996), Vision Research 36.

Choices
-------
* **Periodic Hann** ``w[n] = 0.5 - 0.5 cos(2 pi n / N)``, ``n = 0..N-1`` (Harris's "DFT-even"
  window), not the symmetric one (``/(N-1)``). Its DFT has exactly three non-zero taps
  ``(-1/4, 1/2, -1/4)``, so a bin-centred sinusoid lands in exactly the 3x3 bins around its peak and
  the windowed periodogram of circularly stationary noise is the true spectrum smoothed by a fixed
  3x3 kernel -- no far leakage. The symmetric window is the filter-design form and leaks a little
  everywhere.
* **Bins**: ``N = min(H, W)``; bin ``k`` (``k = 0..N//2``) is centred on ``k/N`` and holds
  ``(k - 1/2)/N <= |f| < (k + 1/2)/N``; the corners ``|f| > 0.5`` (diagonal frequencies up to
  ``sqrt(2)/2``) are left out of the radial curves. Band *energies* (``band_energy``, ``ΔHF``, the
  error's high band) do include the corners: they are real high-frequency content (diagonal detail,
  checkerboards), and with them the low and high bands add up to the total.
* **Floor** ``POWER_FLOOR = 1e-30`` before every logarithm and power ratio: far below any real
  power of [0, 1]-range data (a one-pixel change of one 8-bit step in a 4096^2 image puts ~1e-11 in
  a bin), so it only turns ``log(0)`` into a large finite number instead of ``-inf``/NaN.
"""
from __future__ import annotations

import functools

import numpy as np

#: Added floor (max(P, floor)) before logarithms and ratios of power; see the module docstring.
POWER_FLOOR = 1e-30


def _as_image_stack(x, name: str = "x") -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim < 2:
        raise ValueError(f"{name}: need an array shaped (..., H, W), got shape {x.shape}")
    return x


def _same_shape(a: np.ndarray, b: np.ndarray, fn: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{fn}: shape mismatch {a.shape} vs {b.shape}")


def hann_window(n: int) -> np.ndarray:
    """Periodic (DFT-even) Hann window ``w[j] = 0.5 - 0.5 cos(2 pi j / n)``, ``j = 0..n-1``."""
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)


@functools.lru_cache(maxsize=16)
def _window_2d(h: int, w: int) -> tuple[np.ndarray, float]:
    win = np.outer(hann_window(h), hann_window(w))
    win.setflags(write=False)
    return win, float(np.sum(win * win))


def power_spectrum_2d(x, *, window: bool = True, remove_mean: bool = True) -> np.ndarray:
    """2-D power spectrum, unshifted fft order, shape ``(..., H, W)``:

    ``P[ky, kx] = |fft2(w * (x - mean(x)))[ky, kx]|^2 / sum(w^2)``

    with ``w`` the separable periodic Hann window when ``window`` else ``w = 1`` (then
    ``sum(w^2) = H W`` and Parseval gives ``sum(P) / (H W) = mean(x^2)``, or the variance when
    ``remove_mean``). The mean is taken per leading index over the last two axes.
    Computed with ``rfft2`` and completed by the Hermitian symmetry ``P[-k] = P[k]`` of real input.
    """
    x = _as_image_stack(x)
    h, w = x.shape[-2:]
    if remove_mean:
        x = x - x.mean(axis=(-2, -1), keepdims=True)
    if window:
        win, norm = _window_2d(h, w)
        x = x * win
    else:
        norm = float(h * w)
    half = np.fft.rfft2(x)
    half = (half.real ** 2 + half.imag ** 2) / norm
    wh = w // 2 + 1
    out = np.empty(x.shape, dtype=np.float64)
    out[..., :wh] = half
    # Column kx > W/2 is the conjugate of (-ky mod H, W - kx).
    out[..., wh:] = half[..., (-np.arange(h)) % h, w - wh:0:-1]
    return out


def radial_frequencies(h: int, w: int) -> np.ndarray:
    """``|f| = sqrt(fy^2 + fx^2)`` in cycles/px of every 2-D fft bin, shape ``(h, w)``, fft order
    (``fy = fftfreq(h)``, ``fx = fftfreq(w)``)."""
    return np.hypot(np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :])


def radial_bins(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Ring bins of width ``1/N``, ``N = min(h, w)``.

    Returns ``(centres, index)``: ``centres[k] = k/N`` for ``k = 0..N//2`` (up to Nyquist 0.5) and an
    ``(h, w)`` int array with ``index = floor(N |f| + 1/2)``, i.e. bin ``k`` holds
    ``(k - 1/2)/N <= |f| < (k + 1/2)/N``; ``index = -1`` for the corners ``|f| > 0.5``.
    """
    n = min(h, w)
    f = radial_frequencies(h, w)
    index = np.minimum(np.floor(f * n + 0.5).astype(np.int64), n // 2)  # f == 0.5 exactly: last bin
    index[f > 0.5 + 1e-12] = -1
    return np.arange(n // 2 + 1) / n, index


@functools.lru_cache(maxsize=16)
def _radial_plan(h: int, w: int):
    centres, index = radial_bins(h, w)
    flat = index.ravel()
    order = np.argsort(flat, kind="stable")
    order = order[flat[order] >= 0]
    counts = np.bincount(flat[flat >= 0], minlength=len(centres))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    for a in (centres, order, counts, starts):
        a.setflags(write=False)
    return centres, order, starts, counts


def radial_average(P2d) -> tuple[np.ndarray, np.ndarray]:
    """Ring means of a 2-D spectrum (fft order): ``P(f_k) = mean_{|f| in bin k} P2d``.

    Returns ``(freqs, P)`` with ``freqs = k/N`` and ``P`` shaped ``(..., N//2 + 1)``; see
    :func:`radial_bins`. Every bin is non-empty (it holds the on-axis bin ``k/N``).
    """
    P2d = _as_image_stack(P2d, "P2d")
    h, w = P2d.shape[-2:]
    centres, order, starts, counts = _radial_plan(h, w)
    flat = P2d.reshape(*P2d.shape[:-2], h * w)[..., order]
    return centres, np.add.reduceat(flat, starts, axis=-1) / counts


def radial_power_spectrum(x, *, window: bool = True,
                          remove_mean: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged power spectrum ``(freqs, P)``, ``P`` shaped ``(..., N//2 + 1)``:
    :func:`radial_average` of :func:`power_spectrum_2d` (Durall et al. 2020's azimuthal average,
    here of the power rather than of the log magnitude)."""
    return radial_average(power_spectrum_2d(x, window=window, remove_mean=remove_mean))


def band_energy(P2d, h: int, w: int, lo: float, hi: float = np.inf) -> np.ndarray:
    """``E = sum_{lo < |f| <= hi} P2d`` over the last two axes, shape ``(...)``.

    ``h, w`` must equal ``P2d.shape[-2:]`` (checked). The default ``hi = inf`` keeps the corners
    ``|f| > 0.5``; pass ``hi=0.5`` to stop at Nyquist.
    """
    P2d = _as_image_stack(P2d, "P2d")
    if P2d.shape[-2:] != (h, w):
        raise ValueError(f"band_energy: P2d has shape {P2d.shape}, not (..., {h}, {w})")
    return P2d.reshape(*P2d.shape[:-2], h * w) @ _band_mask(h, w, float(lo), float(hi))


@functools.lru_cache(maxsize=64)
def _band_mask(h: int, w: int, lo: float, hi: float) -> np.ndarray:
    f = radial_frequencies(h, w)
    mask = ((f > lo) & (f <= hi)).ravel().astype(np.float64)
    mask.setflags(write=False)
    return mask


def _db_ratio(num, den) -> np.ndarray:
    return 10.0 * np.log10(np.maximum(num, POWER_FLOOR) / np.maximum(den, POWER_FLOOR))


def high_band_change_db(x_rec, x_orig, fc: float) -> np.ndarray:
    """High-band change ``ΔHF = 10 log10( sum_{|f|>fc} P_rec / sum_{|f|>fc} P_orig )`` in dB, one value
    per leading index (shape ``(...)``), from windowed, mean-removed spectra (corners included).
    Negative: the reconstruction lost high-frequency energy (blur); positive: it added some (noise,
    grid artefacts). Identical inputs give exactly 0, ``2 x`` gives ``+6.02`` dB."""
    x_rec, x_orig = _as_image_stack(x_rec, "x_rec"), _as_image_stack(x_orig, "x_orig")
    _same_shape(x_rec, x_orig, "high_band_change_db")
    h, w = x_rec.shape[-2:]
    return _db_ratio(band_energy(power_spectrum_2d(x_rec), h, w, fc),
                     band_energy(power_spectrum_2d(x_orig), h, w, fc))


def spectral_ratio_db(P_rec, P_orig) -> np.ndarray:
    """Spectral ratio ``R = 10 log10(max(P_rec, floor) / max(P_orig, floor))`` in dB, elementwise
    (radial or 2-D spectra), with ``floor = POWER_FLOOR = 1e-30`` so an empty bin gives a large
    finite number instead of ``±inf``/NaN (``0/0`` gives 0 dB)."""
    return _db_ratio(np.asarray(P_rec, np.float64), np.asarray(P_orig, np.float64))


def error_spectrum(x_rec, x_orig, *, window: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Radial power spectrum ``(freqs, P_err)`` of the error ``e = x_rec - x_orig``.

    The error's mean is **kept** (``remove_mean=False``): a colour/brightness shift is error too,
    and it shows up in the lowest bins (bins 0 and 1, where the Hann window spreads DC).
    """
    x_rec, x_orig = _as_image_stack(x_rec, "x_rec"), _as_image_stack(x_orig, "x_orig")
    _same_shape(x_rec, x_orig, "error_spectrum")
    return radial_power_spectrum(x_rec - x_orig, window=window, remove_mean=False)


def _error_high_band_from_power(P_err: np.ndarray, fc: float) -> tuple[np.ndarray, np.ndarray]:
    h, w = P_err.shape[-2:]
    high = band_energy(P_err, h, w, fc)
    total = P_err.sum(axis=(-2, -1))
    share = np.divide(high, total, out=np.zeros_like(high), where=total > 0)
    return high / (h * w), share


def error_high_band(x_rec, x_orig, fc: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """High-band error ``(energy, share)``, each shaped ``(...)``, from the windowed spectrum of
    ``e = x_rec - x_orig`` with its mean kept (see :func:`error_spectrum`):

    ``energy = sum_{|f|>fc} P_err / (H W)`` -- error power per pixel in the band (a window-weighted
    MSE restricted to ``|f| > fc``; without the window the whole band sum would be the MSE), and
    ``share = sum_{|f|>fc} P_err / sum_f P_err`` in [0, 1] (0 when the error is exactly 0).
    White-noise error has ``share`` equal to the fraction of 2-D bins with ``|f| > fc``.
    """
    x_rec, x_orig = _as_image_stack(x_rec, "x_rec"), _as_image_stack(x_orig, "x_orig")
    _same_shape(x_rec, x_orig, "error_high_band")
    return _error_high_band_from_power(power_spectrum_2d(x_rec - x_orig, remove_mean=False), fc)


def spectral_slope(freqs, P, lo: float = 1 / 16, hi: float = 0.45) -> np.ndarray:
    """Least-squares slope ``beta`` of ``log10 P`` against ``log10 f`` over ``lo <= f <= hi``:

    ``beta = sum_k (u_k - u_bar)(v_k - v_bar) / sum_k (u_k - u_bar)^2``, ``u = log10 f``,
    ``v = log10 max(P, floor)``; one slope per leading index of ``P`` (shape ``(...)``).
    ``P ~ f^-beta'`` gives ``beta = -beta'``: natural images sit near -2, white noise at 0.
    """
    freqs = np.asarray(freqs, np.float64)
    P = np.asarray(P, np.float64)
    if P.shape[-1:] != freqs.shape:
        raise ValueError(f"spectral_slope: P has shape {P.shape}, freqs {freqs.shape}")
    sel = (freqs >= lo) & (freqs <= hi) & (freqs > 0)
    if sel.sum() < 2:
        raise ValueError(f"spectral_slope: fewer than 2 bins in [{lo}, {hi}]")
    u = np.log10(freqs[sel])
    u = u - u.mean()
    v = np.log10(np.maximum(P[..., sel], POWER_FLOOR))
    return (v @ u) / (u @ u)  # sum(u) = 0, so v's mean drops out


#: Grid-peak neighbourhood: bins within this Chebyshev distance of a peak, minus the 3x3 block
#: around it (where the Hann window spreads a bin-centred line's power).
GRID_RING_RADIUS = 4


@functools.lru_cache(maxsize=16)
def _grid_plan(h: int, w: int, period: int):
    if period < 4:
        raise ValueError(f"grid_peak_ratio: period must be >= 4, got {period}")
    if h % period or w % period:
        raise ValueError(f"grid_peak_ratio: H, W = {h}, {w} must be multiples of period {period}")
    ks = np.arange(1, period // 2)
    peak_rows = np.concatenate([ks * (h // period), np.zeros_like(ks)])  # (k/p, 0) then (0, k/p)
    peak_cols = np.concatenate([np.zeros_like(ks), ks * (w // period)])
    r = GRID_RING_RADIUS
    dy, dx = np.meshgrid(np.arange(-r, r + 1), np.arange(-r, r + 1), indexing="ij")
    ring = np.maximum(np.abs(dy), np.abs(dx)) >= 2
    dy, dx = dy[ring], dx[ring]
    ring_rows = (peak_rows[:, None] + dy[None, :]) % h
    ring_cols = (peak_cols[:, None] + dx[None, :]) % w
    return peak_rows, peak_cols, ring_rows, ring_cols


def _grid_peak_db_from_power(P2d: np.ndarray, period: int) -> np.ndarray:
    h, w = P2d.shape[-2:]
    peak_rows, peak_cols, ring_rows, ring_cols = _grid_plan(h, w, period)
    peak = P2d[..., peak_rows, peak_cols]  # (..., n_peaks)
    # The median of exponentially distributed periodogram ordinates is ln 2 times their mean.
    local_mean = np.median(P2d[..., ring_rows, ring_cols], axis=-1) / np.log(2.0)
    return 10.0 * np.log10(np.mean(np.maximum(peak, POWER_FLOOR) / np.maximum(local_mean, POWER_FLOOR),
                                   axis=-1))


def grid_peak_ratio(x, period: int = 8) -> np.ndarray:
    """Up-sampling grid peaks in dB, one value per leading index (shape ``(...)``).

    An f=8 decoder up-samples x2 three times and leaves energy at ``k/period`` cycles/px (Frank et
    al. 2020). From the windowed, mean-removed spectrum, for ``k = 1..period//2 - 1`` and the two
    axes take the peak bins ``(k/period, 0)`` and ``(0, k/period)``, and the local background
    ``m = median(ring) / ln 2`` over the bins within Chebyshev distance ``GRID_RING_RADIUS = 4`` of the
    peak, less the 3x3 block around it (the Hann main lobe). Then

    ``G = 10 log10( mean_peaks P_peak / m )``.

    Why this form: a periodogram bin of a neutral (noise-like) image is exponentially distributed,
    so the median (robust to a stray line in the ring) is rescaled by ``1/ln 2`` to the local mean,
    and the peak ratios are averaged linearly (``E[P/m] = 1``), not in log (the mean of log10 of an
    exponential is 2.5 dB below its mean). A neutral image then gives ``G ≈ 0`` dB (per-image
    spread about ±2 dB from 6 bins; average ``10**(G/10)`` over images for a tighter number).
    ``H`` and ``W`` must be multiples of ``period`` so the peak bins exist (else ``ValueError``).
    """
    x = _as_image_stack(x)
    return _grid_peak_db_from_power(power_spectrum_2d(x), period)


def radial_spectra(orig, rec) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(freqs, P_orig, P_rec, P_err)`` radial curves, each ``(..., nbins)`` (``(C, nbins)`` for one
    ``(C, H, W)`` image pair), for averaging over images later. ``P_orig``/``P_rec`` are windowed and
    mean-removed; ``P_err`` (of ``rec - orig``) is windowed with its mean kept."""
    orig, rec = _as_image_stack(orig, "orig"), _as_image_stack(rec, "rec")
    _same_shape(orig, rec, "radial_spectra")
    freqs, P_orig = radial_power_spectrum(orig)
    _, P_rec = radial_power_spectrum(rec)
    _, P_err = radial_power_spectrum(rec - orig, remove_mean=False)
    return freqs, P_orig, P_rec, P_err


def spectral_metrics(orig, rec, *, fcs=(0.25, 1 / 16), period: int = 8) -> dict[str, np.ndarray]:
    """Per-channel spectral metrics of one image pair given as ``(C, H, W)`` arrays (e.g. Oklab
    L, a, b); every value has shape ``(C,)`` (more leading axes also work and are kept).

    Keys, with ``{fc}`` formatted by ``:g`` (``0.25``, ``0.0625``):
    ``dhf_db@{fc}`` (:func:`high_band_change_db`), ``err_hf_energy@{fc}`` and ``err_hf_share@{fc}``
    (:func:`error_high_band`), ``slope_orig``/``slope_rec`` (:func:`spectral_slope` on [1/16, 0.45]),
    ``grid_peak_db_orig``/``grid_peak_db_rec`` (:func:`grid_peak_ratio`). Three FFTs per channel.
    """
    orig, rec = _as_image_stack(orig, "orig"), _as_image_stack(rec, "rec")
    _same_shape(orig, rec, "spectral_metrics")
    h, w = orig.shape[-2:]
    P_orig, P_rec = power_spectrum_2d(orig), power_spectrum_2d(rec)
    P_err = power_spectrum_2d(rec - orig, remove_mean=False)
    out: dict[str, np.ndarray] = {}
    for fc in fcs:
        out[f"dhf_db@{fc:g}"] = _db_ratio(band_energy(P_rec, h, w, fc), band_energy(P_orig, h, w, fc))
        out[f"err_hf_energy@{fc:g}"], out[f"err_hf_share@{fc:g}"] = _error_high_band_from_power(P_err, fc)
    freqs, R_orig = radial_average(P_orig)
    _, R_rec = radial_average(P_rec)
    out["slope_orig"] = spectral_slope(freqs, R_orig)
    out["slope_rec"] = spectral_slope(freqs, R_rec)
    out["grid_peak_db_orig"] = _grid_peak_db_from_power(P_orig, period)
    out["grid_peak_db_rec"] = _grid_peak_db_from_power(P_rec, period)
    return out
