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
# # 02 · The recipe, piece by piece
#
# The Furception card in one paragraph: a decoder finetune of sd-vae-ft-mse with "a mixture of MAE and
# MSE loss ... calculated in Oklab color space", LPIPS as in LDM, a discriminator "reparameterized to
# Wasserstein loss with a gradient penalty and with its group norm layers replaced with layer norms",
# whose weight "is dynamically set so that the gradient norm for the discriminator is half that of the
# reconstruction loss", and "EMA weights ... using a similar decay to sd-vae-ft-mse scaled for our batch
# size". This notebook takes each piece from `fvae_core`, shows what it does, and checks it against an
# independent oracle:
#
# 1. sRGB → linear → Oklab, and why Oklab (oracle: `coloraide`, CIEDE2000);
# 2. MAE vs MSE, and the MAE-share schedule (oracle: median/mean by brute force, `optax`);
# 3. LPIPS (oracle: monotone in blur and noise, zero on identical images);
# 4. the WGAN-GP critic with layer norm (oracle: a linear critic, whose penalty is known exactly);
# 5. the adaptive adversarial weight (oracle: `jax.grad` of the weighted loss);
# 6. the batch-scaled EMA decay (oracle: the card authors' constant);
# 7. the anchors' known bugs and the tests that catch them.
#
# Nothing is trained here; notebook 03 trains.

# %% tags=["parameters"]
SMOKE = None     # None: from FVAE_SMOKE (1 = the tiny smoke mode the tests run)
SEED = 0
RUN_ROOT = None  # None: runs/suite (FVAE_RUN_ROOT overrides)
FIG_DIR = None   # None: figures/ (FVAE_FIG_DIR overrides)

# %%
from fvae_core import suite; S = suite.settings(SMOKE, SEED, RUN_ROOT, FIG_DIR)

# %%
# %matplotlib inline
import re

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from coloraide import Color
from IPython.display import Image, Markdown, display
from scipy import ndimage

from fvae_core import color, critic, losses, metrics, teaching
from fvae_core.conventions import to_model_range
from fvae_core.data import augment, skimage_photo
from fvae_core.lpips import load_lpips, lpips_distance
from fvae_core.plotting import metric_table_markdown
from fvae_core.train_steps import ema_decay_for_batch


def show(fig, name):
    """Save through the one figure helper and show the saved PNG inline."""
    display(Image(filename=str(S.fig(fig, name))))


LPIPS_NET = "alexnet" if S.smoke else "vgg16"
LPIPS_SIZE = 128 if S.smoke else 224
N_PAIRS = 2000 if S.smoke else 20000
rng = np.random.default_rng(S.seed)
print(f"smoke={S.smoke}: LPIPS {LPIPS_NET} at {LPIPS_SIZE}², {N_PAIRS} colour pairs, figures -> {S.fig_dir}")

# %% [markdown]
# ## 1. sRGB → linear → Oklab
#
# Image files store **sRGB-encoded** values $c \in [0, 1]$. Light adds up in **linear** values
# (IEC 61966-2-1):
# $$c_{\text{lin}} = \begin{cases} c / 12.92 & c \le 0.04045 \\ \left(\frac{c + 0.055}{1.055}\right)^{2.4} & \text{else.}\end{cases}$$
# **Oklab** (Ottosson 2020) maps linear RGB to cone-like responses, compresses them with a cube root and
# mixes them into lightness $L$ and two opponent axes $a$ (green–red) and $b$ (blue–yellow):
# $$\text{lms} = M_1\,\text{rgb}_{\text{lin}},\qquad (L, a, b)^\top = M_2\,\sqrt[3]{\text{lms}},$$
# the matrices applied to each pixel's column vector, i.e. `rgb @ M1.T` on channels-last arrays. Oklab
# is built so that Euclidean distance is close to perceived difference; a loss computed there spends
# its effort where the eye would see an error. Here: our conversion against `coloraide` on the white point
# and the primaries, and the anchor's bug.

