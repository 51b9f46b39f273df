"""The ``fvae`` command line. Thin: parses arguments, calls the package, maps errors to exit codes.

Exit codes: 0 success; 1 finished but some inputs were skipped (each reported); 2 nothing done because
of a usage, config or weight error (one line on stderr).
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
    vae = _load(args)
    report = reconstruct_files(vae.config, vae.params, args.images, args.out, mode=args.mode, seed=args.seed,
                               dtype=args.dtype, log=lambda m: print(f"fvae: {m}", file=sys.stderr))
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
    p.set_defaults(func=cmd_reconstruct)

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
    return parser


def main(argv=None) -> int:
    from fvae_core.images import ImageError
    from fvae_core.weights import WeightError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, ConfigError, WeightError, ImageError) as e:
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
