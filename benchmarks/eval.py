"""Speed of ``fvae eval``'s instruments: metric time for 200 images at 256², without model time.

A printed benchmark, not a test. Issue 6 asks for under 2 minutes of metric time on 2 cores for
200 images at 256². The images are 192 OpenMoji (flat art, rendered at 512 and resized) plus the 8
skimage photographs; the "VAE" is a Gaussian blur (sigma 1, numpy), so model time is close to zero
and what is timed is :func:`fvae_core.evaluate.evaluate`'s metric work: per-image PSNR, SSIM,
GMSD, colour errors (Oklab and CIEDE2000), spectra and edge metrics, plus LPIPS-VGG in batches.
Each piece is also timed alone on one image (median of ``--reps``) so one can see where time goes.
``--vaes 2`` evaluates two fake VAEs (the usual A/B case): the original's spectra and edge masks
are computed once and shared.

Usage::

    python benchmarks/eval.py            # 200 images, 256², LPIPS-VGG
    python benchmarks/eval.py --quick    # 40 images
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
from scipy.ndimage import gaussian_filter


class Blur:
    def __init__(self, name, sigma):
        self.name, self.sigma = name, sigma

    def __call__(self, x):
        return gaussian_filter(x, sigma=(0, self.sigma, self.sigma, 0), mode="reflect")


def _median_time(fn, reps):
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--vaes", type=int, default=1, choices=(1, 2))
    ap.add_argument("--lpips", default="vgg16", choices=("vgg16", "alexnet", "none"))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.images, args.reps = 40, 3

    from fvae_core import edges, metrics, spectra
    from fvae_core.evaluate import _reference, evaluate, gather_images, image_metrics

    print(f"cpu cores: {os.cpu_count()}")
    t0 = time.perf_counter()
    imgs, _ = gather_images(["photos"], log=lambda *a: None)
    imgs += gather_images(["openmoji"], limit=args.images - len(imgs), log=lambda *a: None)[0]
    print(f"images: {len(imgs)} ({sum(i.subset == 'photos' for i in imgs)} photos), "
          f"gathered in {time.perf_counter() - t0:.1f} s (not counted)")
    vaes = [Blur("blur1", 1.0), Blur("blur2", 0.7)][:args.vaes]
    lp = None if args.lpips == "none" else args.lpips
    # Warm-up on one LPIPS batch (4 images): LPIPS compilation, lazy imports.
    evaluate(vaes, imgs[:4], [args.resolution], lpips_net=lp, log=lambda *a: None, keep_recs=False)
    res = evaluate(vaes, imgs, [args.resolution], lpips_net=lp, log=lambda *a: None, keep_recs=False)
    t = res.timing
    total = t["metrics_s"] + t["lpips_s"]
    print(f"\nfvae eval, {len(imgs)} images x {args.vaes} VAE(s) at {args.resolution}²:")
    print(f"  metric time {total:.1f} s  (per-image metrics {t['metrics_s']:.1f} s, LPIPS {t['lpips_s']:.1f} s); "
          f"model time {t['model_s']:.1f} s (fake VAE)")
    print(f"  per reconstruction: {1000 * total / t['images']:.0f} ms; target: 200 images in < 120 s "
          f"-> {'met' if total * 200 / len(imgs) < 120 else 'NOT met'} "
          f"({total * 200 / len(imgs):.0f} s scaled to 200)")

    from fvae_core.data.augment import centre_square
    x8 = centre_square(imgs[-1].rgb, args.resolution)
    x = x8.astype(np.float64) / 255
    y = np.clip(gaussian_filter(x, (1, 1, 0)), 0, 1)
    ref = _reference(x)
    lab_y = np.moveaxis(metrics.oklab_np(y), -1, 0)
    pieces = {
        "reference (Oklab + masks, once per image)": lambda: _reference(x),
        "psnr": lambda: metrics.psnr(x, y, data_range=1.0),
        "ssim": lambda: metrics.ssim(x, y, data_range=1.0),
        "gmsd": lambda: metrics.gmsd(x, y),
        "colour_errors (Oklab + CIEDE2000)": lambda: metrics.colour_errors(x, y),
        "spectral_metrics (3 channels)": lambda: spectra.spectral_metrics(ref.lab, lab_y),
        "radial_spectra (3 channels)": lambda: spectra.radial_spectra(ref.lab, lab_y),
        "edge_metrics": lambda: edges.edge_metrics(ref.lab[0], lab_y[0], ref.masks),
        "image_metrics (all of the above but reference)": lambda: image_metrics(ref, y),
    }
    print(f"\none {args.resolution}² image, median of {args.reps}:")
    for name, fn in pieces.items():
        fn()
        print(f"  {name:48s} {1000 * _median_time(fn, args.reps):8.1f} ms")


if __name__ == "__main__":
    main()
