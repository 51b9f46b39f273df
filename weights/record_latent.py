"""Commit a finished latent run (``fvae latents train``) as ``weights/<name>/``: its EMA model stored as fp16,
and a ``RECORD.json``.

    python weights/record_latent.py RUN_DIR weights/latent-flow [--n 512]

What the record holds, beside the run's config, command, commit and time:

* ``curve``: the flow-matching loss every 250 steps (``metrics.jsonl``);
* ``fp16``: the largest difference between latents sampled with the fp32 and the fp16 weights (same seed),
  in units of the real latents' std;
* ``moments``: per-channel mean and std of ``--n`` generated latents (seed 0, the model's sampler) against
  the real ones, the posterior samples of every training crop (:func:`fvae_core.latents.compare.channel_moments`);
* ``spectrum``: band power of the base's decodes of the generated latents, and of real latents, in dB against
  OpenMoji's validation images at the training size (:func:`fvae_core.latents.compare.decode_spectrum_gap`).

``tests/test_latent_weights.py`` re-samples ``check`` (64 latents, seed 0) and checks the recorded numbers.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "weights"))
#: A smaller sample whose moments the test recomputes (512 latents take minutes to sample on 2 cores).
CHECK_N = 64


def check(folder) -> dict:
    """Per-channel moments of ``CHECK_N`` latents (seed 0, the model's sampler) of the stored model."""
    from fvae_core.latents.train import load_model

    z = load_model(folder).sample(CHECK_N, 0).reshape(-1, 4)
    return {"n": CHECK_N, "seed": 0, "mean": z.mean(0).tolist(), "std": z.std(0).tolist()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--check-only", action="store_true",
                    help="only (re)write the record's check field from the committed model in OUT")
    args = ap.parse_args(argv)
    if args.check_only:
        path = Path(args.out) / "RECORD.json"
        record = json.loads(path.read_text())
        record["check"] = check(Path(args.out))
        path.write_text(json.dumps(record, indent=1, ensure_ascii=False))
        print(record["check"])
        return 0

    import jax

    from fvae_core.evaluate import views_at
    from fvae_core.latents.compare import channel_moments, decode_spectrum_gap
    from fvae_core.latents.data import Posteriors
    from fvae_core.latents.train import MODEL_FILE, WEIGHTS_FILE, convert_model, load_model
    from fvae_core.latents.unet import param_count
    from fvae_core.reconstruct import decode_latents
    from fvae_core.weights import load_vae
    from record_base import openmoji_val_images

    run, out = Path(args.run_dir), Path(args.out)
    env = json.loads((run / "environment.json").read_text())
    cfg = json.loads((run / "config.json").read_text())
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    convert_model(run / "model", tmp, "fp16")
    m16, m32 = load_model(tmp), load_model(run / "model")

    post = Posteriors.load(run / "posteriors.npz")
    real = np.asarray(post.sample(jax.random.PRNGKey(1)))
    z16, z32 = m16.sample(args.n, 0), m32.sample(args.n, 0)
    moments = channel_moments(z16, real)

    real_std = float(np.std(real))

    vae = load_vae(str(ROOT / cfg["vae"]) if not Path(cfg["vae"]).is_absolute() else cfg["vae"])
    hw = m16.latent_hw[0] * vae.config.downsample_factor
    images, _ = views_at(openmoji_val_images(cfg["data"]["render_size"]), hw)
    ref = np.stack([im.rgb for im in images]).astype(np.float64) / 255.0
    gen_dec = decode_latents(vae.config, vae.params, z16).astype(np.float64) / 255.0
    rng = np.random.default_rng(0)
    real_dec = decode_latents(vae.config, vae.params, real[rng.choice(len(real), args.n, replace=False)]
                              ).astype(np.float64) / 255.0

    t = [r["time"] for r in rows]
    record = {
        "what": "a rectified-flow latent UNet trained by fvae latents train on the base VAE's latents of whole "
                "OpenMoji renders at 64² (8x8x4); its EMA weights, converted to fp16 by fvae latents export",
        "command": " ".join(["fvae", *env["argv"][1:]]) + f"; fvae latents export --model {run}/model "
                                                           f"--out {out} --dtype fp16",
        "git_commit": env["git_commit"],
        "machine": f"{env['cpu_count']} CPU cores, {env['platform']}, jax {env['versions']['jax']}",
        "params": param_count(m16.params),
        "weights_bytes": (tmp / WEIGHTS_FILE).stat().st_size,
        "steps": rows[-1]["step"],
        "step_seconds": t[-1] - t[0] + cfg["log_every"] / max(rows[0]["steps_per_s"], 1e-9),
        "step_seconds_note": "from the first logged step's rate and the metrics' timestamps; the run also "
                             "encoded its 16,832 crops once before the first step",
        "scaling_factor": m16.scaling_factor,
        "crops": len(post),
        "config": cfg,
        "curve": [{"step": r["step"], "loss": r["loss"]} for r in rows if r["step"] % 250 == 0],
        "fp16_max_latent_change_in_real_std": float(np.max(np.abs(z16 - z32)) / real_std),
        "samples": {"n": args.n, "seed": 0, "steps": m16.meta["sample_steps"], "sampler": m16.meta["sampler"]},
        "moments": moments,
        "check": check(tmp),
        "spectrum": {"generated": decode_spectrum_gap(gen_dec, ref), "real_latents": decode_spectrum_gap(real_dec, ref),
                     "references": f"{len(ref)} OpenMoji validation images at {hw}²"},
        "python": platform.python_version(),
    }
    (tmp / "RECORD.json").write_text(json.dumps(record, indent=1, ensure_ascii=False))
    assert (tmp / MODEL_FILE).is_file()
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(json.dumps({k: record[k] for k in ("params", "weights_bytes", "steps", "step_seconds", "moments",
                                             "spectrum", "fp16_max_latent_change_in_real_std")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