# %%
refs = {"white": [1, 1, 1], "red": [1, 0, 0], "green": [0, 1, 0], "blue": [0, 0, 1]}
ours = {k: np.asarray(color.oklab_from_srgb(jnp.asarray(v, jnp.float32))) for k, v in refs.items()}
oracle = {k: np.asarray(Color("srgb", v).convert("oklab").coords()) for k, v in refs.items()}
M1, M2 = color.LMS_FROM_LINEAR, color.OKLAB_FROM_LMS_CBRT
transposed = {k: np.cbrt(np.asarray(v, float) @ M1) @ M2 for k, v in refs.items()}  # the anchor: x @ M, i.e. Mᵀ x
fmt = lambda v: "(" + ", ".join(f"{c:+.4f}" for c in v) + ")"  # noqa: E731
display(Markdown(metric_table_markdown(
    [{"colour": k, "ours": fmt(ours[k]), "coloraide": fmt(oracle[k]), "transposed (anchor bug)": fmt(transposed[k])}
     for k in refs], [("colour", "sRGB"), ("ours", "fvae Oklab (L, a, b)"), ("coloraide", "coloraide"),
                      ("transposed (anchor bug)", "transposed matrices")])))

# %%
for k in refs:
    np.testing.assert_allclose(ours[k], oracle[k], atol=1e-5)          # ours = coloraide
np.testing.assert_allclose(ours["white"], (1, 0, 0), atol=1e-6)          # white is L = 1, neutral
bug_white = transposed["white"]
assert abs(bug_white[1]) > 0.1 and abs(bug_white[2]) > 0.1, bug_white    # transposed: white is not neutral
np.testing.assert_allclose(bug_white, (2.4755, -1.3472, -0.2352), atol=1e-3)
print("white under the transposed matrices:", fmt(bug_white))

# %% [markdown]
# **Why Oklab for a loss?** Two views. (a) Grey ramps: 11 patches in equal steps of sRGB value, of
# linear light and of Oklab $L$, with the CIE $L^*$ step between neighbours measured as the independent
# yardstick of perceived lightness. (b) For random colour pairs a small fixed distance apart, how much
# *perceived* difference (CIEDE2000, `metrics.ciede2000`, validated on Sharma's pairs) one unit of
# Euclidean distance means in each space: a good loss space gives nearly the same ratio everywhere.

# %%
t = np.linspace(0, 1, 11)
grey = lambda v: np.repeat(np.asarray(v, float)[:, None], 3, axis=1)  # noqa: E731
ramps = {"equal sRGB steps": t,
         "equal linear steps": np.asarray(color.srgb_from_linear(grey(t)))[:, 0],
         "equal Oklab L steps": np.asarray(color.srgb_from_oklab(np.stack([t, 0 * t, 0 * t], -1)))[:, 0]}
dLstar = {k: np.diff(metrics.cielab_from_srgb(grey(np.clip(v, 0, 1)))[:, 0]) for k, v in ramps.items()}

a = rng.uniform(0.02, 0.98, (N_PAIRS, 3))
d = rng.normal(size=(N_PAIRS, 3))
b = np.clip(a + 0.01 * d / np.linalg.norm(d, axis=1, keepdims=True), 0, 1)
de2000 = metrics.ciede2000(metrics.cielab_from_srgb(a), metrics.cielab_from_srgb(b))
log_ratio = {sp: np.log(de2000 / np.linalg.norm(np.asarray(color.to_loss_space(b, sp) - color.to_loss_space(a, sp)), axis=1))
             for sp in color.LOSS_SPACES}
spread = {sp: float(np.std(v)) for sp, v in log_ratio.items()}
print("ΔL* per step:", {k: np.round(v, 1).tolist() for k, v in dLstar.items()})
print("spread (std of log ΔE2000 / Euclidean distance):", {k: round(v, 3) for k, v in spread.items()})

# %%
bright = t[:-1] >= 0.2  # steps whose darker patch has Oklab L >= 0.2 (L* is a pure cube root from 0.207 up)
ok, srgb_steps = dLstar["equal Oklab L steps"], dLstar["equal sRGB steps"]
assert np.ptp(ok[bright]) / ok[bright].mean() < 0.01                       # Oklab L: even steps (within 1 %)
assert np.ptp(srgb_steps) / srgb_steps.mean() > 0.2                        # sRGB: uneven by > 20 %
assert dLstar["equal linear steps"].max() > 5 * dLstar["equal linear steps"].min()  # linear: very uneven
assert spread["oklab"] < spread["srgb"] < spread["linear"]                  # Oklab distance is most uniform

