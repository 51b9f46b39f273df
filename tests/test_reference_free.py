"""Reference-free measures (fvae_core.reference_free) on synthetic oracles: OpenMoji flat art with and
without added noise of known sigma, blurred edges and shading that are not noise, the Gibbs ringing of an
ideal low-pass step against its analytic profile (scipy's sine integral), and band powers of white noise
and of scaled images against their closed forms."""
import numpy as np
import pytest
from scipy import ndimage
from scipy.special import sici

from fvae_core import reference_free as rf
from fvae_core.data.sources import openmoji_svgs, render_svg
from fvae_core.metrics import oklab_np


@pytest.fixture(scope="module")
def flat_art():
    """Eight OpenMoji renders at 128², as Oklab L."""
    svgs = openmoji_svgs()[::500][:8]
    return [oklab_np(render_svg(p.read_bytes(), 128, name=p.name).rgb / 255.0)[..., 0] for p in svgs]


def disk(size=128, radius=30.0, lo=0.2, hi=0.7, blur=0.0):
    yy, xx = np.mgrid[:size, :size] + 0.5
    # 4x4 supersampled disk: an anti-aliased edge, as in rendered flat art
    sub = (np.arange(4) + 0.5) / 4 - 0.5
    cover = np.mean([np.hypot(yy + a - size / 2, xx + b - size / 2) < radius for a in sub for b in sub], axis=0)
    img = lo + (hi - lo) * cover
    return ndimage.gaussian_filter(img, blur, mode="reflect") if blur else img


def test_clean_flat_art_has_no_flat_noise(flat_art):
    vals = [rf.flat_noise(L) for L in flat_art]
    assert all(np.isfinite(v) for v in vals)
    assert max(vals) < 0.002, vals  # a tenth of Oklab's just-noticeable 0.02


@pytest.mark.parametrize("sigma", [0.005, 0.02, 0.05])
def test_flat_noise_recovers_a_known_sigma_within_10_percent(flat_art, sigma):
    rng = np.random.default_rng(int(sigma * 1e4))
    for L in flat_art:
        noisy = L + rng.normal(0.0, sigma, L.shape)
        assert rf.flat_noise(noisy) == pytest.approx(sigma, rel=0.10)
        # the regions may come from another image of the same content (the other decoders' decodes)
        assert rf.flat_noise(noisy, structure=L) == pytest.approx(sigma, rel=0.10)


def test_blurred_edges_and_shading_are_not_noise():
    for blur in (1.0, 3.0, 6.0):
        assert rf.flat_noise(disk(blur=blur)) < 0.001
    yy, xx = np.mgrid[:128, :128] / 128.0
    assert rf.flat_noise(0.3 + 0.2 * xx + 0.1 * yy) < 1e-9          # a linear shading: exactly 0
    # the mask is what keeps the edge out: it excludes the whole blurred ring and keeps the fills
    m = rf.flat_mask(disk(blur=3.0))
    yy, xx = np.mgrid[:128, :128] + 0.5
    r = np.hypot(yy - 64, xx - 64)
    inner = np.zeros_like(m)
    inner[4:-4, 4:-4] = True                                       # the erosion also trims a 3 px border
    assert not m[np.abs(r - 30) < 4].any() and m[r < 15].all() and m[(r > 45) & inner].all()


