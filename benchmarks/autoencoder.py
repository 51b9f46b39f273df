"""Decoder speed and memory: fvae (JAX/Flax, jit) vs diffusers' PyTorch ``AutoencoderKL``, same weights.

A printed benchmark, not a test. For each config it measures, side by side:

* decoder forward (``decode`` of random-normal latents; torch under ``no_grad``),
* decoder forward+backward of ``loss = mean(decoded ** 2)`` with gradients w.r.t. the decoder params only
  (``decoder`` + ``post_quant_conv``; the encoder is frozen), as in a decoder finetune,
* XLA compile time (fvae; reported separately, never inside a median),
* peak RSS of each framework, each in its own child process (RSS is per process).

Timings run in one child process that holds both frameworks and alternates fvae/torch repetitions, so that
load from other processes on a shared machine hits both alike; we report medians. The torch model is built
from ``config.to_dict()`` and its state dict is ported into fvae with
:func:`fvae_core.weights.params_from_diffusers_state_dict`; the decoded images are compared as a check.

Usage::

    python benchmarks/autoencoder.py                 # tiny-sd B8 64^2 and sd-vae-ft-mse B1 256^2
    python benchmarks/autoencoder.py --configs tiny --reps 10
    python benchmarks/autoencoder.py --quick         # 2 reps per measure, a smoke run
    python benchmarks/autoencoder.py --xla-conv-grad # fvae without the custom conv gradient (baseline)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

from _child import ms, peak_rss_mb, rss_now, run_child  # benchmarks/_child.py (this folder is on sys.path)

#: name -> (preset, batch, image size).
CASES = {
    "tiny": ("tiny-sd", 8, 64),
    "sd": ("sd-vae-ft-mse", 1, 256),
}
DEFAULT_REPS = {"tiny": 10, "sd": 3}
TORCH_THREADS = 2
SETTLE_S = 0.05


# ---- the workloads, one builder per framework ---------------------------------------------------------
def _case(name):
    from fvae_core.autoencoder import PRESET_CONFIGS

    preset, batch, size = CASES[name]
    cfg = PRESET_CONFIGS[preset]
    f = cfg.downsample_factor
    latent_shape_nhwc = (batch, size // f, size // f, cfg.latent_channels)
    return cfg, latent_shape_nhwc


def _latents(shape_nhwc, seed=0):
    import numpy as np

    return np.random.default_rng(seed).standard_normal(shape_nhwc).astype("float32")


def _torch_model(cfg, seed=0):
    import torch
    from diffusers import AutoencoderKL as TorchAutoencoderKL

    torch.set_num_threads(TORCH_THREADS)
    torch.manual_seed(seed)
    model = TorchAutoencoderKL.from_config(cfg.to_dict()).float().eval()
    # A decoder finetune: only the decoder side of the model trains.
    for p in model.parameters():
        p.requires_grad_(False)
    for p in list(model.decoder.parameters()) + list(model.post_quant_conv.parameters()):
        p.requires_grad_(True)
    return model


def _torch_fns(model, z_nhwc):
    import torch

    z = torch.from_numpy(z_nhwc).permute(0, 3, 1, 2).contiguous()
    trainable = [p for p in model.parameters() if p.requires_grad]

    def fwd():
        with torch.no_grad():
            return model.decode(z).sample

    def fwd_bwd():
        for p in trainable:
            p.grad = None
        loss = model.decode(z).sample.square().mean()
        loss.backward()
        return loss.item()

    return fwd, fwd_bwd


def _fvae_fns(cfg, params, z_nhwc):
    """Compiled fvae decoder forward and forward+backward; returns (fwd, fwd_bwd, compile seconds)."""
    import jax
    import jax.numpy as jnp

    from fvae_core.autoencoder import AutoencoderKL

    model = AutoencoderKL(cfg)
    params = jax.tree.map(jnp.asarray, params)
    z = jnp.asarray(z_nhwc)
    dec_keys = [k for k in ("decoder", "post_quant_conv") if k in params]
    dec = {k: params[k] for k in dec_keys}
    frozen = {k: v for k, v in params.items() if k not in dec_keys}

    def decode(dec, frozen, z):
        return model.apply({"params": {**frozen, **dec}}, z, method=AutoencoderKL.decode)

    def loss(dec, frozen, z):
        return jnp.mean(jnp.square(decode(dec, frozen, z)))

    compile_s = {}
    t = time.perf_counter()
    fwd_c = jax.jit(decode).lower(dec, frozen, z).compile()
    compile_s["fwd"] = time.perf_counter() - t
    t = time.perf_counter()
    fb_c = jax.jit(jax.value_and_grad(loss)).lower(dec, frozen, z).compile()
    compile_s["fwd_bwd"] = time.perf_counter() - t

    def fwd():
        return jax.block_until_ready(fwd_c(dec, frozen, z))

    def fwd_bwd():
        return jax.block_until_ready(fb_c(dec, frozen, z))

    return fwd, fwd_bwd, compile_s


def _timed(fn):
    # Let the other framework's worker threads stop spinning before we start the clock (2 cores).
    time.sleep(SETTLE_S)
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ---- child processes ------------------------------------------------------------------------------------
def _child_time(name, reps):
    """Both frameworks in one process, same weights, alternating repetitions."""
    import jax
    import numpy as np
    import torch

    from fvae_core.weights import params_from_diffusers_state_dict

    cfg, zshape = _case(name)
    z = _latents(zshape)
    tmodel = _torch_model(cfg)
    state = {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}
    params = params_from_diffusers_state_dict(state, cfg, source="torch AutoencoderKL")
    del state
    t_fwd, t_fb = _torch_fns(tmodel, z)
    f_fwd, f_fb, compile_s = _fvae_fns(cfg, params, z)

    # Check that both sides compute the same function (the port is exact; fp32 summation order differs).
    y_f = np.asarray(f_fwd())
    y_t = t_fwd().permute(0, 2, 3, 1).numpy()
    max_abs = float(np.max(np.abs(y_f - y_t)))
    # Warm-up (first calls allocate; torch's autograd and allocator warm up too).
    f_fb(), t_fb()

    times = {"fvae": {"fwd": [], "fwd_bwd": []}, "torch": {"fwd": [], "fwd_bwd": []}}
    fns = {"fvae": {"fwd": f_fwd, "fwd_bwd": f_fb}, "torch": {"fwd": t_fwd, "fwd_bwd": t_fb}}
    for measure in ("fwd", "fwd_bwd"):
        for r in range(reps):
            order = ("fvae", "torch") if r % 2 == 0 else ("torch", "fvae")
            for fw in order:
                times[fw][measure].append(_timed(fns[fw][measure]))
    return {
        "times": times, "compile_s": compile_s, "max_abs_diff": max_abs,
        "jax": jax.__version__, "torch": torch.__version__, "jax_device": str(jax.devices()[0]),
        "jax_backend": jax.default_backend(),
    }


def _child_rss(name, framework):
    """One framework alone: setup, compile, one forward, one forward+backward; peak RSS of this process."""
    cfg, zshape = _case(name)
    z = _latents(zshape)
    if framework == "fvae":
        from fvae_core.autoencoder import init_params

        params = init_params(cfg)  # values do not change memory; keeps torch out of this process
        rss_setup = rss_now()
        fwd, fwd_bwd, _ = _fvae_fns(cfg, params, z)
    else:
        model = _torch_model(cfg)
        rss_setup = rss_now()
        fwd, fwd_bwd = _torch_fns(model, z)
    fwd()
    fwd_bwd()
    fwd_bwd()
    return {"peak_rss_mb": peak_rss_mb(), "setup_rss_mb": rss_setup}


# ---- report ---------------------------------------------------------------------------------------------
def _row(label, measure, f, t, ratio):
    return f"| {label} | {measure} | {f} | {t} | {ratio:.2f} |"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="tiny,sd", help=f"comma-separated subset of {sorted(CASES)}")
    ap.add_argument("--reps", type=int, default=None,
                    help="timed repetitions per measure and framework (default: " +
                         ", ".join(f"{k} {v}" for k, v in DEFAULT_REPS.items()) + ")")
    ap.add_argument("--quick", action="store_true", help="2 repetitions per measure (a smoke run)")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS child processes")
    ap.add_argument("--xla-conv-grad", action="store_true",
                    help="fvae uses XLA's own conv gradient everywhere (the baseline before fvae_core.conv)")
    ap.add_argument("--_child", choices=["time", "rss-fvae", "rss-torch"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        ap.error(f"unknown configs {unknown}; choose from {sorted(CASES)}")

    if args.xla_conv_grad:
        import fvae_core.conv

        fvae_core.conv.MIN_CHANNELS = 10**9  # read at trace time: no conv takes the custom gradient
    if args._child:
        (name,) = names
        if args._child == "time":
            out = _child_time(name, args.reps)
        else:
            out = _child_rss(name, args._child.split("-")[1])
        print(json.dumps(out), flush=True)
        return

    results = {}
    t0 = time.perf_counter()
    for name in names:
        reps = 2 if args.quick else (args.reps or DEFAULT_REPS[name])
        print(f"[{name}] timing, {reps} reps per measure ...", file=sys.stderr, flush=True)
        extra = ["--xla-conv-grad"] if args.xla_conv_grad else []
        res = run_child(__file__, ["--_child", "time", "--configs", name, "--reps", str(reps), *extra], timeout=1800)
        res["reps"] = reps
        if not args.no_rss:
            for fw in ("fvae", "torch"):
                print(f"[{name}] peak RSS, {fw} alone ...", file=sys.stderr, flush=True)
                res[f"rss_{fw}"] = run_child(__file__, ["--_child", f"rss-{fw}", "--configs", name, *extra],
                                             timeout=1800)
        results[name] = res
    total = time.perf_counter() - t0

    any_res = next(iter(results.values()))
    print("\n## Decoder: fvae (JAX, jit) vs diffusers PyTorch AutoencoderKL, same weights\n")
    print(f"jax {any_res['jax']} ({any_res['jax_backend']}, {any_res['jax_device']}), torch {any_res['torch']} "
          f"({TORCH_THREADS} threads), {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
          f"python {platform.python_version()}. Medians; fvae/torch is a time (or memory) ratio, below 1 "
          f"means fvae is faster (smaller). Loss = mean(decoded²), grads w.r.t. decoder + post_quant_conv. "
          f"fvae conv gradient: {'XLA only (--xla-conv-grad)' if args.xla_conv_grad else 'fvae_core.conv (auto)'}.\n")
    print("| config | measure | fvae | torch | fvae/torch |")
    print("|---|---|---|---|---|")
    for name, res in results.items():
        preset, batch, size = CASES[name]
        label = f"{preset}, B{batch}, {size}²"
        for measure, title in (("fwd", "decoder fwd"), ("fwd_bwd", "decoder fwd+bwd")):
            f = statistics.median(res["times"]["fvae"][measure])
            t = statistics.median(res["times"]["torch"][measure])
            print(_row(label, f"{title} (median of {res['reps']})", ms(f), ms(t), f / t))
            label = ""
        c = res["compile_s"]
        print(f"| | fvae compile (fwd / fwd+bwd) | {c['fwd']:.1f} s / {c['fwd_bwd']:.1f} s | — | |")
        if "rss_fvae" in res:
            rf, rt = res["rss_fvae"]["peak_rss_mb"], res["rss_torch"]["peak_rss_mb"]
            print(_row("", "peak RSS (own process)", f"{rf / 1024:.2f} GB", f"{rt / 1024:.2f} GB", rf / rt))
        print(f"| | max abs diff of decoded image | {res['max_abs_diff']:.1e} | | |")

    print("\nAll repetitions (seconds):")
    for name, res in results.items():
        for fw in ("fvae", "torch"):
            for measure, ts in res["times"][fw].items():
                print(f"  {name:5s} {fw:5s} {measure:8s} " + " ".join(f"{x:.3f}" for x in ts))
        for fw in ("fvae", "torch"):
            if f"rss_{fw}" in res:
                r = res[f"rss_{fw}"]
                print(f"  {name:5s} {fw:5s} RSS after setup {r['setup_rss_mb']:.0f} MB, peak {r['peak_rss_mb']:.0f} MB")
    print(f"\nTotal benchmark time {total:.0f} s.")


if __name__ == "__main__":
    main()
