"""The Furception v1.0 model card's claims, each turned into a measured effect with a CI and a verdict.

Claims C1–C5 are quoted or paraphrased from the card (``shared/reference/furception-model-card.txt``);
C6 and C7 are the card's reasons for its loss design. Each :class:`Claim` names the metric chosen and
why, its smallest effect of interest δ and why, the measured effect (an :class:`fvae_core.stats.Estimate`:
mean and 95% bootstrap CI over images), and a verdict from the CI and δ alone, never from the point
estimate (:func:`verdict_from_ci`):

* **supported**: the CI lies entirely beyond zero on the side the claim predicts (this comes first: a
  resolved effect smaller than δ is still supported, and its CI in the table shows how small);
* **contradicted**: the CI lies entirely beyond zero on the other side;
* **no effect larger than δ**: the CI lies inside ±δ (an effect may exist, but it is too small to matter);
* **underpowered**: anything else (the CI straddles zero and reaches past δ), with the number of images
  that would resolve it (:func:`n_to_resolve`).

C5 is a non-inferiority claim with stated margins: supported when every subset's CI excludes an obvious
loss, contradicted when one subset's CI lies entirely beyond it, underpowered otherwise. A claim with two
parts (C4, C7) is supported when both are, contradicted when either is, "no effect" when either part is
at most δ and none is contradicted, and underpowered otherwise. All comparisons are paired on the same
images (:meth:`fvae_core.evaluate.EvalResult.paired`), except C2, which compares two different image sets.

The inputs are one :class:`~fvae_core.evaluate.EvalResult` holding the base VAE, the finetuned VAE
("card" recipe) and, for C6/C7, the ablation VAEs, named as in :data:`ROLES`. A claim whose VAEs or
subsets are missing gets the verdict "not measured" and says what is missing.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from fvae_core import stats

SUPPORTED, CONTRADICTED, NO_EFFECT, UNDERPOWERED, NOT_MEASURED = (
    "supported", "contradicted", "no effect larger than δ", "underpowered", "not measured")
VERDICTS = (SUPPORTED, CONTRADICTED, NO_EFFECT, UNDERPOWERED, NOT_MEASURED)

#: VAE names the assessment looks for in the evaluation.
ROLES = {"base": "base", "card": "card", "mae": "mae-only", "mse": "mse-only", "srgb": "srgb-loss"}

#: The card's claims, in its words where it has them.
CLAIMS = {
    "C1": "Removes unwanted high-frequency noise.",
    "C2": "The effect is more apparent on flat-coloured images than on realistic or painterly ones.",
    "C3": "The effect is more noticeable at lower resolutions.",
    "C4": "Smoother overall, with less artifacting around edges in high-detail regions.",
    "C5": "No obvious loss of performance on any type of image.",
    "C6": "The Oklab loss prioritises the perceptually significant channels.",
    "C7": "The MAE/MSE mix balances sharpness and smoothness.",
}

HF_KEY = "err_hf_energy@0.25_L"
#: C5's non-inferiority margins: a PSNR loss of 0.25 dB or an LPIPS rise of 0.005 counts as "obvious".
PSNR_MARGIN, LPIPS_MARGIN = 0.25, 0.005

#: Smallest effects of interest: (δ, why). An effect whose CI lies inside ±δ is reported as none.
DELTAS = {
    "hf_db": (0.1, "0.1 dB is 2.3% of the high-band error energy, far below what a viewer or a downstream "
                   "metric notices; the card speaks of a visible change"),
    "oklab_l": (0.002, "a tenth of Oklab's just-noticeable difference (ΔE_ok ≈ 0.02) in lightness"),
    "de00": (0.1, "a tenth of CIEDE2000's just-noticeable difference (ΔE00 ≈ 1)"),
    "sharpness": (0.01, "a 1% change of the mean gradient across edges"),
}


@dataclasses.dataclass
class Claim:
    id: str
    claim: str
    metric: str  # what was measured
    why: str  # why this metric tests the claim
    effect: stats.Estimate | None  # the headline effect
    unit: str
    verdict: str
    detail: str = ""  # secondary numbers, in words
    effects: dict = dataclasses.field(default_factory=dict)  # label -> Estimate (for the figure)
    delta: str = ""  # the smallest effect of interest, with its reason
    n_needed: int | None = None  # underpowered: images (for C2: in the smaller group) that would resolve it
    delta_value: float | None = None  # δ in the unit of every entry of `effects`, when they share one


def verdict_from_ci(est: stats.Estimate | None, predicted: str, delta: float) -> str:
    """The verdict of the module docstring. ``predicted`` is "negative" or "positive": the sign of the
    effect the claim predicts; ``delta`` > 0 the smallest effect of interest, in the effect's unit."""
    if est is None:
        return NOT_MEASURED
    if not np.isfinite(est.lo) or not np.isfinite(est.hi):
        return UNDERPOWERED
    lo, hi = (est.lo, est.hi) if predicted == "positive" else (-est.hi, -est.lo)
    if lo > 0:
        return SUPPORTED
    if hi < 0:
        return CONTRADICTED
    if -delta < lo and hi < delta:
        return NO_EFFECT
    return UNDERPOWERED


