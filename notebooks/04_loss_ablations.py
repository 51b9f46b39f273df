# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Loss ablations: MAE/MSE mix, colour space, GAN
#
# Each run is the card's finetune (notebook 03) with **one** change to its recipe:
#
# | run | change |
# |---|---|
# | `card` | none: Oklab, MAE→MSE schedule (1 → 0.6 MAE share), LPIPS, WGAN-GP with layer norm at half the reconstruction gradient |
# | `mae-only` / `mse-only` | the pixel loss is pure MAE / pure MSE |
# | `srgb-loss` | pixel loss (and critic input) in sRGB instead of Oklab |
# | `no-gan` | no critic |
# | `hinge-gan` | LDM's hinge critic (no gradient penalty, no norm) instead of WGAN-GP |
#
# Runs are cached by config hash, so a run already made (here or in notebook 03) is reused. Every run
# is then evaluated with the base on the *same* images (`fvae eval`'s machinery), so each difference to
# `card` is paired and comes with a bootstrap CI.

# %% tags=["parameters"]
SMOKE = None     # None: from FVAE_SMOKE (1 = the tiny smoke mode the tests run)
SEED = 0
RUN_ROOT = None  # None: runs/suite (FVAE_RUN_ROOT overrides)
FIG_DIR = None   # None: figures/ (FVAE_FIG_DIR overrides)
PRETRAIN = False  # as in notebook 03

# %%
# %matplotlib inline
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Image, Markdown, display

from fvae_core import evaluate, plotting, suite
from fvae_core.explorer import Explorer

S = suite.settings(SMOKE, SEED, RUN_ROOT, FIG_DIR)
base, runs, result = suite.suite_results(S, PRETRAIN)  # cached: trained and evaluated once
print(f"{len(runs)} runs; evaluated {len(result.rows)} (VAE, resolution, image) rows at {result.resolutions}")

# %% [markdown]
# **Check:** every VAE was evaluated on exactly the same images at every resolution (the pairing the CIs rely on).

# %%
for res in result.resolutions:
    sets = {v: sorted(r["image"] for r in result.select(v, res)) for v in result.vaes}
    assert len({tuple(s) for s in sets.values()}) == 1 and sets["card"], res
print({res: len(result.select("card", res)) for res in result.resolutions}, "images per VAE and resolution")

# %% [markdown]
# ## Metrics with 95% CIs, and paired differences to the card's recipe

# %%
keys = [("psnr", "PSNR"), ("lpips", "LPIPS"), ("ciede2000_mean", "ΔE2000"), ("err_hf_energy@0.25_L", "HF error L"),
        ("overshoot_mean", "ringing"), ("sharpness_ratio", "sharpness"), ("flat_noise", "flat noise")]
res_main = max(result.resolutions)
summ = result.summary([k for k, _ in keys])
table = [{"vae": v, "n": summ[v][res_main]["all"]["psnr"].n, **summ[v][res_main]["all"]} for v in result.vaes]
display(Markdown(f"**All images, {res_main}²** (mean [95% CI])\n\n"
                 + plotting.metric_table_markdown(table, [("vae", "VAE"), ("n", "n")] + keys, digits=4)))
diffs = [{"vae": v, **result.paired("card", v, [k for k, _ in keys])[res_main]["all"]}
         for v in result.vaes if v != "card"]
display(Markdown(f"**Paired difference VAE − card, {res_main}²** (CI excluding 0 = a real difference)\n\n"
                 + plotting.metric_table_markdown(diffs, [("vae", "VAE")] + keys, digits=4)))

# %%
fig, axes = plt.subplots(1, 3, figsize=(15, 0.9 + 0.45 * len(result.vaes)))
for ax, (k, title) in zip(axes, [("psnr", "PSNR (dB)"), ("flat_noise", "flat-region noise"),
                                 ("sharpness_ratio", "edge sharpness ratio")]):
    plotting.plot_estimates({v: summ[v][res_main]["all"][k] for v in result.vaes}, ax=ax, title=title, zero=False)
fig.suptitle(f"ablations at {res_main}², mean and 95% CI over images")
fig.tight_layout()
display(Image(str(S.fig(fig, "04_ablations"))))

# %% [markdown]
# ## By subset: flat art versus photos
# The card says its effect is strongest on flat colours; the same table per subset:

# %%
for subset in result.subsets():
    rows = [{"vae": v, **summ[v][res_main][subset]} for v in result.vaes]
    display(Markdown(f"**{subset}, {res_main}²**\n\n" + plotting.metric_table_markdown(rows, [("vae", "VAE")] + keys, digits=4)))

# %% [markdown]
# ## Explorer
# Pick runs, a resolution and an image; zoom into crops (the strongest edge by default), error maps, or the
# image's spectrum. In a live kernel the controls update the figure; in the executed copy the first view is shown.

# %%
ex = Explorer(result)
ex

# %% [markdown]
# **Check:** the explorer's first render exists and shows every selected run.

# %%
assert ex.renders >= 1 and ex.figure is not None
assert set(ex.state.vaes) == set(result.vaes)
display(Image(str(S.fig(ex.figure, "04_explorer_first_view"))))  # a static copy for viewers without widgets
