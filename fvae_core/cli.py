"""The ``fvae`` command line. Thin: parses arguments, calls the package, maps errors to exit codes.

Exit codes: 0 success; 1 finished but some inputs were skipped (each reported); 2 nothing done because
of a usage, config or weight error (one line on stderr). ``data prepare`` exits 0 whenever it wrote a
dataset, skipped files included: its report lists them, and a few bad files among thousands are normal.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fvae_core.autoencoder import ConfigError


class UsageError(ValueError):
    """A command-line problem that stops the command before any work."""


def _load(args):
    from fvae_core.weights import load_vae

    return load_vae(args.vae, config=args.config, allow_pickle=args.allow_pickle)


def _add_vae_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vae", required=True,
                   help="diffusers folder, hub id (owner/name[/subfolder]), or single-file .safetensors")
    p.add_argument("--config", default=None, help="config.json for a single file (else inferred from shapes)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow .ckpt/.pt/.bin (pickle can run arbitrary code: only for files you trust)")


def cmd_reconstruct(args) -> int:
    from fvae_core.reconstruct import reconstruct_files

    missing = [p for p in args.images if not Path(p).exists()]
    if len(missing) == len(args.images):
        raise UsageError(f"no input image exists: {', '.join(map(str, missing[:5]))}")
    if args.tile is not None and args.tile < 0:
        raise UsageError(f"--tile must be >= 0 (0: never tile), got {args.tile}")
    if args.tile and args.dtype != "float32":
        raise UsageError(f"--tile computes in float32; drop --dtype {args.dtype} or use --tile 0")
    vae = _load(args)
    report = reconstruct_files(vae.config, vae.params, args.images, args.out, mode=args.mode, seed=args.seed,
                               dtype=args.dtype, tile=args.tile, log=lambda m: print(f"fvae: {m}", file=sys.stderr))
    print(f"reconstructed {len(report.written)} image(s) into {args.out}; skipped {len(report.failed)}")
    if not report.written:
        return 2
    return 1 if report.failed else 0


def cmd_export(args) -> int:
    from fvae_core.weights import save_diffusers_folder, save_single_file

    vae = _load(args)
    if args.format == "diffusers":
        out = save_diffusers_folder(args.out, vae.config, vae.params, dtype=args.dtype)
    else:
        out = save_single_file(args.out, vae.config, vae.params, dtype=args.dtype)
    print(f"exported {vae.source} -> {out} ({args.format}, {args.dtype})")
    return 0


def cmd_demo(args) -> int:
    from fvae_core.demo import run_demo

    return run_demo(out_dir=Path(args.out), vae_src=args.vae, size=args.size)


def _background(text: str) -> tuple[int, int, int]:
    """'white', 'black', 'grey', '#rrggbb' or 'r,g,b' -> an sRGB triple."""
    named = {"white": (255, 255, 255), "black": (0, 0, 0), "grey": (128, 128, 128), "gray": (128, 128, 128)}
    t = text.strip().lower()
    try:
        if t in named:
            return named[t]
        if t.startswith("#") and len(t) == 7:
            return tuple(int(t[i:i + 2], 16) for i in (1, 3, 5))
        rgb = tuple(int(v) for v in t.split(","))
        if len(rgb) == 3 and all(0 <= v <= 255 for v in rgb):
            return rgb
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r} is not a colour (white, black, grey, #rrggbb or r,g,b)")


def cmd_data_prepare(args) -> int:
    from fvae_core.data import SourceError
    from fvae_core.data.prepare import NothingUsable, PrepareConfig, prepare

    try:
        cfg = PrepareConfig(max_side=args.max_side, min_side=args.min_side, upsample_small=args.upsample_small,
                            background=args.background, render_size=args.render_size,
                            max_pixels=args.max_pixels, val_fraction=args.val_fraction,
                            shard_size=args.shard_size)
        report = prepare(args.sources, args.out, cfg, workers=args.workers, overwrite=args.overwrite,
                         progress=not args.quiet)
    except (SourceError, NothingUsable, FileExistsError, ValueError) as e:
        raise UsageError(str(e)) from e
    lines = report.lines()
    print("\n".join(lines if args.verbose or len(lines) <= 40 else lines[:40] + [
        f"... {len(lines) - 40} more line(s) in {Path(args.out) / 'report.txt'}"]))
    return 0


def cmd_data_preview(args) -> int:
    import numpy as np

    from fvae_core.data.augment import AugmentConfig
    from fvae_core.images import save_png
    from fvae_core.data.loader import DatasetError, make_iterator, train_dataset, val_dataset

    try:
        cfg = AugmentConfig(crop=args.crop, min_scale=args.min_scale, max_scale=args.max_scale,
                            upsample_small=args.upsample_small)
        n = args.rows * args.cols
        ds = (val_dataset(args.data, cfg, n) if args.split == "val"
              else train_dataset(args.data, cfg, n, seed=args.seed, split=args.split))
    except (DatasetError, ValueError) as e:
        raise UsageError(str(e)) from e
    it = make_iterator(ds)
    try:
        batch = np.asarray(next(it)["image"])
    finally:
        it.close()
    batch = np.concatenate([batch, np.zeros((n - len(batch),) + batch.shape[1:], np.uint8)])
    grid = batch.reshape(args.rows, args.cols, cfg.crop, cfg.crop, 3).transpose(0, 2, 1, 3, 4)
    out = save_png(args.out, grid.reshape(args.rows * cfg.crop, args.cols * cfg.crop, 3))
    print(f"wrote {args.rows}x{args.cols} {args.split} crops of {cfg.crop}px to {out}")
    return 0


def cmd_train(args) -> int:
    import os

    from fvae_core.runs.config import ConfigError, apply_overrides, preset
    from fvae_core.runs.train import NonFiniteHalt, resume, train

    if os.environ.get("FVAE_DISTRIBUTED") == "1":
        import jax

        jax.distributed.initialize()  # multi-host: coordinator and ranks from the cluster environment
    log = (lambda m: None) if args.quiet else (lambda m: print(f"fvae: {m}", file=sys.stderr))
    try:
        if args.resume:
            if args.config or args.set or args.run_dir:
                raise UsageError("--resume takes only the run directory (its config.json is reused)")
            result = resume(args.resume, progress=not args.quiet, log=log)
        else:
            if not (args.config and args.run_dir):
                raise UsageError("give --config PRESET and --run-dir DIR, or --resume DIR")
            cfg = apply_overrides(preset(args.config), args.set or [])
            result = train(cfg, args.run_dir, progress=not args.quiet, log=log)
    except ConfigError as e:
        raise UsageError(str(e)) from e
    except NonFiniteHalt as e:
        print(f"fvae: error: {e}", file=sys.stderr)
        return 1
    f = result.final
    summary = ", ".join(f"{k} {v:.4g}" for k, v in f.items() if isinstance(v, float))
    print(f"{result.stopped} at step {result.step} in {result.seconds:.0f} s; {summary or 'no evaluation'}; "
          f"skipped steps {result.skipped_steps}; run dir {result.run_dir}")
    return 0


def cmd_eval(args) -> int:
    from fvae_core.evaluate import EvalError, parse_resolutions, run_eval

    try:
        result = run_eval(args.vae, args.data, Path(args.out), resolutions=parse_resolutions(args.resolutions),
                          limit=args.limit, split=args.split,
                          lpips_net=None if args.lpips == "none" else args.lpips, batch_size=args.batch_size,
                          figures=not args.no_figures, progress=not args.quiet)
    except EvalError as e:
        raise UsageError(str(e)) from e
    print((Path(args.out) / "summary.md").read_text())
    if result.skipped:
        print(f"fvae eval: {len(result.skipped)} image view(s) skipped, reasons in {Path(args.out) / 'skipped.json'}")
    return 0


def cmd_inspect(args) -> int:
    """fp16 / bf16 report of a VAE on real images (fvae_core.precision), and with ``--rescale-out`` the exact
    power-of-two rescale written as a diffusers folder, with its own report."""
    import json

    import numpy as np

    from fvae_core.evaluate import EvalError, gather_images, views_at
    from fvae_core.precision import inspect, report_markdown, rescale_for_half

    if args.size < 8 or args.size % 8:
        raise UsageError(f"--size must be a positive multiple of 8, got {args.size}")
    if not args.limit > 0:
        raise UsageError(f"--limit must be > 0, got {args.limit}")
    if args.rescale_limit is not None and not 0 < args.rescale_limit < 65504:
        raise UsageError(f"--rescale-limit must be between 0 and 65504, got {args.rescale_limit}")
    vae = _load(args)
    try:
        images, _ = gather_images(args.data or ["photos"], limit=args.limit,
                                  log=lambda m: print(f"fvae: {m}", file=sys.stderr))
    except EvalError as e:
        raise UsageError(str(e)) from e
    views, _ = views_at(images, args.size)
    if not views:
        raise UsageError(f"no image is at least {args.size}px on its short side; lower --size")
    x = np.stack([v.rgb for v in views]).astype(np.float32) / 255.0
    reports = {"as given": inspect(vae.config, vae.params, x)}
    if args.rescale_limit is not None or args.rescale_out:
        from fvae_core.weights import save_diffusers_folder

        fixed, factors = rescale_for_half(vae.config, vae.params, reports["as given"].layers,
                                          limit=args.rescale_limit or 2048.0)
        reports["rescaled"] = inspect(vae.config, fixed, x)
        if args.rescale_out:
            save_diffusers_folder(args.rescale_out, vae.config, fixed)
    text = "\n".join(f"## {label}\n\n{report_markdown(r)}" for label, r in reports.items())
    print(text)
    if args.out:
        from fvae_core.plotting import plot_activation_headroom, save_figure

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "inspect.md").write_text(text)
        (out / "inspect.json").write_text(json.dumps({label: {
            "precision": r.precision, "images": r.images,
            "layers": [{"name": m.name, "kind": m.kind, "max_abs": m.max_abs, "fp16_headroom": m.headroom}
                       for m in r.layers]} for label, r in reports.items()}, indent=1, default=float))
        ax = plot_activation_headroom({k: r.layers for k, r in reports.items()},
                                      title=f"{args.vae}: max |activation| on {len(x)} image(s) at {args.size}²")
        save_figure(ax.figure, "00_inspect_headroom", out)
    if args.rescale_out:
        print(f"rescaled weights (exact powers of two) written to {args.rescale_out}")
    return 0


def cmd_latents_train(args) -> int:
    import dataclasses
    import json

    from fvae_core.latents import train as lt
    from fvae_core.runs.config import ConfigError as RunConfigError
    from fvae_core.runs.config import apply_overrides, from_dict

    log = (lambda m: None) if args.quiet else (lambda m: print(f"fvae: {m}", file=sys.stderr))
    try:
        if args.resume:
            if args.config or args.set or args.run_dir or args.vae or args.data:
                raise UsageError("--resume takes only the run directory (its config.json is reused)")
            try:
                d = json.loads((Path(args.resume) / "config.json").read_text())
            except (OSError, ValueError) as e:
                raise UsageError(f"{args.resume}: not a latent run directory ({e})") from e
            cfg, run_dir = from_dict(lt.LatentRunConfig, d), args.resume
        else:
            if not args.run_dir:
                raise UsageError("give --run-dir DIR (and optionally --config, --vae, --data), or --resume DIR")
            name = args.config or "latent-flow"
            if name not in lt.PRESETS:
                raise UsageError(f"unknown latent preset {name!r}; choose from {', '.join(lt.PRESETS)}")
            cfg = lt.PRESETS[name]
            if args.vae:
                cfg = dataclasses.replace(cfg, vae=args.vae)
            if args.data:
                prepared = len(args.data) == 1 and (Path(args.data[0]) / "dataset.json").is_file()
                data = (dataclasses.replace(cfg.data, prepared=args.data[0]) if prepared
                        else dataclasses.replace(cfg.data, prepared=None, sources=tuple(args.data)))
                cfg = dataclasses.replace(cfg, data=data)
            cfg = apply_overrides(cfg, args.set or [])
            run_dir = args.run_dir
        model = lt.train(cfg, run_dir, resume=bool(args.resume), log=log)
    except RunConfigError as e:
        raise UsageError(str(e)) from e
    print(f"latent model written to {model}")
    return 0


def cmd_latents_sample(args) -> int:
    import re

    import numpy as np

    from fvae_core.data.prepare import move_into_place
    from fvae_core.images import save_png
    from fvae_core.latents.train import load_model
    from fvae_core.reconstruct import decode_latents
    from fvae_core.runs.config import ConfigError as RunConfigError
    from fvae_core.weights import load_vae

    if args.n < 1 or (args.steps is not None and args.steps < 1):
        raise UsageError("--n and --steps must be >= 1")
    try:
        model = load_model(args.model)
    except RunConfigError as e:
        raise UsageError(str(e)) from e
    size = None
    if args.size:
        size = (args.size, args.size)
        if args.size % model.config.multiple:
            raise UsageError(f"--size {args.size} is not a multiple of {model.config.multiple}")
    vaes = [(src, load_vae(src)) for src in args.vae or []]  # load every VAE before any work
    for src, vae in vaes:
        if vae.config.latent_channels != model.config.channels:
            raise UsageError(f"{src}: {vae.config.latent_channels} latent channels, the model makes "
                             f"{model.config.channels}")
    z = model.sample(args.n, args.seed, steps=args.steps, method=args.sampler, size=size)
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    np.save(tmp / "latents.npy", z)
    used = set()
    for src, vae in vaes:
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(src.rstrip("/")).name) or "vae"
        while name in used:
            name += "_"
        used.add(name)
        for i, img in enumerate(decode_latents(vae.config, vae.params, z)):
            save_png(tmp / name / f"{i:04d}.png", img)
    move_into_place(tmp, out)
    print(f"wrote {args.n} latents {z.shape[1]}x{z.shape[2]}x{z.shape[3]} (seed {args.seed}) to {out / 'latents.npy'}"
          + (f" and their decodes by {len(vaes)} VAE(s)" if vaes else ""))
    return 0


def cmd_latents_export(args) -> int:
    from fvae_core.latents.train import convert_model
    from fvae_core.runs.config import ConfigError as RunConfigError

    if Path(args.out).resolve() == Path(args.model).resolve():
        raise UsageError("--out must differ from --model")
    try:
        out = convert_model(args.model, args.out, args.dtype)
    except RunConfigError as e:
        raise UsageError(str(e)) from e
    print(f"latent model written to {out} ({args.dtype})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fvae", description="Furception-style VAE decoder fine-tuning in JAX/Flax")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("reconstruct", help="encode and decode images with a VAE (any size)")
    _add_vae_args(p)
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--out", required=True, help="output folder (PNG, same size as the input)")
    p.add_argument("--mode", choices=("mean", "sample"), default="mean", help="posterior mean or a sample")
    p.add_argument("--seed", type=int, default=0, help="seed for --mode sample")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    p.add_argument("--tile", type=int, default=None, metavar="N",
                   help="reconstruct in bands of N rows, exactly (whole-image GroupNorm statistics); 0: never; "
                        "default: only images whose widest activation is above 1 GiB (said on stderr)")
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("inspect", help="fp16/bf16 headroom of a VAE: per-layer max activations, half-precision "
                                       "decodes vs fp32, and an exact rescale that keeps fp16 finite")
    _add_vae_args(p)
    p.add_argument("--data", action="append", default=None,
                   help="images: a built-in source (photos, openmoji), folder or file; repeatable (default: photos)")
    p.add_argument("--size", type=int, default=256, help="centre squares of this size (default 256)")
    p.add_argument("--limit", type=int, default=8, help="images per source (default 8)")
    p.add_argument("--out", default=None, help="folder for inspect.md, inspect.json and the figure")
    p.add_argument("--rescale-limit", type=float, default=None,
                   help="rescale so every rescalable activation is at most this (default 2048 with --rescale-out)")
    p.add_argument("--rescale-out", default=None, help="write the rescaled VAE here (diffusers folder)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("export", help="convert a VAE to a diffusers folder or a single-file LDM .safetensors")
    _add_vae_args(p)
    p.add_argument("--format", choices=("diffusers", "single-file"), required=True)
    p.add_argument("--out", required=True, help="folder (diffusers) or .safetensors path (single-file)")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="stored weight dtype")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="reconstruction demo on bundled photos (the README's `make demo`)")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--vae", default=None, help="a VAE to use instead of the bundled random-init tiny one")
    p.add_argument("--size", type=int, default=256, help="short side the photos are resized to")
    p.set_defaults(func=cmd_demo)

    data = sub.add_parser("data", help="prepare and inspect training data").add_subparsers(dest="data_command",
                                                                                         required=True)
    p = data.add_parser("prepare", help="decode folders / openmoji / photos once into shards (exit 2 if none usable)")
    p.add_argument("sources", nargs="+", metavar="SRC",
                   help="a folder (recursive), an image file, 'openmoji' (4,495 flat-colour SVGs), 'photos' or "
                        "'painterly' (packaged photographs / paintings; more after `make debian-data`)")
    p.add_argument("--out", required=True, help="output folder (created atomically)")
    p.add_argument("--max-side", type=int, default=None, help="pre-downscale so the long side is at most N")
    p.add_argument("--min-side", type=int, default=256, help="skip images whose short side is below N (default 256)")
    p.add_argument("--upsample-small", action="store_true", help="upsample images below --min-side instead")
    p.add_argument("--background", type=_background, default=(255, 255, 255),
                   help="colour under transparency: white (default), black, grey, #rrggbb, r,g,b")
    p.add_argument("--render-size", type=int, default=512, help="OpenMoji render size (default 512)")
    p.add_argument("--max-pixels", type=int, default=89_478_485,
                   help="refuse larger images as decompression bombs (default: Pillow's, ~89 MP)")
    p.add_argument("--val-fraction", type=float, default=0.02, help="validation share, by content hash (0.02)")
    p.add_argument("--shard-size", type=int, default=1000, help="records per shard file")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: all CPUs)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="print the whole report (always in report.txt)")
    p.set_defaults(func=cmd_data_prepare)

    p = sub.add_parser("train", help="train or finetune a VAE (a run directory with checkpoints and export)")
    p.add_argument("--config", help="preset: smoke, tiny-cpu, tiny-cpu-finetune, small-cpu, small-cpu-finetune, "
                                    "sd-vae-ft-mse, sd-vae-ft-mse/<ablation>")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field, dotted (recipe.lr=1e-5, data.crop=128, steps=500); repeatable")
    p.add_argument("--run-dir", help="new (or empty) run directory")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run exactly from its latest checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    p.set_defaults(func=cmd_train)

    latents = sub.add_parser("latents", help="a small latent generative model: train it, sample latents"
                             ).add_subparsers(dest="latents_command", required=True)
    p = latents.add_parser("train", help="train a rectified-flow UNet on a VAE's latents (a run directory)")
    p.add_argument("--config", help="preset: latent-flow (default), latent-smoke")
    p.add_argument("--vae", help="the VAE whose latents are modelled (default: the preset's, weights/small-cpu)")
    p.add_argument("--data", nargs="+", help="a prepared folder, or sources (openmoji, photos, folders)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field, dotted (steps=2000, unet.widths=[32,64]); repeatable")
    p.add_argument("--run-dir", help="new (or empty) run directory")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run exactly from its latest checkpoint")
    p.add_argument("--quiet", action="store_true", help="no log lines")
    p.set_defaults(func=cmd_latents_train)
    p = latents.add_parser("sample", help="sample latents (deterministic for a seed), optionally decode them")
    p.add_argument("--model", required=True, help="a latent model folder (a latent run's model/)")
    p.add_argument("--n", type=int, default=16, help="number of latents")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's)")
    p.add_argument("--sampler", choices=("euler", "heun"), default=None, help="default: the model's")
    p.add_argument("--size", type=int, default=None, help="latent side (default: the training size)")
    p.add_argument("--vae", action="append", help="decode with this VAE too (repeatable): OUT/<name>/NNNN.png")
    p.add_argument("--out", required=True, help="output folder: latents.npy (unscaled NHWC) and PNGs")
    p.set_defaults(func=cmd_latents_sample)
    p = latents.add_parser("export", help="copy a latent model with its weights stored as fp16 or fp32")
    p.add_argument("--model", required=True, help="a latent model folder")
    p.add_argument("--out", required=True, help="the new model folder")
    p.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    p.set_defaults(func=cmd_latents_export)

    p = sub.add_parser("eval", help="measure VAEs on the same images: fidelity, colour, spectra, edges, with CIs")
    p.add_argument("--vae", action="append", required=True,
                   help="a VAE (diffusers folder, hub id, single file) or a no-learning reference bicubic:F "
                        "(Lanczos down by F, bicubic up); repeat to compare, the first is the baseline")
    p.add_argument("--data", nargs="+", required=True, metavar="SRC",
                   help="prepared dataset folder(s), 'openmoji', 'photos', 'painterly', image folders or files")
    p.add_argument("--out", required=True, help="new output folder (per-image CSV/JSONL, summary, spectra, figures)")
    p.add_argument("--resolutions", default="256", help="comma-separated square sizes, e.g. 128,256,512 (default 256)")
    p.add_argument("--limit", type=int, default=None, help="at most N images per source (content-hash order)")
    p.add_argument("--split", default="val", help="split of a prepared dataset (default val)")
    p.add_argument("--lpips", choices=("vgg16", "alexnet", "none"), default="vgg16", help="LPIPS backbone")
    p.add_argument("--batch-size", type=int, default=4, help="images per model / LPIPS call")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    p = data.add_parser("preview", help="write a grid of augmented crops from a prepared dataset")
    p.add_argument("data", help="a folder written by `fvae data prepare`")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--split", choices=("train", "val"), default="train",
                   help="train: random augmented crops; val: the fixed centre crops")
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--min-scale", type=float, default=0.25)
    p.add_argument("--max-scale", type=float, default=1.0)
    p.add_argument("--upsample-small", action="store_true")
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--cols", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data_preview)
    return parser


def _step_pixels(args) -> int | None:
    """Pixels per micro-batch (micro-batch x crop^2) of the run ``fvae train`` is asked for; None where its
    config can't be read (the run itself then says why)."""
    from pathlib import Path

    from fvae_core.runs.config import apply_overrides, load_config, preset
    from fvae_core.train_steps import step_pixels

    try:
        if args.resume:
            cfg = load_config(Path(args.resume) / "config.json")
        else:
            cfg = apply_overrides(preset(args.config), args.set or [])
        return step_pixels(cfg.micro_batch, cfg.data.crop)
    except (ConfigError, TypeError, ValueError):  # no or a bad config: the run reports it
        return None