def n_to_resolve(est: stats.Estimate | None, delta: float) -> int | None:
    """Images (per group, for an unpaired difference) at which an underpowered estimate would resolve,
    if its mean and spread stayed as measured: the CI half-width shrinks as 1/√n, and the interval
    resolves once it is narrower than the mean's distance to zero (an effect) or to ±δ (no effect).
    None when the estimate has no finite interval."""
    if est is None or not (np.isfinite(est.lo) and np.isfinite(est.hi)) or est.n < 2:
        return None
    h, m = float(est.half_width), abs(float(est.value))
    if h <= 0:
        return int(est.n)
    targets = [t for t in (m, delta - m) if t > 0]
    if not targets:
        return None
    return int(math.ceil(est.n * (h / max(targets)) ** 2))


def _combine(verdicts: Sequence[str]) -> str:
    """One verdict for a claim with several parts (each must hold for the claim to hold)."""
    if NOT_MEASURED in verdicts:
        return NOT_MEASURED
    if CONTRADICTED in verdicts:
        return CONTRADICTED
    if all(v == SUPPORTED for v in verdicts):
        return SUPPORTED
    return NO_EFFECT if NO_EFFECT in verdicts else UNDERPOWERED


def _judge(parts: Sequence[tuple[stats.Estimate, str, str]]) -> tuple[str, int | None]:
    """Verdict and, when underpowered, the n that would resolve every underpowered part. Each part is
    ``(estimate, predicted side, key of its δ in DELTAS)``."""
    verdicts = [verdict_from_ci(e, side, DELTAS[key][0]) for e, side, key in parts]
    v = _combine(verdicts)
    if v != UNDERPOWERED:
        return v, None
    return v, _max_n([n_to_resolve(e, DELTAS[key][0]) for (e, _, key), pv in zip(parts, verdicts)
                      if pv == UNDERPOWERED])


def _max_n(ns: Sequence[int | None]) -> int | None:
    """The n that resolves every part, or None when one of them cannot say."""
    return None if not ns or any(n is None for n in ns) else max(ns)


def _delta(key: str, unit: str) -> str:
    d, why = DELTAS[key]
    return f"{d:g} {unit}: {why}".replace("  ", " ")


def _per_image_db(result, a: str, b: str, res: int, key: str, subset=None) -> dict[str, float]:
    """{image: 10·log10(key_b / key_a)} over images where both are positive and finite."""
    ra = {r["image"]: r[key] for r in result.select(a, res, subset)}
    rb = {r["image"]: r[key] for r in result.select(b, res, subset)}
    out = {}
    for img, va in ra.items():
        vb = rb.get(img)
        if vb is not None and va > 0 and vb > 0 and math.isfinite(va) and math.isfinite(vb):
            out[img] = 10.0 * math.log10(vb / va)
    return out


def _missing(result, names) -> list[str]:
    return [n for n in names if n not in result.vaes]


def _not_measured(cid, metric, why, unit, missing) -> Claim:
    return Claim(cid, CLAIMS[cid], metric, why, None, unit, NOT_MEASURED, f"missing: {', '.join(missing)}")


