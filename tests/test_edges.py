"""Edge, ringing and flat-colour metrics on analytic cases: a blurred step (no overshoot), an ideal
low-pass of a step (the Gibbs overshoot, Si(pi)/pi - 1/2 = 8.949 % of the step), the identity, and
noise confined to flat regions."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.special import sici

from fvae_core.edges import EDGE_METRIC_KEYS, edge_masks, edge_metrics, overshoot_map

LO, HI = 0.2, 0.8
GIBBS = sici(np.pi)[0] / np.pi - 0.5  # 0.0894898...: continuous overshoot fraction of the step


def _step(h=64, w=64):
    """Vertical step: LO in columns < w/2, HI from w/2 on."""
    x = np.full((h, w), LO)
    x[:, w // 2:] = HI
    return x


def _ideal_lowpass_step(h=32, w=128, cutoff=0.25, oversample=16):
    """A step and its brick-wall low-pass at ``cutoff`` cycles/px, along the step's axis.

    Filtering the pixel-grid step directly does not give the continuous Gibbs value: the sampled
    step's spectrum differs from 1/(i w) near the cutoff (aliasing), and the pixel centres miss the
    first lobe, which lies 1/(2 cutoff) = 2 px from the edge -- 6.8 % at 0.25 cycles/px. So the step
    is built on a grid ``oversample`` times finer, made periodic without a second discontinuity by
    even (mirror) extension (period 2w px, 0.25 x 2w = 64 harmonics), filtered by zeroing every
    rFFT bin above the cutoff, and sampled at the pixel centres. The edge lies half a fine sample
    (1/32 px) before pixel w/2, so pixel w/2 + 2 sits 1/32 px past the lobe's crest.
    """
    n = w * oversample
    fine = np.where(np.arange(n) >= (w // 2) * oversample, HI, LO)
    periodic = np.concatenate([fine, fine[::-1]])
    spectrum = np.fft.rfft(periodic)
    spectrum[np.fft.rfftfreq(periodic.size) > cutoff / oversample] = 0
    rec = np.fft.irfft(spectrum, periodic.size)[:n:oversample]
    return np.tile(fine[::oversample], (h, 1)), np.tile(rec, (h, 1))


def test_masks_of_a_step_and_of_flat_images():
    step = _step()
    m = edge_masks(step)
    rows, cols = np.nonzero(m.edges)
    assert set(cols) <= {31, 32}  # on the step only
    assert len(set(rows)) >= 58  # along (almost) its whole length; canny skips the border rows
    assert not (m.core & m.ringing).any() and not ((m.core | m.ringing) & m.flat).any()
    assert (m.edges <= m.core).all()
    ring_cols = set(np.nonzero(m.ringing)[1])
    assert ring_cols <= set(range(25, 39)) and {28, 35} <= ring_cols
    assert m.flat[:, :22].all() and m.flat[:, 42:].all()  # > 8 px from the edge, constant

    for value in (0.0, 0.5, 1.0):
        flat = edge_masks(np.full((30, 40), value))
        assert not flat.edges.any() and not flat.core.any() and not flat.ringing.any()
        assert flat.flat.all()
    # Fine texture (std 0.02) without edges: no edges, and not flat either.
    texture = 0.5 + 0.02 * np.random.default_rng(0).standard_normal((40, 40))
    m = edge_masks(texture)
    assert not m.edges.any() and not m.flat.any()


def test_identity_reconstruction():
    step = _step()
    e = edge_metrics(step, step.copy())
    assert tuple(e) == EDGE_METRIC_KEYS
    assert e["overshoot_mean"] == 0 and e["overshoot_peak"] == 0
    assert e["sharpness_ratio"] == 1.0 and e["flat_noise"] == 0.0
    assert 0 < e["edge_fraction"] < 0.05 and 0.6 < e["flat_fraction"] < 0.8


def test_gaussian_blurred_step_has_no_overshoot_and_is_blurred():
    step = _step()
    e = edge_metrics(step, ndimage.gaussian_filter(step, 1.5))
    assert abs(e["overshoot_mean"]) < 1e-12 and abs(e["overshoot_peak"]) < 1e-12
    assert e["sharpness_ratio"] < 0.6
    # Why the default window is 15, not the recipe's 5: with 5x5 a pixel 2-5 px from the edge sees
    # one side only, and the blur's tail counts as "undershoot" (about 4.5 % of the step here).
    literal = overshoot_map(step, ndimage.gaussian_filter(step, 1.5), window=5)
    assert 0.04 * (HI - LO) < literal.max() < 0.05 * (HI - LO)


def test_ideal_lowpass_step_gives_the_gibbs_overshoot():
    orig, rec = _ideal_lowpass_step()
    height = HI - LO
    e = edge_metrics(orig, rec)
    assert abs(e["overshoot_peak"] / height - GIBBS) < 0.01  # measured: 8.945 % (continuous 8.949 %)
    assert abs(e["overshoot_peak"] / height - GIBBS) < 1e-3
    assert e["overshoot_mean"] > 0.01 * height  # the band holds the first lobes
    assert e["sharpness_ratio"] < 1  # band-limiting also blurs the step
    # The same overshoot on both sides: the undershoot below LO mirrors the overshoot above HI.
    assert abs((LO - rec.min()) - (rec.max() - HI)) < 1e-3 * height


def test_flat_noise_measures_noise_added_to_flat_regions():
    step = _step(96, 96)
    masks = edge_masks(step)
    sigma = 0.02
    noise = sigma * np.random.default_rng(1).standard_normal(step.shape)
    e = edge_metrics(step, step + noise * masks.flat, masks)
    assert abs(e["flat_noise"] - sigma) < 0.1 * sigma
    assert e["overshoot_mean"] == 0 and e["sharpness_ratio"] == 1.0  # edges untouched
    # A uniform offset of the flat regions is a colour shift, not noise.
    assert edge_metrics(step, step + 0.05 * masks.flat, masks)["flat_noise"] < 1e-12


def test_empty_masks_give_nan_not_errors():
    flat = np.full((24, 24), 0.4)
    e = edge_metrics(flat, flat + 0.01)
    assert np.isnan(e["overshoot_mean"]) and np.isnan(e["overshoot_peak"]) and np.isnan(e["sharpness_ratio"])
    assert e["edge_fraction"] == 0 and e["flat_fraction"] == 1 and e["flat_noise"] < 1e-12
    texture = 0.5 + 0.02 * np.random.default_rng(2).standard_normal((32, 32))
    assert np.isnan(edge_metrics(texture, texture)["flat_noise"])


def test_shape_errors():
    with pytest.raises(ValueError, match="HxW"):
        edge_masks(np.zeros((8, 8, 3)))
    with pytest.raises(ValueError, match="mismatch"):
        edge_metrics(np.zeros((8, 8)), np.zeros((8, 9)))