def _reexec_with_host_tunables(args) -> None:
    """``fvae train`` from the command line: where this process would train on the CPU on glibc, with steps
    of at least :data:`fvae_core.train_steps.HUGE_PAGES_MIN_PIXELS`, and its environment lacks
    :data:`fvae_core.train_steps.HOST_GLIBC_TUNABLES` (transparent huge pages for malloc's mapped chunks),
    run this command again in this process, with them; glibc reads its tunables only when a process
    starts. A ``GLIBC_TUNABLES`` that already names ``glibc.malloc.hugetlb`` is kept as it is (set it to 0
    to train without huge pages, to 1 to train a small step with them)."""
    import os

    from fvae_core.train_steps import host_allocator_environ

    pixels = _step_pixels(args)
    env = host_allocator_environ(pixels=pixels) if pixels is not None else None
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", "fvae_core.cli", *sys.argv[1:]], env)


def main(argv=None) -> int:
    from fvae_core.images import ImageError
    from fvae_core.runs.checkpoint import CheckpointError
    from fvae_core.weights import WeightError

    args = build_parser().parse_args(argv)
    if argv is None and args.func is cmd_train:
        _reexec_with_host_tunables(args)
    try:
        return args.func(args)
    except (UsageError, ConfigError, WeightError, ImageError, CheckpointError) as e:
        print(f"fvae: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unwritable output, a file where a folder is expected, disk full, ...
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"fvae: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fvae: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
