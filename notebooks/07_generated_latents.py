# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 07 · Decoding what a diffusion model generates
#
# The card's effect is on *generated* images: the VAE "is good at eliminating unwanted high-frequency noise
# when used on models trained on similar data", and the effects "are more noticeable on lower-resolution
# generated images". Notebooks 04–06 decode *encoded* latents, which lie on the encoder's manifold. A
# diffusion model's latents lie near it, not on it, and that is where a decoder's noise shows.
#
# This notebook decodes three kinds of latents with the base and with every finetune of notebook 03:
#
# - **encoded**: the posterior mean of a real image (notebook 06's numbers);
# - **perturbed**: that latent plus Gaussian noise of σ ∈ {0.1, 0.25, 0.5} times the latents' std. It is off
#   the manifold and still has the original image as a reference;
# - **generated**: sampled by `weights/latent-flow`, a 4.0M-parameter rectified-flow UNet trained by
#   `fvae latents train` on the base's latents of whole OpenMoji renders at 64² (8×8×4). There is no original,
#   so the measures are reference-free (`fvae_core.reference_free`, validated on synthetic oracles).
#
# Claims C1–C4 are re-assessed for each kind, with the same δs and verdict rule as notebook 06.

# %% tags=["parameters"]
SMOKE = None     # None: from FVAE_SMOKE (1 = the tiny smoke mode the tests run)
SEED = 0
RUN_ROOT = None  # None: runs/suite (FVAE_RUN_ROOT overrides)
FIG_DIR = None   # None: figures/ (FVAE_FIG_DIR overrides)
PRETRAIN = False  # as in notebook 03

# %%
# %matplotlib inline
import json

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Image, Markdown, display

from fvae_core import claims, plotting, suite

S = suite.settings(SMOKE, SEED, RUN_ROOT, FIG_DIR)
base, runs, encoded = suite.suite_results(S, PRETRAIN)  # cached by notebooks 03-04
model = suite.latent_model(S)
record = json.loads((S.root / "weights" / suite.LATENT_MODEL / "RECORD.json").read_text())
print(f"latent model: {record['params'] / 1e6:.2f}M parameters, {record['weights_bytes'] / 2**20:.1f} MiB fp16, "
      f"{record['steps']} steps in {record['step_seconds'] / 60:.0f} min on 2 CPU cores, "
      f"scaling factor {model.scaling_factor:.5f}")

# %% [markdown]
# ## The latent model's samples against the real latents
# Recorded when the model was committed (`weights/record_latent.py`, 512 samples): per-channel moments of
# the generated latents against the real ones (posterior samples of all 16,832 training crops), and the
# band power of their decodes against real images, beside the same for decoded *real* latents. The latter
# is what the VAE itself does to the spectrum; the difference between the two rows is the generator's own.

# %%
mo, sp = record["moments"], record["spectrum"]
display(Markdown("\n".join(
    ["| channel | mean gen | mean real | std gen | std real | std ratio |", "|---|---|---|---|---|---|"]
    + [f"| {c} | {mo['mean_generated'][c]:.3f} | {mo['mean_real'][c]:.3f} | {mo['std_generated'][c]:.3f} | "
       f"{mo['std_real'][c]:.3f} | {mo['std_ratio'][c]:.3f} |" for c in range(4)]
    + ["", "| decodes of | " + " | ".join(sp["generated"]["bands_cycles_per_px"]) + " (cycle/px) |",
       "|---|---|---|---|"]
    + [f"| {k.replace('_latents', '')} latents | " + " | ".join(f"{m:+.2f} dB" for m in sp[k]["mean_db"]) + " |"
       for k in ("generated", "real_latents")])))

# %% [markdown]
# ## Generated latents, decoded by every VAE
# Each column is one generated latent; each row a decoder. The top rows are at the model's own size (8×8
# latents, 64² images); the last block samples 16×16 latents (128²) from the same model, outside its
# training size, for claim C3.

# %%
generated = suite.generated_decodes(S, base, runs)
fig = plotting.decode_grid({side: g["decodes"] for side, g in generated.items()}, columns=8)
display(Image(str(S.fig(fig, "07_generated_grid"))))

# %% [markdown]
# ## Reference-free measures of the decodes
# Per latent and decoder: the top band's power (f > 1/4 cycle/px) in dB against real images of the same
# size, the noise in flat regions (Immerkær's operator) and the excess total variation beside edges
# (ringing). The regions come from the median of all decoders' decodes of that latent, so every decoder is
# measured on the same pixels.

# %%
measures = suite.generated_measures(S, generated)
rows = [(px, vae, {k: float(np.nanmean(v)) for k, v in m.items()}) for px, by in measures.items() for vae, m in by.items()]
display(Markdown("| decode | VAE | high band (dB vs real) | flat noise (L) | ringing (L) |\n|---|---|---|---|---|\n"
                 + "\n".join(f"| {px}² | {vae} | {m['hf_db']:+.2f} | {m['flat_noise']:.4f} | {m['edge_ringing']:.4f} |"
                             for px, vae, m in rows)))

# %% [markdown]
# ## Perturbed latents: off the manifold, with a reference
# The evaluation images are encoded, and noise of σ times the latents' std (1 / the latent model's measured
# scaling factor) is added, the same noise for the base and for the card finetune. Then the claims are
# measured exactly as in notebook 06.

# %%
perturbed = suite.perturbed_evaluations(S, base, runs)
psnr = {f"σ={sg:g}": {v: res.summary(["psnr"])[v][max(res.resolutions)]["all"]["psnr"].fmt(2) for v in res.vaes}
        for sg, res in perturbed.items()}
print("PSNR at the larger size, mean [95% CI]:", json.dumps(psnr, indent=1, ensure_ascii=False))

# %% [markdown]
# ## C1–C4 per latent kind
# One column per kind; the verdicts use notebook 06's rule and δs. On generated latents C1 and C3 use the
# decodes' high-band power (no reference), C4 the reference-free ringing and flat-noise measures, and C2
# cannot be measured: the latent model makes flat art only.

# %%
by_kind = {"encoded": claims.assess(encoded)}
by_kind.update({f"perturbed σ={sg:g}": claims.assess(res) for sg, res in perturbed.items()})
by_kind["generated"] = claims.assess_generated(measures, sorted(measures))
table = claims.claims_by_kind_markdown(by_kind)
if S.smoke:
    table = "*SMOKE mode: a few images and latents, a few sampler steps; the numbers mean nothing.*\n\n" + table
(S.fig_dir / "claims_by_kind.md").write_text(table)
display(Markdown(table))

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 0.8 + 0.5 * len(by_kind)))
for ax, cid in zip(axes, ("C1", "C4")):
    eff = {k: c.effect for k, cs in by_kind.items() for c in cs if c.id == cid and c.effect is not None}
    plotting.plot_estimates(eff, ax=ax, title=f"{cid}, card − base, per latent kind",
                            xlabel=next(c.unit for c in by_kind["encoded"] if c.id == cid),
                            delta=next(c.delta_value for c in by_kind["encoded"] if c.id == cid))
display(Image(str(S.fig(fig, "07_claims_by_kind"))))
