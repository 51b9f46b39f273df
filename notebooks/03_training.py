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
# # 03 · Training: finetune the decoder with the card's recipe
#
# The card finetunes only the **decoder** of `sd-vae-ft-mse` (150k steps, batch 32, 256² crops). At the
# embedded scale we do the same to `small-sd`, a 6.8M-parameter VAE with SD's shape (f = 8, 4 latent
# channels), whose base weights `weights/small-cpu` were pretrained here with the LDM recipe, adversarial
# phase included (`fvae train --config small-cpu`, 4,000 steps, 2.2 hours on 2 CPU cores). It reconstructs
# OpenMoji at 128² at 21.0 dB, 6 dB above an 8× bicubic down/up resize: a base worth finetuning
# (its learning curve and references: `weights/small-cpu/RECORD.json`). Set `PRETRAIN = True` to make it again.
#
# The run is `fvae train --config small-cpu-finetune`: Oklab MAE→MSE schedule + LPIPS, a WGAN-GP PatchGAN
# critic with layer norm weighted to half the reconstruction gradient, EMA; 300 steps, the length at which
# the card's main effects resolve (docs/training.md, "Choosing the finetune length"). It is cached by its config
# hash under `RUN_ROOT`: a second execution reuses it.

# %% tags=["parameters"]
SMOKE = None     # None: from FVAE_SMOKE (1 = the tiny smoke mode the tests run)
SEED = 0
RUN_ROOT = None  # None: runs/suite (FVAE_RUN_ROOT overrides)
FIG_DIR = None   # None: figures/ (FVAE_FIG_DIR overrides)
PRETRAIN = False  # True: pretrain the base here (about two hours) instead of using weights/small-cpu

# %%
# %matplotlib inline
import json

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Image, Markdown, display
from jax.tree_util import tree_leaves

from fvae_core import plotting, suite
from fvae_core.runs import cache
from fvae_core.weights import load_vae

S = suite.settings(SMOKE, SEED, RUN_ROOT, FIG_DIR)
print(S)

# %% [markdown]
# ## The base and the finetune config
# The finetune's `init` is the base; in SMOKE mode both runs shrink to a few steps on 32² crops
# (`smoke_variant`: the same recipe, every part of the step exercised).

# %%
base_path = suite.base_weights(S, PRETRAIN)
ft_cfg = suite.finetune_config(S, base_path, "card")
print(json.dumps({"init": ft_cfg.init, "steps": ft_cfg.steps, "batch": ft_cfg.batch_size,
                  "crop": ft_cfg.data.crop, "recipe": ft_cfg.recipe.__dict__}, indent=1, default=str))

# %% [markdown]
# The card's run, and the five ablations notebook 04 compares, trained here two at a time in child processes
# (two runs at once train 1.4× the steps per second of one on 2 CPU cores; logs in `RUN_ROOT/<run>.log`).

# %%
run = suite.finetune_runs(S, base_path)["card"]
rows = cache.read_metrics(run)
final = json.loads((run / "final.json").read_text())
print(run, "\n", json.dumps(final["final"], indent=1))

# %% [markdown]
# **Check:** the run finished every step with no skipped (non-finite) step, and only the decoder moved:
# the encoder (and its `quant_conv`) of the export is bit-identical to the base, the decoder is not.

# %%
base, tuned = load_vae(base_path), load_vae(run / "export" / "diffusers")
assert final["step"] == ft_cfg.steps and final["skipped_steps"] == 0
for part in ("encoder", "quant_conv"):
    assert all(np.array_equal(a, b) for a, b in zip(tree_leaves(base.params[part]), tree_leaves(tuned.params[part])))
moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
            for a, b in zip(tree_leaves(base.params["decoder"]), tree_leaves(tuned.params["decoder"])))
assert moved > 0
print(f"encoder frozen; largest decoder weight change {moved:.3g}")

# %% [markdown]
# ## Loss curves, adaptive weight, critic, gradient norms
# What to watch when a GAN finetune diverges (STYLE.md): every loss term, the adaptive weight
# $\lambda = 0.5\,\lVert\nabla_W L_{rec}\rVert / \lVert\nabla_W L_{adv}\rVert$ at the decoder's last layer,
# the critic's scores on real and reconstructed images (their gap is the Wasserstein estimate), and the
# gradient and update norms of both networks.

# %%
smooth = 1 if S.smoke else 3
fig, axes = plt.subplots(2, 2, figsize=(12, 7))
plotting.plot_curves(rows, ["loss/rec", "loss/pixel", "loss/lpips"], ax=axes[0, 0], title="generator losses",
                     smooth=smooth)
plotting.plot_curves(rows, ["adaptive_weight"], ax=axes[0, 1], title="adaptive GAN weight λ", smooth=smooth)
plotting.plot_curves(rows, ["critic/d_real", "critic/d_fake", "critic/wasserstein"], ax=axes[1, 0],
                     title="critic: real, fake, Wasserstein estimate", smooth=smooth)
plotting.plot_curves(rows, ["gen/grad_norm", "critic/grad_norm"], ax=axes[1, 1], title="gradient norms",
                     logy=True, smooth=smooth)
fig.tight_layout()
display(Image(str(S.fig(fig, "03_training_curves"))))

# %% [markdown]
# **Check:** every logged value is finite; the MAE share follows the card's schedule (1 → 0.6).

# %%
logged = [r for r in rows if "loss/rec" in r]
assert logged and all(np.isfinite(r["loss/rec"]) and np.isfinite(r["gen/grad_norm"]) for r in logged)
w_mae = [r["w_mae"] for r in logged]
assert w_mae[0] <= 1.0 + 1e-6 and w_mae[-1] >= 0.6 - 1e-6 and w_mae[-1] <= w_mae[0]
if not S.smoke:
    k = max(1, len(logged) // 4)
    first, last = np.mean([r["loss/rec"] for r in logged[:k]]), np.mean([r["loss/rec"] for r in logged[-k:]])
    print(f"reconstruction loss: first quarter {first:.4f}, last quarter {last:.4f}")
    assert last < first

# %% [markdown]
# ## EMA versus raw weights
# Validation on the run's fixed centre crops, for the raw weights and for their exponential moving average.

# %%
fig, ax = plt.subplots(figsize=(6.4, 4))
plotting.plot_curves(rows, ["val/psnr", "val_ema/psnr"], ax=ax, title="validation PSNR (dB): raw vs EMA")
display(Image(str(S.fig(fig, "03_ema_vs_raw"))))
f = final["final"]
display(Markdown(f"| weights | val PSNR (dB) | val ΔE_OK |\n|---|---|---|\n"
                 f"| raw | {f['val/psnr']:.2f} | {f['val/delta_e_ok']:.4f} |\n"
                 f"| EMA | {f['val_ema/psnr']:.2f} | {f['val_ema/delta_e_ok']:.4f} |"))

# %% [markdown]
# ## Samples: original | base | current | EMA
# The sample grids the run wrote (`samples/step_N.png`); the last one:

# %%
samples = sorted((run / "samples").glob("step_*.png"))
assert samples
display(Image(str(samples[-1])))

# %% [markdown]
# The base is already good on flat art, so 300 steps move validation PSNR by a few tenths of a dB; what the
# card claims is about *where* the remaining error lies (high-frequency noise, edges), which notebooks 05
# and 06 measure with confidence intervals.
