"""Claim verdicts on synthetic evaluations whose effects are known by construction.

Each row set is built so that the truth of every claim is fixed: a "card" VAE whose high-band error is
half the base's on flat art and unchanged on photos (so C1 holds overall, C2 holds), and so on. The
same assessment must flip to "contradicted" when the effect is reversed, say "no effect larger than δ"
when there is none and the data are plentiful, "underpowered" (with the n that would resolve it) when
they are not, and "not measured" when the VAEs it needs are absent.
"""
from __future__ import annotations

import numpy as np
import pytest

from fvae_core import claims
from fvae_core.evaluate import EvalResult

KEYS = ("psnr", "lpips", "err_hf_energy@0.25_L", "dhf_db@0.25_L", "overshoot_mean", "flat_noise",
        "ciede2000_mean", "L_mae", "a_mae", "b_mae", "sharpness_ratio")


def _rows(effects: dict, n=40, resolutions=(64, 128), seed=0, subsets=("flat art", "photos")):
    """effects: vae -> function(base_value_dict, subset, res) -> value dict (multiplicative tweaks).
    The n images are split evenly over ``subsets``, in order."""
    rng = np.random.default_rng(seed)
    rows = []
    for res in resolutions:
        for i in range(n):
            subset = subsets[i * len(subsets) // n]
            base = {k: float(rng.uniform(0.5, 1.5)) for k in KEYS}
            base["psnr"] = float(rng.uniform(20, 30))
            base["lpips"] = float(rng.uniform(0.05, 0.2))
            # realistic scales for the δs: Oklab L overshoot and flat noise, sharpness ratio, ΔE00
            base["overshoot_mean"] = float(rng.uniform(0.01, 0.05))
            base["flat_noise"] = float(rng.uniform(0.01, 0.05))
            base["sharpness_ratio"] = float(rng.uniform(0.7, 1.0))
            base["ciede2000_mean"] = float(rng.uniform(1.0, 4.0))
            for vae, f in effects.items():
                vals = f(dict(base), subset, res, rng)
                rows.append({"vae": vae, "resolution": res, "subset": subset, "image": f"img{i}", **vals})
    return EvalResult(rows, {}, list(effects), list(resolutions), [], {}, {}, {})


def _jitter(v, rng, scale=0.005):
    return {k: x * (1 + scale * rng.standard_normal()) for k, x in v.items()}


def _card_true(v, subset, res, rng):
    v = _jitter(v, rng)
    if subset == "flat art":  # C1/C2: the high-band error halves on flat art only, more at low res (C3)
        v["err_hf_energy@0.25_L"] *= 0.3 if res == 64 else 0.5
    v["overshoot_mean"] *= 0.8  # C4
    v["flat_noise"] *= 0.8
    v["psnr"] += 0.3  # C5
    v["lpips"] *= 0.95
    return v


def _mae(v, subset, res, rng):
    v = _jitter(v, rng)
    v["flat_noise"] *= 1.5  # the mix is smoother than MAE-only
    return v


def _mse(v, subset, res, rng):
    v = _jitter(v, rng)
    v["sharpness_ratio"] *= 0.7  # the mix is sharper than MSE-only
    return v


def _srgb(v, subset, res, rng):
    v = _jitter(v, rng)
    v["ciede2000_mean"] *= 1.3  # the Oklab-loss card run has the smaller CIEDE2000
    return v


def _same(v, subset, res, rng):
    return _jitter(v, rng)


def _by_id(cs):
    return {c.id: c for c in cs}


def test_all_claims_supported_when_true():
    res = _rows({"base": _same, "card": _card_true, "mae-only": _mae, "mse-only": _mse, "srgb-loss": _srgb})
    got = _by_id(claims.assess(res, res_main=128, n_boot=500))
    assert {k: c.verdict for k, c in got.items()} == {k: claims.SUPPORTED for k in claims.CLAIMS}
    assert got["C1"].effect.hi < 0 and got["C2"].effect.hi < 0 and got["C3"].effect.hi < 0
    md = claims.claims_markdown(got.values(), "context line")
    assert md.startswith("context line") and md.count("**supported**") == 7


def test_reversed_effects_are_contradicted():
    def worse(v, subset, res, rng):
        v = _jitter(v, rng)
        v["err_hf_energy@0.25_L"] *= 2.0
        v["overshoot_mean"] *= 1.3
        v["psnr"] -= 1.0
        return v
    got = _by_id(claims.assess(_rows({"base": _same, "card": worse}), n_boot=500))
    assert got["C1"].verdict == claims.CONTRADICTED
    assert got["C4"].verdict == claims.CONTRADICTED
    assert got["C5"].verdict == claims.CONTRADICTED
    assert got["C6"].verdict == got["C7"].verdict == claims.NOT_MEASURED
    assert "srgb-loss" in got["C6"].detail


def test_no_effect_within_delta():
    """No true effect and little noise: every CI is inside ±δ."""
    got = _by_id(claims.assess(_rows({"base": _same, "card": _same}, seed=3), n_boot=500))
    for cid in ("C1", "C2", "C3", "C4"):
        assert got[cid].verdict == claims.NO_EFFECT, (cid, got[cid].effect)
        assert got[cid].n_needed is None and got[cid].delta.split()[0] == f"{claims.DELTAS[{'C4': 'oklab_l'}.get(cid, 'hf_db')][0]:g}"
    # 0.5% jitter on PSNR ~25 dB: CIs well within the 0.25 dB margin, so "no obvious loss" holds.
    assert got["C5"].verdict == claims.SUPPORTED


def test_noisy_small_sample_is_underpowered_with_the_n_that_resolves_it():
    """No true effect but 30% per-image noise on 8 images: the CIs straddle zero and reach past δ."""
    def noisy(v, subset, res, rng):
        return _jitter(v, rng, scale=0.3)
    got = _by_id(claims.assess(_rows({"base": _same, "card": noisy}, n=8, seed=1), n_boot=500))
    for cid in ("C1", "C4"):
        c = got[cid]
        assert c.verdict == claims.UNDERPOWERED, (cid, c.effect)
        assert c.n_needed is not None and c.n_needed > c.effect.n
    md = claims.claims_markdown(got.values())
    assert f"underpowered (≈{got['C1'].n_needed} images would resolve it)" in md


@pytest.mark.parametrize("est, predicted, delta, want", [
    ((-1.0, -2.0, -0.5), "negative", 0.1, claims.SUPPORTED),
    ((1.0, 0.5, 2.0), "negative", 0.1, claims.CONTRADICTED),
    ((1.0, 0.5, 2.0), "positive", 0.1, claims.SUPPORTED),
    ((-1.0, -2.0, -0.5), "positive", 0.1, claims.CONTRADICTED),
    ((0.01, -0.05, 0.07), "negative", 0.1, claims.NO_EFFECT),
    ((0.01, -0.05, 0.07), "negative", 0.06, claims.UNDERPOWERED),
    ((0.1, -0.5, 0.7), "negative", 0.1, claims.UNDERPOWERED),
    ((-0.3, -0.5, 0.0), "negative", 1.0, claims.NO_EFFECT),  # inside ±δ although it leans the right way
    ((0.0, -0.5, 0.5), "negative", 0.5, claims.UNDERPOWERED),  # touching ±δ is not inside it
    ((-0.05, -0.08, -0.02), "negative", 0.1, claims.SUPPORTED),  # resolved beats small: the sign comes first
    ((1.0, float("nan"), float("nan")), "positive", 0.1, claims.UNDERPOWERED),
])
def test_verdict_from_ci(est, predicted, delta, want):
    from fvae_core.stats import Estimate

    assert claims.verdict_from_ci(Estimate(*est, 10), predicted, delta) == want
    assert claims.verdict_from_ci(None, predicted, delta) == claims.NOT_MEASURED


def test_n_to_resolve_scales_the_half_width_as_one_over_root_n():
    from fvae_core.stats import Estimate

    # mean 0.2, half-width 0.4 at n=10, δ=0.1: excluding zero needs the half-width at 0.2, i.e. 4x the images.
    assert claims.n_to_resolve(Estimate(0.2, -0.2, 0.6, 10), 0.1) == 40
    # mean 0.02, half-width 0.1 at n=10, δ=0.1: fitting inside ±δ needs half-width 0.08 (n=16); zero: 250.
    assert claims.n_to_resolve(Estimate(0.02, -0.08, 0.12, 10), 0.1) == 16
    assert claims.n_to_resolve(Estimate(0.2, float("nan"), float("nan"), 10), 0.1) is None


def test_n_to_resolve_predicts_a_resolving_sample_size():
    """Simulated: a true effect of -0.3 with unit noise, 12 images. The predicted n is where the expected
    CI just touches zero (50% power); at 4x that n the CI excludes zero in most fresh samples."""
    from fvae_core import stats

    est = stats.bootstrap_ci(np.random.default_rng(0).normal(-0.3, 1.0, 12), n_boot=1000)
    assert claims.verdict_from_ci(est, "negative", 0.1) == claims.UNDERPOWERED
    n = claims.n_to_resolve(est, 0.1)
    assert 12 < n < 2000
    resolved = [claims.verdict_from_ci(stats.bootstrap_ci(np.random.default_rng(s).normal(-0.3, 1.0, 4 * n),
                                                          n_boot=1000), "negative", 0.1) == claims.SUPPORTED
                for s in range(1, 11)]
    assert sum(resolved) >= 7, resolved


def test_c2_with_a_painterly_subset_needs_both_contrasts():
    """Three subsets: the effect on flat art only, so flat − photos and flat − painterly both hold; an effect
    on flat art and paintings alike leaves flat − painterly null, and C2 is then not supported."""
    def rows(painterly_too):
        def card(v, subset, res, rng):
            v = _jitter(v, rng)
            if subset == "flat art" or (painterly_too and subset == "painterly"):
                v["err_hf_energy@0.25_L"] *= 0.5
            return v
        return _rows({"base": _same, "card": card}, n=60, subsets=("flat art", "photos", "painterly"))
    c2 = _by_id(claims.assess(rows(False), res_main=128, n_boot=500))["C2"]
    assert c2.verdict == claims.SUPPORTED and set(c2.effects) >= {"flat − photos", "flat − painterly"}
    c2 = _by_id(claims.assess(rows(True), res_main=128, n_boot=500))["C2"]
    assert c2.verdict == claims.NO_EFFECT, c2.effects
    assert c2.effects["flat − photos"].hi < 0 and abs(c2.effects["flat − painterly"].value) < 0.1


def _generated(effect_small, effect_large, ring, noise, n=64, seed=0):
    """Synthetic reference-free measures: card = base + a known effect (+ small per-latent noise)."""
    rng = np.random.default_rng(seed)
    out = {}
    for px, eff in ((64, effect_small), (128, effect_large)):
        base = {"hf_db": rng.normal(0, 1, n), "flat_noise": rng.uniform(0.01, 0.02, n),
                "edge_ringing": rng.uniform(0.05, 0.1, n)}
        card = {"hf_db": base["hf_db"] + eff + rng.normal(0, 0.05, n),
                "flat_noise": base["flat_noise"] + noise + rng.normal(0, 1e-4, n),
                "edge_ringing": base["edge_ringing"] + ring + rng.normal(0, 1e-4, n)}
        out[px] = {"base": base, "card": card}
    return out


def test_generated_claims_follow_known_effects():
    found = {c.id: c for c in claims.assess_generated(_generated(-1.0, -0.3, -0.01, -0.005), [64, 128])}
    assert found["C1"].verdict == claims.SUPPORTED and found["C1"].effect.value == pytest.approx(-1.0, abs=0.05)
    assert found["C2"].verdict == claims.NOT_MEASURED and "flat art only" in found["C2"].detail
    assert found["C3"].verdict == claims.SUPPORTED and found["C3"].effect.value == pytest.approx(-0.7, abs=0.05)
    assert found["C4"].verdict == claims.SUPPORTED
    rev = {c.id: c for c in claims.assess_generated(_generated(1.0, 0.3, 0.01, 0.005), [64, 128])}
    assert [rev[k].verdict for k in ("C1", "C3", "C4")] == [claims.CONTRADICTED] * 3
    none = {c.id: c for c in claims.assess_generated(_generated(0.0, 0.0, 0.0, 0.0), [64, 128])}
    assert none["C1"].verdict == claims.NO_EFFECT and none["C4"].verdict == claims.NO_EFFECT
    one = {c.id: c for c in claims.assess_generated({64: _generated(-1, -1, 0, 0)[64]}, [64])}
    assert one["C3"].verdict == claims.NOT_MEASURED


def test_claims_by_kind_table():
    gen = claims.assess_generated(_generated(-1.0, -0.3, -0.01, -0.005), [64, 128])
    rev = claims.assess_generated(_generated(1.0, 0.3, 0.01, 0.005), [64, 128])
    md = claims.claims_by_kind_markdown({"supported kind": gen, "reversed kind": rev})
    lines = md.splitlines()
    assert lines[0] == "| claim | supported kind | reversed kind |"
    rows = {x.split("**")[1]: x.split(" | ")[1:] for x in lines if x.startswith("| **C")}
    assert list(rows) == ["C1", "C2", "C3", "C4"] and claims.KINDS_NOTE in md
    assert "**supported**" in rows["C1"][0] and "**contradicted**" in rows["C1"][1]  # each column its own kind
    assert float(rows["C1"][0].split()[0]) == pytest.approx(-1.0, abs=0.05)
    assert float(rows["C1"][1].split()[0]) == pytest.approx(1.0, abs=0.05)
    assert rows["C2"][0].strip() == "not measured"