# %%
fig, ax = plt.subplots(2, 2, figsize=(11, 7.5))
c = np.linspace(0, 1, 256)
ax[0, 0].plot(c, np.asarray(color.linear_from_srgb(grey(c)))[:, 0], label="sRGB decode (IEC 61966-2-1)")
ax[0, 0].plot(c, c ** 2.2, "--", label="pure power 2.2")
ax[0, 0].plot(c, np.asarray(color.oklab_from_srgb(grey(c)))[:, 0], label="Oklab L of the grey")
ax[0, 0].set(xlabel="sRGB-encoded value c", ylabel="linear value, or Oklab L", title="Transfer curve and Oklab lightness of greys")
ax[0, 0].legend(fontsize=8)
strip = np.stack([np.repeat(np.clip(v, 0, 1), 24) for v in ramps.values()])
ax[0, 1].imshow(np.repeat(strip, 30, axis=0), cmap="gray", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
ax[0, 1].set(yticks=[15, 45, 75], yticklabels=list(ramps), xticks=[], title="11-step grey ramps")
for k, v in dLstar.items():
    ax[1, 0].plot(np.arange(1, 11), v, "o-", label=k)
ax[1, 0].set(xlabel="step (dark → light)", ylabel="CIE ΔL* between neighbours", title="Perceived lightness step")
ax[1, 0].legend(fontsize=8)
for sp, v in log_ratio.items():
    ax[1, 1].hist(v - np.median(v), bins=np.linspace(-2, 2, 41 if S.smoke else 81), histtype="step", lw=2, density=True,
                  label=f"{sp} (spread {spread[sp]:.2f})")
ax[1, 1].set(xlabel="log(ΔE2000 / Euclidean distance), median removed", ylabel="density",
             title="Perceived difference per unit of distance")
ax[1, 1].legend(fontsize=8)
fig.tight_layout()
show(fig, "02_oklab")

# %% [markdown]
# **Reading.** Linear steps are dominated by the first one (most of the perceived range sits below
# linear 0.1); sRGB encoding is already a decent perceptual curve for greys, but its steps still shrink
# from ≈12 to ≈9 $L^*$. Equal steps of Oklab $L$ are exactly even in $L^*$ from $L = 0.2$ up, because
# both are cube roots of luminance there; only the darkest step differs, where $L^*$ has a linear toe and
# Oklab does not (Ottosson's later "Lr" adds one). For colours, one unit of Euclidean distance means the
# most nearly constant perceived difference in Oklab; in linear RGB the same distance can be a large or
# an invisible change. That is the card's "prioritize ... which color channels are more perceptually
# significant". The transposed matrices of the anchor map white to $L = 2.48$, $a = -1.35$: a loss
# computed there is not in Oklab at all (`tests/test_color.py::test_transposed_matrix_bug_is_caught`).
#
# ## 2. MAE vs MSE
#
# Per pixel, with error $e = \hat{x} - x$: $\frac{d}{de}|e| = \operatorname{sign}(e)$ and
# $\frac{d}{de}e^2 = 2e$. MAE pushes every wrong pixel equally hard, however small its error; MSE pushes in
# proportion, so small errors (noise in a flat region) get almost no push and large ones dominate.
#
# What this does to an **edge**: a decoder of an f=8 VAE cannot place every pixel freely; take the
# extreme case of one constant value $c$ per 8-pixel block, with an edge inside a block. The best
# constant is
# $$\arg\min_c \sum_i |x_i - c| = \operatorname{median}(x), \qquad \arg\min_c \sum_i (x_i - c)^2 = \operatorname{mean}(x).$$
# MAE keeps one side of the edge (sharp); MSE averages the two sides (a grey smear: blur).

# %%
e = jnp.linspace(-1, 1, 200)
grad_mae = jax.vmap(jax.grad(jnp.abs))(e)
grad_mse = jax.vmap(jax.grad(jnp.square))(e)
step = np.where(np.arange(32) >= 11, 1.0, 0.0)                     # an edge 3 px into the second block
blocks = step.reshape(4, 8)
cands = np.linspace(-0.5, 1.5, 2001)                               # brute force over constants, with losses.mae/mse
tiled = jnp.asarray(np.broadcast_to(blocks[1], (len(cands), 8))[..., None])
fits = jnp.asarray(cands[:, None, None] * np.ones((1, 8, 1)))
best_mae, best_mse = cands[int(jnp.argmin(losses.mae(fits, tiled)))], cands[int(jnp.argmin(losses.mse(fits, tiled)))]
print(f"block {blocks[1]}: MAE-best constant {best_mae:.3f} (median {np.median(blocks[1])}), "
      f"MSE-best {best_mse:.3f} (mean {blocks[1].mean()})")

# %%
np.testing.assert_allclose(grad_mae, np.sign(e))
np.testing.assert_allclose(grad_mse, 2 * e, rtol=1e-6)
assert abs(best_mae - np.median(blocks[1])) < 1e-3 and abs(best_mse - blocks[1].mean()) < 1e-3
assert best_mae == 1.0 and best_mse == 0.625  # MAE keeps the majority side, MSE smears

# %% [markdown]
# **The card's mix, read from the authors' code** (`reference/recipe.md`): in Oklab,
# $\ 1.0\, s(t)\,\text{MAE} + 10\,(1 - s(t))\cdot 0.5\,\text{SE}$, the MAE share $s$ following a cosine
# from 1.0 to 0.6 over 100k steps (then constant; the run is 150k steps):
# $$s(t) = 0.6 + 0.4\cdot\tfrac12\left(1 + \cos\left(\pi \min(t, 10^5)/10^5\right)\right).$$
# `losses.furception_pixel_weights(step)` returns $(w_{\text{MAE}}, w_{\text{MSE}}) = (s, 5(1 - s))$:
# pure MAE at step 0, $0.6\,\text{MAE} + 2.0\,\text{MSE}$ from 100k on. Oracle: optax's cosine decay.

# %%
steps = np.arange(0, 150_001, 500)
w_mae, w_mse = (np.asarray(w) for w in losses.furception_pixel_weights(steps))
share = np.asarray(losses.mae_share_schedule(steps))
optax_s = np.array([optax.cosine_decay_schedule(1.0, 100_000, alpha=0.6)(int(t)) for t in steps[::20]])

# %%
at = lambda t: float(losses.mae_share_schedule(t))  # noqa: E731
assert at(0) == 1.0 and abs(at(50_000) - 0.8) < 1e-6 and abs(at(100_000) - 0.6) < 1e-6 and abs(at(150_000) - 0.6) < 1e-6
np.testing.assert_allclose(share[::20], optax_s, atol=1e-6)
np.testing.assert_allclose((w_mae[0], w_mse[0], w_mae[-1], w_mse[-1]), (1.0, 0.0, 0.6, 2.0), atol=1e-6)
print(f"end of schedule: {w_mae[-1]:.2f} MAE + {w_mse[-1]:.2f} MSE; the MSE gradient 2·{w_mse[-1]:.1f}·e "
      f"exceeds the MAE one {w_mae[-1]:.1f} only where |e| > {w_mae[-1] / (2 * w_mse[-1]):.2f} (Oklab units)")

# %%
fig, ax = plt.subplots(1, 3, figsize=(14, 3.8))
ax[0].plot(e, grad_mae, label="d|e|/de = sign(e)  (MAE)")
ax[0].plot(e, grad_mse, label="d e²/de = 2e  (MSE)")
ax[0].set(xlabel="error e", ylabel="gradient", title="Per-pixel gradients")
ax[0].legend(fontsize=8)
ax[1].step(np.arange(32), step, where="mid", color="k", lw=2, label="target: a step edge")
ax[1].step(np.arange(32), np.repeat(np.median(blocks, 1), 8), where="mid", ls="--", lw=2, label="best block constants, MAE (median)")
ax[1].step(np.arange(32), np.repeat(blocks.mean(1), 8), where="mid", ls=":", lw=2, label="best block constants, MSE (mean)")
for x0 in range(8, 32, 8):
    ax[1].axvline(x0 - 0.5, color="0.8", lw=0.8)
ax[1].set(xlabel="pixel (blocks of 8)", ylabel="value", title="One constant per 8-px block", ylim=(-0.15, 1.3))
ax[1].legend(fontsize=7, loc="upper left")
ax[2].plot(steps / 1000, w_mae, label="w_MAE = s(t)")
ax[2].plot(steps / 1000, w_mse, label="w_MSE = 5 (1 − s(t))")
ax[2].plot(steps[::20] / 1000, optax_s, "k.", ms=4, label="optax cosine decay (oracle for s)")
ax[2].axvline(100, color="0.6", ls="--", lw=1)
ax[2].set(xlabel="training step (thousands)", ylabel="weight", title="The card's MAE/MSE schedule (Oklab)")
ax[2].legend(fontsize=8)
fig.tight_layout()
show(fig, "02_mae_mse")

# %% [markdown]
# **Reading.** Under MAE the block that holds the edge takes the value of its majority side and the
# edge stays a step (moved 3 px, to the block boundary); under MSE it becomes 0.625 grey, a soft edge: this is
# the blur that MSE-trained VAEs are known for. The schedule starts as pure MAE and moves a share to MSE
# ("an acceptable balance between sharpness and smooth outputs"). Even at the end, MAE supplies the
# larger gradient for every error below 0.15 in Oklab units, i.e. for nearly all of them.
#
# ## 3. LPIPS
#
# LPIPS (Zhang et al. 2018) compares unit-normalised deep features of the two images at five layers,
# weighted per channel by a learned linear layer:
# $d(x, y) = \sum_l \operatorname{mean}_{h,w} \sum_c w_{l,c}\,(\hat f_l(x) - \hat f_l(y))^2_{hwc}$.
# Its input is **[-1, 1]** (the scaling layer subtracts ImageNet means expressed in those units). We blur
# and add noise to a photograph with increasing strength; the distance must start at 0 and grow.

# %%
lp = load_lpips(LPIPS_NET)
ref01 = augment.centre_square(skimage_photo("astronaut"), LPIPS_SIZE).astype(np.float32) / 255
sigmas = np.array([0, 0.5, 1, 2, 4])
noise_std = np.array([0, 0.02, 0.05, 0.1, 0.2])
z = rng.standard_normal(ref01.shape).astype(np.float32)
blurred = np.stack([ndimage.gaussian_filter(ref01, (s, s, 0)) for s in sigmas])
noisy = np.stack([np.clip(ref01 + s * z, 0, 1) for s in noise_std])
refs01 = np.broadcast_to(ref01, blurred.shape)
dist = {kind: np.asarray(lpips_distance(lp, to_model_range(x), to_model_range(refs01)))
        for kind, x in (("blur", blurred), ("noise", noisy))}
dist_bug = {kind: np.asarray(lpips_distance(lp, x, refs01, check=False))  # the anchor: [0, 1] fed as is
            for kind, x in (("blur", blurred), ("noise", noisy))}
try:
    lpips_distance(lp, blurred, refs01)
except ValueError as err:
    refusal = str(err)
print("LPIPS, [-1, 1] input:", {k: np.round(v, 4) for k, v in dist.items()})
print("LPIPS, [0, 1] input: ", {k: np.round(v, 4) for k, v in dist_bug.items()}, "\nrefused [0, 1] input:", refusal)

# %%
for kind in dist:
    assert dist[kind][0] < 1e-6                             # identical images: 0
    assert np.all(np.diff(dist[kind]) > 0), dist[kind]       # monotone in the strength
    assert not np.allclose(dist_bug[kind][1:], dist[kind][1:], rtol=0.02)  # [0, 1] input changes the number
assert re.search(r"\[0, 1\]", refusal)

# %%
fig, ax = plt.subplots(1, 3, figsize=(14, 3.8), gridspec_kw={"width_ratios": [1, 1, 1.3]})
for a, kind, xs, lab in ((ax[0], "blur", sigmas, "Gaussian blur σ (px)"), (ax[1], "noise", noise_std, "noise std (sRGB units)")):
    a.plot(xs, dist[kind], "o-", label="[-1, 1] input (correct)")
    a.plot(xs, dist_bug[kind], "s--", label="[0, 1] input (anchor bug, check=False)")
    a.set(xlabel=lab, ylabel=f"LPIPS ({LPIPS_NET})", title=f"LPIPS vs {kind} strength")
    a.legend(fontsize=8)
ax[2].imshow(np.concatenate([ref01, blurred[3], noisy[3]], axis=1))
ax[2].set(xticks=[], yticks=[], title=f"original | blur σ={sigmas[3]:g} | noise {noise_std[3]:g}")
fig.tight_layout()
show(fig, "02_lpips")

# %% [markdown]
# **Reading.** Both distortions raise the distance monotonically from exactly 0. Fed [0, 1] images (the
# anchor's bug), the network sees images at half the contrast and shifted by half the range from what
# its scaling layer expects. On this photo the distances move by a few percent (AlexNet) to twenty
# percent (VGG16, noise) and keep their order, so the bug is easy to miss; but the loss is then no longer the distance LPIPS was calibrated on,
# and its gradient is that of a different function, which no loss weight turns back into LPIPS. `lpips_distance`
# refuses such input eagerly (and flags it under `jit` through `checkify` and a logged metric).
#
# ## 4. The critic: PatchGAN, WGAN-GP, layer norm
#
# The critic is LDM's PatchGAN (a field of patch logits; $D(x)$ is their mean), trained with the
# WGAN-GP objective (Gulrajani et al. 2017)
# $$\min_D\ \mathbb{E}[D(\hat x)] - \mathbb{E}[D(x)] + \lambda\,\mathbb{E}_{\tilde x}\big[(\lVert\nabla_{\tilde x} D(\tilde x)\rVert_2 - 1)^2\big],\quad \tilde x = \epsilon x + (1-\epsilon)\hat x,\ \lambda = 10.$$
# The penalty is a **per-sample** input gradient. LDM's critic uses batch norm, which makes $D(x_i)$
# depend on every other sample of the batch, so $\nabla_{x_i}$ of the batch's scores is not the gradient
# of sample $i$'s own critic value. Layer norm normalises each sample on its own; the card (and WGAN-GP's
# authors) use it. Checks: the logits of one sample do not move when another sample changes (layer norm)
# but do under batch norm, and `critic.validate_critic` refuses batch norm with a gradient penalty.

# %%
x64 = jnp.asarray(rng.uniform(-1, 1, (2, 64, 64, 3)), jnp.float32)
layer_D, batch_D = critic.PatchGAN(norm="layer"), critic.PatchGAN(norm="batch")
cparams = layer_D.init(jax.random.PRNGKey(S.seed), x64)            # the param tree is the same for every norm
x64b = x64.at[1].set(-x64[1])                                      # change sample 1 only
moved = {name: float(jnp.abs(D.apply(cparams, x64)[0] - D.apply(cparams, x64b)[0]).max())
         for name, D in (("layer", layer_D), ("batch", batch_D))}
try:
    critic.validate_critic("batch", "wgan-gp")
except ValueError as err:
    refusal_bn = str(err)
print("logits:", layer_D.apply(cparams, x64).shape, "| sample 0 moved by:", moved, "\n", refusal_bn)

# %% [markdown]
# **The oracle: a linear critic.** For $f(x) = \langle w, x\rangle$ the input gradient is $w$ everywhere,
# so the penalty is exactly $(\lVert w\rVert - 1)^2$ whatever the interpolation points.

# %%
w_norms = np.array([0.0, 0.25, 0.5, 1.0, 1.5, 2.0])
shape = (3, 8, 8, 3)
u = jax.random.normal(jax.random.PRNGKey(1), shape[1:])
u = u / jnp.linalg.norm(u)
gp = [critic.gradient_penalty(lambda x, w=n * u: jnp.sum(x * w, axis=(1, 2, 3)),
                              jnp.ones(shape), jnp.zeros(shape), jax.random.PRNGKey(2)) for n in w_norms]

# %%
assert layer_D.apply(cparams, x64).shape == (2, 6, 6, 1)                   # 64² -> 6×6 patch logits
assert moved["layer"] == 0.0 and moved["batch"] > 1e-3                   # layer norm is per sample
assert "batch" in refusal_bn
for n, g in zip(w_norms, gp):
    np.testing.assert_allclose(np.asarray(g), (n - 1) ** 2, rtol=1e-5, atol=1e-6)  # GP = (||w|| - 1)² per sample
print("GP of linear critics:", [round(float(g[0]), 6) for g in gp])

# %% [markdown]
# **Reading.** A 64² input gives 6×6 patch logits (256² gives taming's 30×30): each logit judges one
# overlapping patch. With layer norm sample 0's logits are bit-identical when sample 1 changes; with
# batch norm they move, which is why the per-sample penalty would be wrong there. The penalty of a
# linear critic is exactly $(\lVert w\rVert - 1)^2$: zero at unit norm, quadratic on both sides.
#
# ## 5. The adaptive adversarial weight (ratio 0.5)
#
# LDM sets the weight of the generator's adversarial term from the gradients at the decoder's last layer
# $W$ (`decoder.conv_out`):
# $$w = 0.5\cdot\frac{\lVert\nabla_W L_{\text{rec}}\rVert}{\lVert\nabla_W L_{\text{adv}}\rVert + 10^{-4}},\ \text{clamped to } [0, 10^4],\ \text{not differentiated,}$$
# so that after weighting $\lVert\nabla_W (w L_{\text{adv}})\rVert = 0.5\,\lVert\nabla_W L_{\text{rec}}\rVert$: the card's
# "gradient norm for the discriminator is half that of the reconstruction loss". Checked on numbers and
# on a toy last layer with real `jax.grad` gradients.

# %%
rec_n = np.array([1e-3, 0.1, 1.0, 3.0])[:, None]
adv_n = np.array([0.1, 0.5, 2.0, 10.0])[None, :]
aw = np.asarray(losses.adaptive_gan_weight(rec_n, adv_n, ratio=0.5))
W = jax.random.normal(jax.random.PRNGKey(3), (16, 3))                  # a toy last layer: out = h @ W
h, target = jax.random.normal(jax.random.PRNGKey(4), (64, 16)), jax.random.uniform(jax.random.PRNGKey(5), (64, 3))
L_rec = lambda W: jnp.mean(jnp.abs(h @ W - target))                     # noqa: E731
L_adv = lambda W: -jnp.mean(jnp.tanh(h @ W) @ jnp.array([0.3, -0.2, 0.5]))  # noqa: E731  (a stand-in critic)
g_rec, g_adv = jax.grad(L_rec)(W), jax.grad(L_adv)(W)
w_toy = losses.adaptive_gan_weight(jnp.linalg.norm(g_rec), jnp.linalg.norm(g_adv))
weighted = jnp.linalg.norm(jax.grad(lambda W: w_toy * L_adv(W))(W))

# %%
np.testing.assert_allclose(aw * adv_n, 0.5 * rec_n * adv_n / (adv_n + 1e-4), rtol=1e-6)  # exact, eps included
np.testing.assert_allclose(aw * adv_n, np.broadcast_to(0.5 * rec_n, aw.shape), rtol=1e-3)  # = 0.5 rec within eps
np.testing.assert_allclose(float(weighted), 0.5 * float(jnp.linalg.norm(g_rec)), rtol=1e-3)
assert float(losses.adaptive_gan_weight(10.0, 0.0)) == 0.5 * 1e4                       # the clamp
print(f"toy: |grad rec| = {float(jnp.linalg.norm(g_rec)):.4f}, |grad adv| = {float(jnp.linalg.norm(g_adv)):.4f}, "
      f"w = {float(w_toy):.3f}, |grad (w L_adv)| = {float(weighted):.4f}")

# %% [markdown]
# ## 6. EMA decay scaled to the batch size
#
# The card: "EMA weights were accumulated using a similar decay to sd-vae-ft-mse scaled for our batch
# size" (batch 32, 150k steps). sd-vae-ft used 0.999 at batch 192; the authors' code has
# `EMA_DECAY = 1 - 0.001/6`. `train_steps.ema_decay_for_batch(B)` $= 1 - (1 - 0.999)\,B/192$. Why that
# formula: after $n$ updates an old value keeps weight $d^n$, so the EMA's half-life is
# $n_{1/2} = \ln\tfrac12 / \ln d$ steps, i.e. $B\,n_{1/2}$ **images**; since $\ln d \approx -(1-d)$, scaling
# $1-d$ with $B$ keeps the half-life in images fixed.

# %%
card_decay = ema_decay_for_batch(32, 0.999, 192)
batches = np.array([4, 8, 16, 32, 64, 128, 192])
hl_scaled = np.array([teaching.ema_half_life_images(ema_decay_for_batch(int(bb)), int(bb)) for bb in batches])
hl_fixed = np.array([teaching.ema_half_life_images(0.999, int(bb)) for bb in batches])
print(f"decay at batch 32: {card_decay:.8f} (authors' 1 - 0.001/6 = {1 - 0.001 / 6:.8f}); half-life "
      f"{hl_scaled[3]:,.0f} images = {hl_scaled[3] / 32:,.0f} steps of the 150,000")

# %%
assert abs(card_decay - (1 - 0.001 / 6)) < 1e-15
np.testing.assert_allclose(hl_scaled, hl_scaled[-1], rtol=1e-3)      # invariant in images
assert hl_fixed[-1] / hl_fixed[0] == batches[-1] / batches[0]           # a fixed decay is not

# %%
fig, ax = plt.subplots(1, 3, figsize=(15, 4))
adv_axis = np.logspace(-6, 2, 200)
for r in (0.01, 1.0, 10.0):
    ax[0].loglog(adv_axis, losses.adaptive_gan_weight(r, adv_axis), label=f"‖∇rec‖ = {r:g}")
ax[0].loglog(adv_axis, 0.5 * 1.0 / adv_axis, "k:", lw=1, label="0.5 · 1 / ‖∇adv‖ (no eps, no clamp)")
ax[0].set(xlabel="‖∇_W L_adv‖", ylabel="adaptive weight w", title="Adaptive weight (ratio 0.5, eps 1e-4, clamp 1e4)",
          ylim=(1e-4, 1e5))
ax[0].legend(fontsize=8)
ax[1].plot(batches, hl_scaled, "o-", label="decay scaled: 1 − 0.001·B/192")
ax[1].plot(batches, hl_fixed, "s--", label="fixed decay 0.999")
ax[1].set(xscale="log", yscale="log", xlabel="batch size B", ylabel="EMA half-life (images)",
          title="EMA half-life in images", xticks=batches, xticklabels=batches)
ax[1].legend(fontsize=8)
imgs = np.linspace(0, 6e5, 300)
for bb, style in ((32, dict(lw=4, alpha=0.5)), (192, dict(color="k", ls="--", lw=1.5))):
    ax[2].plot(imgs / 1e3, ema_decay_for_batch(bb) ** (imgs / bb), label=f"B = {bb}, decay {ema_decay_for_batch(bb):.6f}", **style)
ax[2].axhline(0.5, color="0.6", ls="--", lw=1)
ax[2].set(xlabel="images since an update (thousands)", ylabel="remaining EMA weight", title="Weight of one update in the EMA")
ax[2].legend(fontsize=8)
fig.tight_layout()
show(fig, "02_adaptive_ema")

# %% [markdown]
# **Reading.** Left: the adaptive weight is $0.5\,\lVert\nabla_W L_{\text{rec}}\rVert/\lVert\nabla_W L_{\text{adv}}\rVert$
# over many decades; it bends away only when the adversarial gradient approaches the $10^{-4}$ eps, and the
# clamp caps it at $0.5\cdot 10^4$. Middle and right: with the scaled decay an update's weight halves after
# the same ≈133k images at any batch size (≈4.2k steps at batch 32; the mean age of what the released EMA
# holds is $1/(1-d) = 6{,}000$ of the 150k steps); a fixed 0.999 would average six times fewer images at batch 32
# than sd-vae-ft did at 192.
#
# ## 7. Known bugs in the anchors and the tests that catch them
#
# > **Known bugs in the anchors and the tests that catch them.** The Furception lead's public training
# > code (`reference/recipe.md`) has four bugs; each has a test in fvae that fails on the buggy version.
# >
# > | bug in the anchor | what it does | test that catches it |
# > |---|---|---|
# > | Oklab as `tensordot(x, M, axes=[3, 0])`, i.e. the **transposed** matrices | white → (2.48, −1.35, −0.24) instead of (1, 0, 0); the "Oklab" loss is in no colour space | `tests/test_color.py::test_transposed_matrix_bug_is_caught` (and the coloraide comparisons in the same file) |
# > | **LPIPS fed [0, 1]** images | the scaling layer assumes [-1, 1]: a different, uncalibrated distance | `tests/test_lpips.py::test_eager_rejects_unit_range_input`, `::test_under_jit_flag_and_checkify`; the train step logs `lpips/target_range_ok` (`tests/test_train_steps.py`) |
# > | `np.flip(img, 2)` on HWC: a **colour-channel flip** instead of a pixel flip | RGB → BGR half of the time; the image is never mirrored | `tests/test_augment.py::test_anchor_colour_axis_flip_is_caught`, `::test_flip_lr_mirrors_pixels_and_keeps_colours`, `::test_apply_crop_flip_is_spatial` |
# > | `randint(0, 3)` for the rotation: **never 270°** | only 0°, 90°, 180° are drawn | `tests/test_augment.py::test_anchor_rotation_sampler_without_270_is_caught`, `::test_all_four_rotations_are_drawn_uniformly`, `::test_apply_crop_really_rotates_by_270` |
#
# The check below keeps this box honest: every test it names exists.

# %%
named = {"test_color.py": ["test_transposed_matrix_bug_is_caught"],
         "test_lpips.py": ["test_eager_rejects_unit_range_input", "test_under_jit_flag_and_checkify"],
         "test_augment.py": ["test_anchor_colour_axis_flip_is_caught", "test_flip_lr_mirrors_pixels_and_keeps_colours",
                             "test_apply_crop_flip_is_spatial", "test_anchor_rotation_sampler_without_270_is_caught",
                             "test_all_four_rotations_are_drawn_uniformly", "test_apply_crop_really_rotates_by_270"]}
for fname, tests in named.items():
    src = (S.root / "tests" / fname).read_text()
    for name in tests:
        assert re.search(rf"^def {name}\(", src, re.M), f"{fname}::{name} is missing"
assert "lpips/target_range_ok" in (S.root / "tests" / "test_train_steps.py").read_text()
print(f"all {sum(map(len, named.values()))} named tests exist")