def test_flat_noise_reports_nan_without_flat_pixels_and_rejects_bad_input():
    stripes = np.tile(0.5 + 0.25 * np.sin(2 * np.pi * np.arange(64) / 16), (64, 1))  # structure everywhere
    assert np.isnan(rf.flat_noise(stripes))
    with pytest.raises(ValueError, match="HxW"):
        rf.flat_noise(np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        rf.flat_noise(np.full((8, 8), np.nan))
    with pytest.raises(ValueError, match="structure shape"):
        rf.flat_noise(np.zeros((8, 8)), structure=np.zeros((9, 8)))


def gibbs_step(fc=0.25, height=0.5, size=96, x0=48):
    """A vertical step at pixel column x0, ideally low-passed at fc cycles/px: h (1/2 + Si(2 pi fc x) / pi)."""
    x = np.arange(size) - x0
    row = 0.25 + height * (0.5 + sici(2 * np.pi * fc * x)[0] / np.pi)
    return np.tile(row, (size, 1))


def si_step(x, fc=0.25, height=0.5):
    return 0.25 + height * (0.5 + sici(2 * np.pi * fc * x)[0] / np.pi)


def gibbs_step(fc=0.25, height=0.5, size=96, x0=48):
    """A vertical step at pixel column x0, ideally low-passed at fc cycles/px: h (1/2 + Si(2 pi fc x) / pi)."""
    return np.tile(si_step(np.arange(size) - x0, fc, height), (size, 1))


def sampled_excess_tv(fc=0.25, height=0.5):
    """The one-sided excess total variation, from 1.5 to 6 px, of the piecewise-linear interpolant of the
    analytic profile's pixel samples (what any measure on the pixels sees; the same on both sides by the
    profile's odd symmetry): its knots are the pixels 2..6 and the midpoint value at 1.5."""
    k = np.arange(1, 7)
    v = si_step(k, fc, height)
    p = np.concatenate([[(v[0] + v[1]) / 2], v[1:]])
    return np.abs(np.diff(p)).sum() - abs(p[-1] - p[0])


def lowpass(L, fc):
    f = np.hypot(np.fft.fftfreq(L.shape[0])[:, None], np.fft.fftfreq(L.shape[1])[None])
    return np.real(np.fft.ifft2(np.fft.fft2(L) * (f <= fc)))


def test_edge_ringing_measures_the_gibbs_ripples_of_an_ideal_low_pass():
    expected = sampled_excess_tv()
    assert expected > 0.1                                          # 0.138: real ripples, not rounding
    assert rf.edge_ringing(gibbs_step()) == pytest.approx(expected, rel=0.02)
    # linear in the step height
    assert rf.edge_ringing(gibbs_step(height=0.25)) == pytest.approx(sampled_excess_tv(height=0.25), rel=0.02)


def test_monotone_edges_do_not_ring_however_blurred():
    step = np.tile(np.where(np.arange(96) < 48, 0.25, 0.75), (96, 1))
    assert rf.edge_ringing(step) < 1e-9
    for blur in (0.0, 1.5, 4.0):
        assert rf.edge_ringing(disk(blur=blur)) < 1e-6
    assert np.isnan(rf.edge_ringing(np.full((32, 32), 0.5)))


def test_flat_art_rings_only_when_low_passed_ideally(flat_art):
    """Clean and Gaussian-blurred flat art (outlines 2-5 px wide: two edges close together) measure about 0;
    the same art through a brick-wall low-pass at 1/4 cycle/px (Gibbs ripples at every edge) measures far
    above it."""
    for L in flat_art:
        assert rf.edge_ringing(L) < 0.003
        assert rf.edge_ringing(ndimage.gaussian_filter(L, 1.0), structure=L) < 0.003
        assert rf.edge_ringing(lowpass(L, 0.25), structure=L) > 0.04


def test_band_power_of_scaled_images_and_white_noise_match_closed_forms(flat_art):
    refs = np.stack(flat_art)
    # an image set against itself: exactly 0 dB when it is one image; scaling about the mean: 20 log10 a
    assert np.allclose(rf.band_power_db(refs[:1], refs[:1]), 0.0, atol=1e-12)
    one = refs[:1]
    scaled = one.mean() + 1.5 * (one - one.mean())
    assert np.allclose(rf.band_power_db(scaled, one), 20 * np.log10(1.5), atol=1e-9)
    # white noise of sigma 2s against white noise of sigma s: +6.02 dB in every band (sampling error only)
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.05, (16, 128, 128))
    db = rf.band_power_db(rng.normal(0, 0.1, (16, 128, 128)), noise)
    assert np.abs(db.mean(0) - 20 * np.log10(2)).max() < 0.1
    # flat art plus white noise: E_b rises by sigma^2 times the number of bins in the band (the windowed,
    # normalised spectrum of white noise is flat at sigma^2 per bin)
    sigma = 0.02
    noisy = refs + rng.normal(0, sigma, refs.shape)
    from fvae_core.spectra import band_energy, power_spectrum_2d, radial_frequencies
    f = radial_frequencies(128, 128)
    for j, (lo, hi) in enumerate(rf.BANDS):
        bins = ((f > lo) & (f <= hi)).sum()
        base = band_energy(power_spectrum_2d(refs), 128, 128, lo, hi)
        want = 10 * np.log10((base + sigma**2 * bins) / base.mean())
        got = rf.band_power_db(noisy, refs)[:, j]
        assert np.abs(got - want).max() < 0.25, (lo, got - want)


def test_band_power_rejects_mismatched_sets():
    with pytest.raises(ValueError, match="same size"):
        rf.band_power_db(np.zeros((2, 16, 16)), np.zeros((2, 16, 8)))
    with pytest.raises(ValueError, match="no power"):
        rf.band_power_db(np.zeros((2, 16, 16)), np.zeros((2, 16, 16)))


def test_measure_decodes_ranks_a_noisy_decoder():
    """Three "decoders" of the same eight latents: two identical clean ones and one adding noise of known σ.
    The clean ones measure alike (no noise); the noisy one has more top-band power, flat noise near its σ in
    Oklab L, and more total variation beside edges."""
    rng = np.random.default_rng(3)
    clean = np.stack([np.repeat(disk(64, 14 + i, blur=0.6)[..., None], 3, axis=2) for i in range(8)])
    sigma = 0.02
    noisy = np.clip(clean + rng.normal(0, sigma, clean.shape[:3])[..., None], 0, 1)  # grey noise: L noise ≈ σ
    m = rf.measure_decodes({"a": clean, "b": clean.copy(), "noisy": noisy}, clean)
    for k in rf.MEASURES:
        np.testing.assert_array_equal(m["a"][k], m["b"][k])
        assert m["a"][k].shape == (8,)
    assert np.all(m["noisy"]["hf_db"] > m["a"]["hf_db"] + 3)
    assert np.all(m["a"]["flat_noise"] < 1e-3)
    L_noise = np.std(oklab_np(noisy[0])[..., 0] - oklab_np(clean[0])[..., 0])
    assert np.nanmean(m["noisy"]["flat_noise"]) == pytest.approx(L_noise, rel=0.15)
    assert np.all(m["noisy"]["edge_ringing"] > m["a"]["edge_ringing"])
    with pytest.raises(ValueError, match="same latents"):
        rf.measure_decodes({"a": clean, "b": clean[:4]}, clean)