def assess(result, *, res_main: int | None = None, roles: dict | None = None, n_boot: int = 2000) -> list[Claim]:
    """Every claim of :data:`CLAIMS`, measured on ``result`` (see the module docstring)."""
    r = {**ROLES, **(roles or {})}
    base, card = r["base"], r["card"]
    res_main = res_main or max(result.resolutions)
    lo_res, hi_res = min(result.resolutions), max(result.resolutions)
    kw = {"n_boot": n_boot}
    out = []

    # C1: the high-frequency part of the reconstruction error, per image, finetuned vs base.
    metric1 = f"high-band (f > 1/4 cycle/px) error energy of Oklab L, finetuned vs base, at {res_main}²"
    why1 = ("Noise a decoder adds (or detail it smears) shows up as error energy in the top band; the card's "
            "claim is that finetuning lowers it. Per image in dB, so every image weighs the same.")
    if miss := _missing(result, [base, card]):
        out.append(_not_measured("C1", metric1, why1, "dB", miss))
    else:
        db = _per_image_db(result, base, card, res_main, HF_KEY)
        est = stats.bootstrap_ci(np.array(list(db.values())), **kw)
        dhf = result.paired(base, card, ["dhf_db@0.25_L"], **kw).get(res_main, {}).get("all", {}).get("dhf_db@0.25_L")
        effects = {f"all, {res_main}²": est}
        for s in result.subsets():
            sub = _per_image_db(result, base, card, res_main, HF_KEY, s)
            effects[f"{s}, {res_main}²"] = stats.bootstrap_ci(np.array(list(sub.values())), **kw)
        v, n = _judge([(est, "negative", "hf_db")])
        out.append(Claim("C1", CLAIMS["C1"], metric1, why1, est, "dB", v,
                         f"reconstruction high-band power change ΔHF(card) − ΔHF(base): {dhf.fmt(2)} dB" if dhf else "",
                         effects, _delta("hf_db", "dB"), n, DELTAS["hf_db"][0]))

    # C2: the same per-image effect, flat art vs photos (independent image sets).
    metric2 = f"C1's per-image effect (dB) on flat art minus on photos (and minus on paintings), at {res_main}²"
    why2 = ("If the effect is stronger on flat colours, flat art's high-band error falls by more dB than that of "
            "photos (and of paintings, when the painterly subset is there).")
    subsets = result.subsets()
    if miss := _missing(result, [base, card]) or [s for s in ("flat art", "photos") if s not in subsets]:
        out.append(_not_measured("C2", metric2, why2, "dB", miss))
    else:
        flat = list(_per_image_db(result, base, card, res_main, HF_KEY, "flat art").values())
        effects, parts, sizes = {"flat art": stats.bootstrap_ci(np.array(flat), **kw)}, [], []
        for other in [s for s in ("photos", "painterly") if s in subsets]:
            vals = list(_per_image_db(result, base, card, res_main, HF_KEY, other).values())
            est_o = stats.unpaired_difference(flat, vals, **kw)
            effects[other] = stats.bootstrap_ci(np.array(vals), **kw)
            effects[f"flat − {other}"] = est_o
            parts.append((est_o, "negative", "hf_db"))
            sizes.append(f"{other} n={len(vals)}")
        # n_to_resolve of an unpaired difference: the smaller group's size (its spread dominates the CI)
        v, n = _judge(parts)
        out.append(Claim("C2", CLAIMS["C2"], metric2, why2, parts[0][0], "dB", v,
                         f"flat art n={len(flat)}, {', '.join(sizes)}"
                         + (f"; flat − painterly {effects['flat − painterly'].fmt(3)} dB" if len(parts) > 1 else ""),
                         effects, _delta("hf_db", "dB"), n, DELTAS["hf_db"][0]))

    # C3: the per-image effect at the lowest vs the highest resolution, paired by image.
    metric3 = f"C1's per-image effect (dB) at {lo_res}² minus at {hi_res}², same images"
    why3 = "A stronger effect at low resolution means a more negative dB change there than at high resolution."
    if miss := _missing(result, [base, card]) or ([] if lo_res != hi_res else ["a second resolution"]):
        out.append(_not_measured("C3", metric3, why3, "dB", miss))
    else:
        low = _per_image_db(result, base, card, lo_res, HF_KEY)
        high = _per_image_db(result, base, card, hi_res, HF_KEY)
        common = [i for i in low if i in high]
        est = stats.paired_difference(np.array([low[i] for i in common]), np.array([high[i] for i in common]), **kw)
        effects = {f"{res}²": stats.bootstrap_ci(np.array(list(_per_image_db(result, base, card, res, HF_KEY).values())), **kw)
                   for res in result.resolutions}
        effects[f"{lo_res}² − {hi_res}²"] = est
        v, n = _judge([(est, "negative", "hf_db")])
        out.append(Claim("C3", CLAIMS["C3"], metric3, why3, est, "dB", v,
                         f"n={len(common)} images at both resolutions", effects, _delta("hf_db", "dB"), n, DELTAS["hf_db"][0]))

    # C4: ringing around edges and noise in flat regions, finetuned − base.
    metric4 = f"ringing overshoot in the band 1–6 px from edges, and flat-region error std, finetuned − base, at {res_main}²"
    why4 = ("'Artifacting around edges' is overshoot beyond the local min/max next to an edge (ringing); "
            "'smoother' is less error variation where the original is flat.")
    if miss := _missing(result, [base, card]):
        out.append(_not_measured("C4", metric4, why4, "", miss))
    else:
        p = result.paired(base, card, ["overshoot_mean", "flat_noise"], **kw)[res_main]["all"]
        d = DELTAS["oklab_l"][0]
        v, n = _judge([(p["overshoot_mean"], "negative", "oklab_l"), (p["flat_noise"], "negative", "oklab_l")])
        out.append(Claim("C4", CLAIMS["C4"], metric4, why4, p["overshoot_mean"], "Oklab L", v,
                         f"flat-region noise change {p['flat_noise'].fmt(4)}",
                         {"overshoot": p["overshoot_mean"], "flat noise": p["flat_noise"]},
                         _delta("oklab_l", "Oklab L (both parts)"), n, d))

    # C5: non-inferiority of PSNR and LPIPS on every subset and resolution.
    metric5 = (f"PSNR and LPIPS, finetuned − base, per subset and resolution; an 'obvious loss' is a PSNR drop "
               f"> {PSNR_MARGIN} dB or an LPIPS rise > {LPIPS_MARGIN}")
    why5 = "'No obvious loss on any type' is a non-inferiority claim: every subset's CI must exclude an obvious loss."
    if miss := _missing(result, [base, card]):
        out.append(_not_measured("C5", metric5, why5, "dB", miss))
    else:
        pairs = result.paired(base, card, ["psnr", "lpips"], **kw)
        verdicts, effects, worst, ns = [], {}, None, []
        for res, groups in pairs.items():
            for g, e in groups.items():
                if g == "all":
                    continue
                ps, lp = e["psnr"], e["lpips"]
                effects[f"{g}, {res}² PSNR"] = ps
                ok = ps.lo > -PSNR_MARGIN and (not np.isfinite(lp.hi) or lp.hi < LPIPS_MARGIN)
                bad = ps.hi < -PSNR_MARGIN or (np.isfinite(lp.lo) and lp.lo > LPIPS_MARGIN)
                verdicts.append(SUPPORTED if ok else CONTRADICTED if bad else UNDERPOWERED)
                if not ok and not bad:  # the n at which the PSNR CI would clear the margin, if it can
                    ns.append(n_to_resolve(stats.Estimate(ps.value + PSNR_MARGIN, ps.lo + PSNR_MARGIN,
                                                          ps.hi + PSNR_MARGIN, ps.n), 0.0))
                if worst is None or ps.value < worst[1].value:
                    worst = (f"{g} at {res}²", ps, lp)
        v = _combine(verdicts) if verdicts else NOT_MEASURED
        n = _max_n(ns) if v == UNDERPOWERED else None
        out.append(Claim("C5", CLAIMS["C5"], metric5, why5, worst[1] if worst else None, "dB PSNR", v,
                         f"worst subset: {worst[0]}, PSNR {worst[1].fmt(2)} dB, LPIPS {worst[2].fmt(4)}" if worst else "",
                         effects, f"the non-inferiority margins ({PSNR_MARGIN} dB, {LPIPS_MARGIN} LPIPS)", n))

    # C6: Oklab vs sRGB loss space, judged by a colour difference independent of both (CIEDE2000 via CIELAB).
    srgb = r["srgb"]
    metric6 = f"CIEDE2000 (CIELAB, independent of the training space), Oklab-loss − sRGB-loss finetune, at {res_main}²"
    why6 = ("If an Oklab loss spends its effort on the channels people see, the result should have a smaller "
            "perceptual colour difference measured in a third space, not just a smaller Oklab error.")
    if miss := _missing(result, [card, srgb]):
        out.append(_not_measured("C6", metric6, why6, "ΔE00", miss))
    else:
        p = result.paired(srgb, card, ["ciede2000_mean", "L_mae", "a_mae", "b_mae"], **kw)[res_main]["all"]
        v, n = _judge([(p["ciede2000_mean"], "negative", "de00")])
        out.append(Claim("C6", CLAIMS["C6"], metric6, why6, p["ciede2000_mean"], "ΔE00", v,
                         f"Oklab MAE change L {p['L_mae'].fmt(4)}, a {p['a_mae'].fmt(4)}, b {p['b_mae'].fmt(4)}",
                         {"ΔE2000": p["ciede2000_mean"]}, _delta("de00", "ΔE00"), n,
                         DELTAS["de00"][0]))

    # C7: the mix vs the pure losses: sharper than MSE-only and smoother (flat regions) than MAE-only.
    mae, mse = r["mae"], r["mse"]
    metric7 = (f"edge sharpness ratio, mix − MSE-only (should be > 0), and flat-region noise, mix − MAE-only "
               f"(should be < 0), at {res_main}²")
    why7 = ("MSE's gradient is proportional to the error and averages across edges (blur); MAE's is its sign and "
            "keeps edges but tolerates small noise. A balance is sharper than MSE alone and smoother than MAE alone.")
    if miss := _missing(result, [card, mae, mse]):
        out.append(_not_measured("C7", metric7, why7, "", miss))
    else:
        ps = result.paired(mse, card, ["sharpness_ratio"], **kw)[res_main]["all"]["sharpness_ratio"]
        pn = result.paired(mae, card, ["flat_noise"], **kw)[res_main]["all"]["flat_noise"]
        v, n = _judge([(ps, "positive", "sharpness"), (pn, "negative", "oklab_l")])
        out.append(Claim("C7", CLAIMS["C7"], metric7, why7, ps, "sharpness ratio", v,
                         f"flat-region noise, mix − MAE-only: {pn.fmt(4)}",
                         {"sharpness: mix − MSE": ps, "flat noise: mix − MAE": pn},
                         f"{_delta('sharpness', 'sharpness ratio')}; {_delta('oklab_l', 'Oklab L flat noise')}", n))
    return out


