"""Commit a finished base run as ``weights/<name>/``: its EMA export, a ``RECORD.json`` and its learning curve.

    python weights/record_base.py RUN_DIR weights/small-cpu [--probe LABEL=RUN_DIR ...] [--prepared DIR]

What the record holds, beside the run's own config, command, commit, time and final metrics:

* ``curve``: the run's validation PSNR (the run's fixed 64² validation crops, raw and EMA weights) at every
  evaluation, with the same numbers for the no-learning references bicubic×8 and bicubic×4 and for the
  previous base ``weights/tiny-cpu`` on the same crops, so the curve has a scale;
* ``eval128``: the issue's acceptance numbers: mean PSNR [95% CI] at 128² on OpenMoji's validation split
  (rendered at 128², the split fixed by content hash as in ``fvae data prepare``), and on every packaged
  photo and painting this machine has, for this base, the previous base and both bicubic references, with
  the share of error energy above 1/4 cycle/px (the regime: a good VAE's error sits at high frequencies);
* ``per_image``: PSNR of the first 16 OpenMoji validation images (content-hash order) for this base and
  bicubic×8, which ``tests/test_base_weights.py`` recomputes.

The reference lines are measured on the run's own validation crops: the prepared folder its
``environment.json`` names (``--prepared`` overrides it, e.g. after the folder moved). The figure goes to
``figures/03_base_learning_curve.png``. Everything is written to a temporary folder first and renamed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PER_IMAGE = 16


def openmoji_val_images(size: int = 128, limit: int | None = None):
    """OpenMoji's validation split (content hash below ``val_fraction``, duplicates once), rendered at
    ``size``² over white, in content-hash order: what a base trained at ``render_size=size`` validates on."""
    from fvae_core.data.prepare import PrepareConfig, val_fraction_of
    from fvae_core.data.sources import decode_item, item_bytes, resolve_sources, sha256
    from fvae_core.evaluate import EvalImage

    items, _ = resolve_sources(["openmoji"])
    hashed = sorted(((sha256(data), it, data) for it in items for data in [item_bytes(it)]), key=lambda t: t[0])
    out, seen = [], set()
    for digest, it, data in hashed:
        if val_fraction_of(digest) >= PrepareConfig().val_fraction:
            break
        if digest in seen:
            continue
        seen.add(digest)
        out.append(EvalImage(f"openmoji/{it.name}", "flat art", decode_item(it, data, render_size=size).rgb))
        if limit is not None and len(out) >= limit:
            break
    return out


def _est(e) -> dict:
    return {"mean": float(e.value), "lo": float(e.lo), "hi": float(e.hi), "n": int(e.n)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--probe", action="append", default=[], metavar="LABEL=RUN_DIR",
                    help="a learning-rate probe run whose training loss is drawn beside the base's")
    ap.add_argument("--prepared", default=None,
                    help="the prepared folder the run trained on (default: its environment.json's data_dir)")
    ap.add_argument("--previous", default=str(ROOT / "weights" / "tiny-cpu"))
    ap.add_argument("--command", default=None, help="the command that made the run (default: from its argv)")
    args = ap.parse_args(argv)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fvae_core.data.prepare import move_into_place
    from fvae_core.evaluate import EvalError, ResizeReconstructor, VAEReconstructor, evaluate, gather_images
    from fvae_core.plotting import save_figure
    from fvae_core.runs.config import RunConfig, from_dict
    from fvae_core.runs.train import PSNR_8BIT_CAP, evaluate_reconstructor, evaluate_vae
    from fvae_core.suite import REFERENCES
    from fvae_core.weights import load_vae

    run = args.run_dir
    cfg = from_dict(RunConfig, json.loads((run / "config.json").read_text()))
    env = json.loads((run / "environment.json").read_text())
    final = json.loads((run / "final.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    export = run / "export" / "diffusers"
    if not (export / "config.json").is_file():
        print(f"{export}: no export (has the run finished?)", file=sys.stderr)
        return 2
    prepared = args.prepared or env.get("data_dir")
    if not prepared or not (Path(prepared) / "dataset.json").is_file():
        print(f"{prepared}: not a prepared folder; name the one the run trained on with --prepared", file=sys.stderr)
        return 2
    eval_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, prepared=str(prepared)))

    # The learning curve with its scale: references on the run's own validation crops.
    curve = [{"step": r["step"], "val/psnr": r["val/psnr"], "val_ema/psnr": r["val_ema/psnr"]}
             for r in rows if "val_ema/psnr" in r]
    resizes = [ResizeReconstructor.parse(ref) for ref in REFERENCES]
    refs = {r.name: evaluate_reconstructor(eval_cfg, r, log=lambda m: None)["val/psnr"] for r in resizes}
    prev = load_vae(args.previous)
    refs["previous base"] = evaluate_vae(eval_cfg, prev.config, prev.params, log=lambda m: None)["val/psnr"]

    # The acceptance numbers at 128².
    flat = openmoji_val_images(128)
    others = []
    for src in ("photos", "painterly"):
        try:
            others += gather_images([src], render_size=512, log=print)[0]
        except EvalError as e:  # painterly is absent on a pip-only machine: say so, measure the rest
            print(f"record: {src} not measured: {e}")
    vaes = [VAEReconstructor.load(str(export), "base"), VAEReconstructor.load(args.previous, "previous base"),
            *resizes]
    result = evaluate(vaes, flat + others, [128], lpips_net="alexnet", keep_recs=False, log=print)
    summ = result.summary(["psnr", "lpips", "err_hf_share@0.25_L"])
    eval128 = {v: {g: {k: _est(e) for k, e in ks.items()} for g, ks in summ[v][128].items()} for v in result.vaes}
    gap = result.paired("bicubic×8", "base", ["psnr"])[128]["flat art"]["psnr"]
    psnr_of = {v: {r["image"]: r["psnr"] for r in result.select(v, 128, "flat art")} for v in ("base", "bicubic×8")}
    per_image = {im.name: {v: psnr_of[v][im.name] for v in psnr_of} for im in flat[:PER_IMAGE]}

    record = {
        "what": (f"{cfg.model} VAE (SD-shaped, f=8, 4 latent channels) pretrained from random init with the LDM "
                 f"recipe (hinge GAN from step {cfg.recipe.disc_start}) by fvae's own pretrain command; the EMA "
                 f"weights of the run, stored as {cfg.export_dtype}"),
        "command": args.command or " ".join(["fvae"] + env["argv"][1:]),
        "git_commit": env["git_commit"],
        "machine": f"{env['cpu_count']} CPU cores, {env['platform']}, jax {env['versions']['jax']}",
        "seconds": final["seconds"],
        "steps": final["step"],
        "final": final["final"],
        "config": json.loads((run / "config.json").read_text()),
        "prepared": str(prepared),
        "curve": curve,
        "curve_references": refs,
        "curve_references_note": ("mean PSNR over the run's 64² validation crops, each image's capped at the "
                                  f"8-bit quantisation limit ({PSNR_8BIT_CAP:.1f} dB), as the run's own val/psnr is"),
        "eval128": eval128,
        "eval128_images": {g: len(result.select("base", 128, g)) for g in result.subsets()},
        "base_minus_bicubic8_flat_db": _est(gap),
        "per_image": per_image,
    }

    # The figure: validation PSNR against steps with its scale, and the probes' training loss.
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    ax = axes[0]
    ax.plot([c["step"] for c in curve], [c["val/psnr"] for c in curve], "o-", label="base (raw weights)")
    ax.plot([c["step"] for c in curve], [c["val_ema/psnr"] for c in curve], "s-", label="base (EMA)")
    for (name, v), style in zip(refs.items(), ("--", ":", "-.")):
        ax.axhline(v, ls=style, color="k", lw=1, label=f"{name}: {v:.2f} dB")
    ax.axvspan(cfg.recipe.disc_start, cfg.steps, color="0.9", label="adversarial phase")
    ax.set(xlabel="step", ylabel="PSNR (dB)", title=f"validation PSNR, {cfg.data.crop}² crops of the run's val split")
    ax.legend(fontsize=8)
    ax = axes[1]
    for label, d in [(f"base (lr {cfg.recipe.lr:g})", run)] + [tuple(p.split("=", 1)) for p in args.probe]:
        rs = [json.loads(line) for line in Path(d, "metrics.jsonl").read_text().splitlines() if "loss/rec" in line]
        ax.plot([r["step"] for r in rs], [r["loss/rec"] for r in rs], label=label, lw=1)
    ax.set(xlabel="step", ylabel="reconstruction loss (pixel + LPIPS)", yscale="log", title="training loss")
    ax.legend(fontsize=8)
    fig.tight_layout()

    out = args.out
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for f in ("config.json", "diffusion_pytorch_model.safetensors"):
            shutil.copy2(export / f, tmp / f)
        (tmp / "RECORD.json").write_text(json.dumps(record, indent=1) + "\n")
        move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    save_figure(fig, "03_base_learning_curve", ROOT / "figures")
    b, p, b8, b4 = (eval128[v]["flat art"]["psnr"]["mean"] for v in ("base", "previous base", "bicubic×8", "bicubic×4"))
    print(f"{out}: OpenMoji val at 128² (n={record['eval128_images']['flat art']}): base {b:.2f} dB, previous base "
          f"{p:.2f}, bicubic×8 {b8:.2f}, bicubic×4 {b4:.2f}; base − bicubic×8 {gap.fmt(2)} dB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
