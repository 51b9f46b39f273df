"""Tiled decode, side by side: fvae tiled (exact, ``fvae_core.tiling``), fvae untiled, diffusers tiled
(``enable_tiling()``: per-tile GroupNorm, blended overlaps) and diffusers untiled, same random
sd-vae-ft-mse-architecture weights and latents.

A printed benchmark, not a test. Each method runs in its own child process (peak RSS is per process); each
child decodes once to warm up (jit compile, allocator) and then ``--reps`` times, and reports the median
time, its peak RSS and the decoded image. The parent compares each tiled output with its own framework's
untiled one (max abs difference and PSNR on [-1, 1] images clipped as a decoder's output is) and fvae's
untiled with diffusers' untiled (the parity check).

Usage::

    python benchmarks/tiling.py                          # 1024x768 decode (128x96 latent), all four
    python benchmarks/tiling.py --latent 512x512 --methods fvae-tiled --reps 1   # the 4096² decode
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

from _child import ms, peak_rss_mb, run_child  # benchmarks/_child.py (this folder is on sys.path)

METHODS = ("fvae-tiled", "fvae-untiled", "diffusers-tiled", "diffusers-untiled")


def _setup(seed: int, latent_hw: tuple[int, int]):
    from fvae_core.autoencoder import PRESET_CONFIGS, init_params

    cfg = PRESET_CONFIGS["sd-vae-ft-mse"]
    params = init_params(cfg, seed)
    z = np.random.default_rng(seed).standard_normal((1, *latent_hw, cfg.latent_channels)).astype(np.float32)
    return cfg, params, z


def child(method: str, latent: str, reps: int, band_mib: int, out: str) -> None:
    hw = tuple(int(v) for v in latent.split("x"))
    cfg, params, z = _setup(0, hw)
    if method.startswith("fvae"):
        import jax

        from fvae_core.autoencoder import AutoencoderKL
        from fvae_core.tiling import tiled_decode

        if method == "fvae-tiled":
            def run():
                return tiled_decode(cfg, params, z, band_bytes=band_mib << 20)
        else:
            m = AutoencoderKL(cfg)
            f = jax.jit(lambda p, z: m.apply({"params": p}, z, method=m.decode))
            params = jax.device_put(params)

            def run():
                return np.asarray(f(params, z))
    else:
        import torch
        from diffusers import AutoencoderKL as TorchVAE

        from fvae_core.weights import diffusers_state_dict_from_params

        torch.set_grad_enabled(False)
        model = TorchVAE.from_config(cfg.to_dict()).eval()
        state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in diffusers_state_dict_from_params(params).items()}
        model.load_state_dict(state, strict=True)
        if method == "diffusers-tiled":
            model.enable_tiling()
        zt = torch.from_numpy(z.transpose(0, 3, 1, 2).copy())

        def run():
            return model.decode(zt).sample.numpy().transpose(0, 2, 3, 1)

    t0 = time.perf_counter()
    y = run()
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        y = run()
        times.append(time.perf_counter() - t0)
    np.save(out, np.asarray(y, np.float32))
    print(json.dumps({"method": method, "first_s": first, "median_s": statistics.median(times) if times else first,
                      "times": times, "peak_rss_mb": peak_rss_mb()}))


def _psnr(a, b) -> float:
    a, b = np.clip(a, -1, 1), np.clip(b, -1, 1)
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(4.0 / mse)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--latent", default="96x128", help="latent H x W (96x128: a 768x1024 image)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--band-mib", type=int, default=64, help="fvae-tiled band size")
    ap.add_argument("--child", nargs=4, metavar=("METHOD", "LATENT", "REPS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        method, latent, reps, out = args.child
        child(method, latent, int(reps), args.band_mib, out)
        return
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"unknown methods {bad}; choose from {', '.join(METHODS)}")
    h, w = (int(v) for v in args.latent.split("x"))
    print(f"# tiled decode, sd-vae-ft-mse architecture (random weights), latent {h}x{w} -> image {8 * h}x{8 * w}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; median of {args.reps} after one warm-up")
    rows, images = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for m in methods:
            out = os.path.join(tmp, f"{m}.npy")
            rows[m] = run_child(__file__, ["--band-mib", str(args.band_mib), "--child", m, args.latent, str(args.reps), out],
                                timeout=6 * 3600)
            images[m] = np.load(out)
    print("| method | median time | first call | peak RSS | vs its untiled: max abs | PSNR (dB) |")
    print("|---|---|---|---|---|---|")
    for m in methods:
        r, ref = rows[m], m.replace("-tiled", "-untiled")
        cmp = ("—", "—")
        if m.endswith("-tiled") and ref in images:
            cmp = (f"{np.abs(images[m] - images[ref]).max():.2e}", f"{_psnr(images[m], images[ref]):.1f}")
        print(f"| {m} | {ms(r['median_s'])} | {ms(r['first_s'])} | {r['peak_rss_mb']:.0f} MiB | {cmp[0]} | {cmp[1]} |")
    if "fvae-tiled" in rows and "fvae-untiled" in rows:
        print(f"fvae tiled / untiled time: {rows['fvae-tiled']['median_s'] / rows['fvae-untiled']['median_s']:.2f}x")
    if "fvae-untiled" in images and "diffusers-untiled" in images:
        d = np.abs(images["fvae-untiled"] - images["diffusers-untiled"]).max()
        print(f"parity: fvae untiled vs diffusers untiled max abs {d:.2e}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