#: Latent kinds of the per-kind table (issue 28): what the decoders decode.
KINDS_NOTE = ("encoded: the posterior mean of a real image (the numbers above); perturbed σ: that latent plus "
              "Gaussian noise of σ times the latents' std, decoded and compared with the original image; "
              "generated: a latent sampled by the latent flow model, with no original, so measured without "
              "a reference")


def assess_generated(measures: dict, sizes: Sequence[int], *, base: str = "base", card: str = "card",
                     n_boot: int = 2000) -> list[Claim]:
    """C1–C4 on *generated* latents, from reference-free measures
    (:func:`fvae_core.reference_free.measure_decodes`): ``measures[size][vae][measure]`` per latent, for
    decodes of ``size``² pixels (the first of ``sizes`` is the main one, the latent model's own size).

    * C1: the decodes' high-band power (f > 1/4 cycle/px, dB against real images), card − base, paired by
      latent: removing noise lowers it.
    * C2: not measured: the latent model generates flat art only (it was trained on OpenMoji).
    * C3: C1's per-latent effect at the smaller size minus at the larger (different latents: unpaired).
    * C4: one-sided excess total variation beside edges (ringing) and flat-region noise, card − base.
    Verdicts and δs as in :func:`assess`."""
    kw = {"n_boot": n_boot}
    main, out = sizes[0], []
    m = measures[main]

    def change(size, measure="hf_db"):  # card − base per latent: the decodes of one latent are paired
        return measures[size][card][measure] - measures[size][base][measure]

    d1 = change(main)
    est = stats.bootstrap_ci(d1, **kw)
    v, n = _judge([(est, "negative", "hf_db")])
    effects = {f"{s}²": stats.bootstrap_ci(change(s), **kw) for s in sizes}
    out.append(Claim("C1", CLAIMS["C1"], f"high-band power of the decodes (dB vs real images), card − base, at {main}²",
                     "Without a reference the added noise is the power itself: a decoder that removes noise "
                     "decodes the same latent with less top-band power.", est, "dB", v,
                     f"n={len(d1)} generated latents", effects, _delta("hf_db", "dB"), n, DELTAS["hf_db"][0]))
    out.append(_not_measured("C2", "—", "The latent model was trained on flat art only.", "dB",
                             ["generated photos and paintings (the latent model makes flat art only)"]))
    if len(sizes) > 1:
        lo, hi = sorted(sizes)[0], sorted(sizes)[-1]
        dlo, dhi = change(lo), change(hi)
        est3 = stats.unpaired_difference(dlo, dhi, **kw)
        v3, n3 = _judge([(est3, "negative", "hf_db")])
        out.append(Claim("C3", CLAIMS["C3"], f"C1's per-latent effect at {lo}² minus at {hi}² (different latents)",
                         "A stronger effect at low resolution is a more negative change there.", est3, "dB", v3,
                         f"n={len(dlo)} and {len(dhi)} latents", {**effects, f"{lo}² − {hi}²": est3},
                         _delta("hf_db", "dB"), n3, DELTAS["hf_db"][0]))
    else:
        out.append(_not_measured("C3", "—", "needs two latent sizes", "dB", ["a second latent size"]))
    ring = stats.bootstrap_ci(change(main, "edge_ringing"), **kw)
    noise = stats.bootstrap_ci(change(main, "flat_noise"), **kw)
    v4, n4 = _judge([(ring, "negative", "oklab_l"), (noise, "negative", "oklab_l")])
    out.append(Claim("C4", CLAIMS["C4"], f"excess total variation beside edges and flat-region noise (Immerkær), "
                     f"card − base, at {main}², regions from the median of all decoders' decodes",
                     "Ringing is variation beside an edge beyond its net step; smoothness is less noise where "
                     "the image is flat.", ring, "Oklab L", v4, f"flat-region noise change {noise.fmt(4)}",
                     {"ringing": ring, "flat noise": noise}, _delta("oklab_l", "Oklab L (both parts)"), n4,
                     DELTAS["oklab_l"][0]))
    return out


