"""Bootstrap statistics against analytic cases: the normal-theory interval, coverage, pairing, NaNs."""
import numpy as np
import pytest

from fvae_core.stats import Estimate, bootstrap_ci, paired_difference, summarise


def test_half_width_matches_normal_theory():
    sigma, n = 2.0, 400
    x = np.random.default_rng(1).normal(5.0, sigma, n)
    est = bootstrap_ci(x, n_boot=4000, seed=3)
    assert est.n == n and est.value == pytest.approx(x.mean())
    assert est.lo < est.value < est.hi
    assert est.half_width == pytest.approx(1.96 * sigma / np.sqrt(n), rel=0.10)


def test_coverage_of_the_true_mean():
    rng = np.random.default_rng(7)
    hits = [(e := bootstrap_ci(rng.normal(1.0, 1.0, 100), n_boot=1000, seed=i)).lo <= 1.0 <= e.hi for i in range(200)]
    assert 0.90 <= np.mean(hits) <= 0.99


def test_paired_difference_resolves_a_shift_hidden_by_image_spread():
    rng = np.random.default_rng(0)
    difficulty = rng.normal(30.0, 3.0, 60)  # per-image spread, e.g. PSNR of easy vs hard photographs
    a = difficulty + 0.2 + rng.normal(0.0, 0.05, 60)
    b = difficulty + rng.normal(0.0, 0.05, 60)
    d = paired_difference(a, b, seed=0)
    assert d.lo > 0.0 and d.value == pytest.approx(np.mean(a - b))
    # unpaired, the shift is well inside either mean's interval: the CIs of a and b overlap widely
    ea, eb = bootstrap_ci(a, seed=0), bootstrap_ci(b, seed=1)
    assert ea.lo < eb.value < ea.hi and eb.lo < ea.value < eb.hi
    assert 0.2 < ea.half_width


def test_paired_difference_needs_equal_lengths():
    with pytest.raises(ValueError, match="same shape"):
        paired_difference(np.ones(5), np.ones(4))


def test_nans_are_dropped_and_counted():
    x = np.array([1.0, np.nan, 3.0, 2.0, np.nan])
    est = bootstrap_ci(x, seed=0)
    assert est.n == 3 and est.value == pytest.approx(2.0)
    assert est == bootstrap_ci(x[~np.isnan(x)], seed=0)
    empty = bootstrap_ci(np.array([np.nan, np.nan]))
    assert empty.n == 0 and np.isnan(empty.value) and np.isnan(empty.lo) and np.isnan(empty.hi)
    assert bootstrap_ci(np.array([])).n == 0
    one = bootstrap_ci(np.array([np.nan, 4.0]))
    assert one.n == 1 and one.value == 4.0 and np.isnan(one.lo) and np.isnan(one.hi)
    # a NaN on either side drops the pair
    d = paired_difference(np.array([1.0, np.nan, 3.0, 5.0]), np.array([0.0, 1.0, np.nan, 1.0]), seed=0)
    assert d.n == 2 and d.value == pytest.approx(2.5)


@pytest.mark.parametrize("stat", ["mean", "median"])
def test_columns_equal_column_by_column_runs(stat):
    x = np.random.default_rng(2).lognormal(0.0, 1.0, (40, 6))
    x[[3, 7, 11], 2] = np.nan  # a column with fewer values still matches its 1-D run
    x[:, 4] = np.nan
    x[1:, 5] = np.nan
    est = bootstrap_ci(x, n_boot=500, seed=11, stat=stat)
    assert est.value.shape == est.lo.shape == est.hi.shape == est.n.shape == (6,)
    assert list(est.n) == [40, 40, 37, 40, 0, 1]
    for j in range(6):
        col = bootstrap_ci(x[:, j], n_boot=500, seed=11, stat=stat)
        assert est.n[j] == col.n
        np.testing.assert_allclose([est.value[j], est.lo[j], est.hi[j]], [col.value, col.lo, col.hi],
                                   rtol=1e-12, atol=0, equal_nan=True)


