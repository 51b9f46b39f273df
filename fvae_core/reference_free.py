"""Measures of a decode that need no reference image: for latents a diffusion model *generated*, there is no
original to compare with (issue 28). Each works on Oklab lightness ``L`` (HxW float, [0, 1]; see
:func:`fvae_core.metrics.oklab_np`), in float64, and each is validated on synthetic oracles in
``tests/test_reference_free.py``.

* :func:`band_power_db`: the power of each decode in frequency bands, in dB relative to the *mean* band power
  of a set of real images of the same size (the validation images): a decoder that adds high-frequency noise
  shows as a positive high band, a blurry one as a negative one.
* :func:`flat_noise`: the standard deviation of the noise in flat regions. Regions come from a structure
  image (the decode itself, or the median of several decoders' decodes of the same latent), smoothed so
  that the noise being measured does not hide the flat areas; the noise is measured with Immerkaer's
  operator (Immerkaer 1996, "Fast noise variance estimation"), which is blind to anything that is linear
  along x or along y, so a smooth shading or a blurred straight edge is not counted as noise.
* :func:`edge_ringing`: excess total variation beside edges: along the normal of each edge pixel, on each
  side, the profile's total variation minus its net change ``|end - start|``. A monotone edge, however
  blurred, gives 0; overshoot and ripples (Gibbs ringing) give twice their amplitude per extremum.

The reference-based counterparts (flat-region error std, overshoot against the original's local range) are
in :mod:`fvae_core.edges`; these are their blind estimates.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from fvae_core.spectra import band_energy, power_spectrum_2d

#: Octave bands in cycles/px for :func:`band_power_db`; the last one reaches the corners (|f| up to 0.71).
BANDS = ((1 / 16, 1 / 8), (1 / 8, 1 / 4), (1 / 4, np.inf))
#: Gaussian scale (px) of the smoothed structure image, and the gradient magnitude (L per px) below which a
#: pixel of it is flat. At sigma 3 the smoothed gradient of white noise has a std of 0.022 sigma_noise per
#: component, so noise up to sigma 0.1 leaves almost every flat pixel below 0.01, while an edge of height
#: 0.1 blurred by a Gaussian of 4 px still peaks above it.
STRUCTURE_SIGMA = 3.0
FLAT_GRADIENT = 0.01
#: Immerkaer's 3x3 operator, [1, -2, 1] (x) [1, -2, 1]; on white noise of std s its output has std 6 s.
_IMMERKAER = np.outer([1.0, -2.0, 1.0], [1.0, -2.0, 1.0])
#: Profile length (px) and sample spacing for :func:`edge_ringing`; the profiles cover the reference
#: metric's ringing band (1-6 px from an edge, :data:`fvae_core.edges.RINGING_RADIUS`).
PROFILE_RADIUS = 6.0
PROFILE_STEP = 0.5
#: A profile stops this far (px) before another edge becomes the nearest one: the blur of a neighbouring edge
#: (an outline's far side) is structure, not ringing.
CLEARANCE = 2.0


def _lightness(x, what: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{what}: need an HxW lightness image, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what}: the image has non-finite values")
    return x


def _structure(L: np.ndarray, structure, what: str) -> np.ndarray:
    s = L if structure is None else _lightness(structure, f"{what} structure")
    if s.shape != L.shape:
        raise ValueError(f"{what}: structure shape {s.shape} differs from the image's {L.shape}")
    return s


def band_power_db(decodes, references, bands=BANDS) -> np.ndarray:
    """``10 log10(E_b(decode) / mean_refs E_b(ref))`` per decode and band, shape ``(n, len(bands))``, with
    ``E_b`` the windowed, mean-removed power in the band (:func:`fvae_core.spectra.band_energy`).

    ``decodes`` (n, H, W) and ``references`` (m, H, W) must share H and W. Identical sets give 0 on average;
    a decode scaled by ``a`` about its mean gives ``20 log10 a`` in every band."""
    d = np.asarray(decodes, dtype=np.float64)
    r = np.asarray(references, dtype=np.float64)
    if d.ndim != 3 or r.ndim != 3 or d.shape[1:] != r.shape[1:] or not len(r):
        raise ValueError(f"band_power_db: need (n, H, W) decodes and (m, H, W) references of the same size, "
                         f"got {d.shape} and {r.shape}")
    h, w = d.shape[1:]
    pd, pr = power_spectrum_2d(d), power_spectrum_2d(r)
    out = np.empty((len(d), len(bands)))
    for j, (lo, hi) in enumerate(bands):
        ref = band_energy(pr, h, w, lo, hi).mean()
        if ref <= 0:
            raise ValueError(f"band_power_db: the references have no power in the band {lo:.3g}-{hi:.3g} cycle/px")
        out[:, j] = 10.0 * np.log10(np.maximum(band_energy(pd, h, w, lo, hi), 1e-30) / ref)
    return out


def flat_mask(structure) -> np.ndarray:
    """Flat pixels of a structure image: the gradient magnitude of its Gaussian smoothing at
    :data:`STRUCTURE_SIGMA` below :data:`FLAT_GRADIENT`, eroded by the smoothing scale so that no flat
    pixel sits on the flank of an edge."""
    s = _lightness(structure, "flat_mask")
    g = ndimage.gaussian_gradient_magnitude(s, STRUCTURE_SIGMA, mode="reflect")
    return ndimage.binary_erosion(g < FLAT_GRADIENT, iterations=int(np.ceil(STRUCTURE_SIGMA)), border_value=0)


def flat_noise(L, structure=None, min_pixels: int = 64) -> float:
    """Noise std in the flat regions of ``L`` (:func:`flat_mask` of ``structure``, default ``L`` itself):

        sigma = median|I * L| / (6 * 0.6745)

    over flat pixels whose 3x3 neighbourhood is flat (``I`` is Immerkaer's operator; the median makes it
    robust to the odd structure pixel that leaks into the mask, and 0.6745 is the median of |N(0, 1)|).
    Returns NaN when fewer than ``min_pixels`` flat pixels remain."""
    L = _lightness(L, "flat_noise")
    mask = ndimage.binary_erosion(flat_mask(_structure(L, structure, "flat_noise")), border_value=0)
    if mask.sum() < min_pixels:
        return float("nan")
    r = ndimage.convolve(L, _IMMERKAER, mode="reflect")
    return float(np.median(np.abs(r[mask])) / (6.0 * 0.6744897501960817))


def edge_ringing(L, structure=None, sigma: float = 2.0) -> float:
    """Mean one-sided excess total variation (Oklab L) of ``L`` beside its edges:

        R = mean over edge pixels and both sides of [ sum_k |p(k+1) - p(k)| - |p(last) - p(first)| ]

    with ``p`` sampled every :data:`PROFILE_STEP` px from 1.5 px to :data:`PROFILE_RADIUS` px along the edge
    normal (the gradient direction of the structure image smoothed at ``sigma``) by linear interpolation,
    which adds no extrema of its own. Edges are ``skimage.feature.canny(structure, sigma)``.

    One-sided, and cut :data:`CLEARANCE` px before another edge becomes nearer than the profile's own edge
    (by the distance transform of the edge map), so that crossing a thin outline (two edges 2-5 px apart,
    everywhere in flat art), or the blurred flank of its far side, is not counted as ripples. Profiles with fewer than 3 samples left are dropped. A monotone
    tail, however blurred, gives 0; each ripple gives twice its amplitude. Noise also adds total variation:
    read it beside :func:`flat_noise`. NaN for an image without edges."""
    from skimage.feature import canny

    L = _lightness(L, "edge_ringing")
    s = _structure(L, structure, "edge_ringing")
    edges = canny(s, sigma=sigma)
    ys, xs = np.nonzero(edges)
    if not len(ys):
        return float("nan")
    dist = ndimage.distance_transform_edt(~edges)
    gy = ndimage.gaussian_filter(s, sigma, order=(1, 0), mode="reflect")[ys, xs]
    gx = ndimage.gaussian_filter(s, sigma, order=(0, 1), mode="reflect")[ys, xs]
    norm = np.hypot(gy, gx)
    keep = norm > 0
    ys, xs, ny, nx = ys[keep], xs[keep], (gy / np.where(keep, norm, 1))[keep], (gx / np.where(keep, norm, 1))[keep]
    t = np.arange(1.5, PROFILE_RADIUS + PROFILE_STEP / 2, PROFILE_STEP)
    ahead = int(round(CLEARANCE / PROFILE_STEP))
    t_ext = np.arange(1.5, PROFILE_RADIUS + CLEARANCE + PROFILE_STEP / 2, PROFILE_STEP)
    out = []
    for side in (1.0, -1.0):
        py = ys[:, None] + side * t_ext[None] * ny[:, None]
        px = xs[:, None] + side * t_ext[None] * nx[:, None]
        coords = [py.ravel(), px.ravel()]
        d = ndimage.map_coordinates(dist, coords, order=0, mode="nearest").reshape(py.shape)
        own = np.cumprod(d >= t_ext[None] - 0.75, axis=1).astype(bool)  # the own edge is still the nearest
        valid = own[:, ahead:ahead + len(t)]                            # ... CLEARANCE px further on too
        p = ndimage.map_coordinates(L, [py[:, :len(t)].ravel(), px[:, :len(t)].ravel()], order=1,
                                    mode="nearest").reshape(len(py), len(t))
        n = valid.sum(1)
        steps = np.abs(np.diff(p, axis=1)) * valid[:, 1:]
        last = p[np.arange(len(p)), np.maximum(n - 1, 0)]
        excess = steps.sum(1) - np.abs(last - p[:, 0])
        out.append(excess[n >= 3])
    out = np.concatenate(out)
    return float(np.mean(out)) if len(out) else float("nan")


def lightness(images01) -> np.ndarray:
    """Oklab L of a stack of RGB images in [0, 1]: ``(n, H, W)`` float64 (what every measure here takes)."""
    from fvae_core.metrics import oklab_np

    return np.stack([oklab_np(np.asarray(x, np.float64))[..., 0] for x in images01])


#: The per-decode measures of :func:`measure_decodes`.
MEASURES = ("hf_db", "flat_noise", "edge_ringing")


def measure_decodes(decodes: dict, references01) -> dict[str, dict[str, np.ndarray]]:
    """Reference-free measures of several decoders' decodes of the *same* latents:
    ``{vae: {"hf_db", "flat_noise", "edge_ringing": (n,)}}``.

    ``decodes`` maps a VAE name to its ``(n, H, W, 3)`` decodes in [0, 1], latent ``i`` at index ``i`` for
    every VAE. ``hf_db`` is the top band of :func:`band_power_db` against ``references01`` (real images of
    the same size). The structure image of latent ``i`` (where the flat regions and edges are) is the
    pixelwise median of all decoders' lightness, so every decoder is measured on the same regions and none
    hides its own noise by making its regions smaller."""
    names = list(decodes)
    if not names:
        raise ValueError("measure_decodes: no decodes")
    shapes = {np.shape(decodes[n]) for n in names}
    if len(shapes) != 1:
        raise ValueError(f"measure_decodes: every VAE must decode the same latents, got shapes {sorted(shapes)}")
    L = {n: lightness(decodes[n]) for n in names}
    refs = lightness(references01)
    structure = np.median(np.stack([L[n] for n in names]), axis=0)
    out = {}
    for n in names:
        out[n] = {"hf_db": band_power_db(L[n], refs)[:, -1],
                  "flat_noise": np.array([flat_noise(x, s) for x, s in zip(L[n], structure)]),
                  "edge_ringing": np.array([edge_ringing(x, s) for x, s in zip(L[n], structure)])}
    return out