def claims_by_kind_markdown(by_kind: dict[str, Sequence[Claim]], ids=("C1", "C2", "C3", "C4")) -> str:
    """One row per claim, one column per latent kind: effect [95% CI] and verdict (``figures/claims_by_kind.md``)."""
    kinds = list(by_kind)
    lines = ["| claim | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for cid in ids:
        cells = []
        for k in kinds:
            c = next((c for c in by_kind[k] if c.id == cid), None)
            if c is None or c.effect is None or not np.isfinite(c.effect.value):
                cells.append(f"{c.verdict if c else NOT_MEASURED}")
                continue
            digits = 4 if abs(c.effect.value) < 0.01 else 3
            cells.append(f"{c.effect.fmt(digits)} {c.unit}: **{c.verdict}**")
        lines.append(f"| **{cid}** {CLAIMS[cid]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + KINDS_NOTE + ".\n"


def claims_markdown(claims: Sequence[Claim], context: str = "") -> str:
    """The claims table that the README includes (``figures/claims.md``)."""
    lines = ["| claim | metric | smallest effect of interest δ | measured effect [95% CI] | verdict |",
             "|---|---|---|---|---|"]
    for c in claims:
        eff = c.effect.fmt(4 if abs(c.effect.value) < 0.01 else 3) + (f" {c.unit}" if c.unit else "") \
            if c.effect is not None and np.isfinite(c.effect.value) else "—"
        detail = f"; {c.detail}" if c.detail else ""
        verdict = c.verdict + (f" (≈{c.n_needed} images would resolve it)" if c.n_needed else "")
        lines.append(f"| **{c.id}** {c.claim} | {c.metric} | {c.delta or '—'} | {eff}{detail} | **{verdict}** |")
    return (context.strip() + "\n\n" if context else "") + "\n".join(lines) + "\n"