def test_columns_without_nans_share_resample_indices():
    # column 1 = 2 * column 0 + 1: with one set of indices every replicate of the mean maps the same way
    x0 = np.random.default_rng(4).normal(size=50)
    est = bootstrap_ci(np.stack([x0, 2 * x0 + 1], axis=1), n_boot=300, seed=5)
    np.testing.assert_allclose(est.lo[1], 2 * est.lo[0] + 1, rtol=1e-12)
    np.testing.assert_allclose(est.hi[1], 2 * est.hi[0] + 1, rtol=1e-12)


def test_deterministic_with_seed():
    x = np.random.default_rng(5).normal(size=30)
    assert bootstrap_ci(x, seed=4) == bootstrap_ci(x, seed=4)
    assert bootstrap_ci(x, seed=4) != bootstrap_ci(x, seed=5)
    assert bootstrap_ci(x, seed=4, stat="median").value == pytest.approx(np.median(x))


def test_bad_arguments():
    with pytest.raises(ValueError, match="stat"):
        bootstrap_ci(np.ones(3), stat="mode")
    with pytest.raises(ValueError, match="shape"):
        bootstrap_ci(np.ones((2, 2, 2)))
    with pytest.raises(ValueError, match="ci"):
        bootstrap_ci(np.ones(3), ci=95)


def test_fmt():
    assert Estimate(0.1234, 0.10111, 0.1449, 9).fmt(3) == "0.123 [0.101, 0.145]"
    with pytest.raises(ValueError, match="scalar"):
        Estimate(np.zeros(2), np.zeros(2), np.zeros(2), np.zeros(2, int)).fmt()


def test_summarise_groups_and_keys():
    rows = [{"subset": "photos", "psnr": 30.0, "lpips": 0.1},
            {"subset": "emoji", "psnr": 40.0},
            {"subset": "photos", "psnr": 32.0, "lpips": 0.3},
            {"subset": "emoji", "psnr": 42.0, "lpips": None}]
    s = summarise(rows, ["psnr", "lpips"], by="subset", n_boot=200)
    assert list(s) == ["photos", "emoji"]
    assert s["photos"]["psnr"].value == pytest.approx(31.0) and s["photos"]["psnr"].n == 2
    assert s["photos"]["lpips"].value == pytest.approx(0.2)
    assert s["emoji"]["lpips"].n == 0 and np.isnan(s["emoji"]["lpips"].value)
    whole = summarise(rows, ["psnr"], n_boot=200)
    assert list(whole) == ["all"] and whole["all"]["psnr"] == bootstrap_ci([30.0, 40.0, 32.0, 42.0], n_boot=200)
    with pytest.raises(KeyError, match="resolution"):
        summarise(rows, ["psnr"], by="resolution")


def test_infinite_values_keep_their_mean():
    """An exact reconstruction has PSNR = inf: the bootstrap must say inf, not NaN."""
    from fvae_core.stats import bootstrap_ci

    e = bootstrap_ci(np.array([[np.inf, 1.0], [np.inf, 2.0], [np.inf, 3.0]]), n_boot=50)
    assert np.all(np.isinf(e.value[:1])) and np.isinf(e.lo[0]) and np.isinf(e.hi[0])
    assert 1.0 <= e.lo[1] <= e.value[1] == 2.0 <= e.hi[1] <= 3.0
    mixed = bootstrap_ci(np.array([np.inf, 1.0, 2.0, 3.0]), n_boot=200, seed=1)
    assert mixed.value == np.inf and mixed.hi == np.inf


def test_unpaired_difference_width_and_detection():
    """Two independent normal samples: the CI half width is about 1.96·sqrt(σa²/na + σb²/nb)."""
    from fvae_core.stats import unpaired_difference

    rng = np.random.default_rng(7)
    a, b = rng.normal(1.0, 2.0, 300), rng.normal(0.0, 1.0, 200)
    e = unpaired_difference(a, b, n_boot=4000, seed=1)
    want = 1.96 * np.sqrt(4.0 / 300 + 1.0 / 200)
    assert e.hi - e.lo == pytest.approx(2 * want, rel=0.1)
    assert e.lo > 0 and e.value == pytest.approx(a.mean() - b.mean())
    same = unpaired_difference(rng.normal(0, 1, 100), rng.normal(0, 1, 100), seed=2)
    assert same.lo < 0 < same.hi or abs(same.value) < 0.3
    assert np.isnan(unpaired_difference([1.0], [2.0, 3.0]).lo)
