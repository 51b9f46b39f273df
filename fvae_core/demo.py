"""``make demo`` until the notebook suite lands: a reconstruction round trip on bundled photographs.

No pretrained VAE can be downloaded here, so without ``--vae`` the demo builds the small SD-shaped
``tiny-sd`` VAE with random weights (seed 0). Its reconstructions are not meant to look good; what
the demo shows is the whole weight path working end to end:

1. export to a diffusers folder and to a single-file LDM ``.safetensors``, reload both (bit-identical);
2. reconstruct bundled skimage photographs of odd, non-square sizes through the ``fvae reconstruct`` path;
3. when diffusers (PyTorch) is installed, decode the same inputs with diffusers from the exported
   folder and report the PSNR between the two implementations (the parity that makes a finetuned
   fvae VAE a drop-in for diffusers / A1111 / ComfyUI).

With ``--vae /path/to/sd-vae-ft-mse`` the reconstruction PSNR against the input becomes meaningful.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from jax.tree_util import tree_leaves as _leaves
from PIL import Image

from fvae_core.autoencoder import PRESET_CONFIGS, init_params
from fvae_core.data import skimage_photo
from fvae_core.images import load_rgb, save_png
from fvae_core.metrics import psnr
from fvae_core.plotting import image_grid
from fvae_core.reconstruct import pad_to_multiple, reconstruct_files
from fvae_core.weights import LoadedVAE, load_vae, save_diffusers_folder, save_single_file

DEMO_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def _resize_short_side(img: np.ndarray, short: int) -> np.ndarray:
    h, w = img.shape[:2]
    s = short / min(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return np.asarray(Image.fromarray(img).resize(size, Image.Resampling.LANCZOS, reducing_gap=None))


def _diffusers_reconstruct(folder: Path, rgb: np.ndarray, factor: int) -> np.ndarray | None:
    """The same reconstruction with diffusers' PyTorch AutoencoderKL (same mirror padding), or None."""
    try:
        import torch
        from diffusers import AutoencoderKL as TorchVAE
    except ImportError:
        return None
    model = TorchVAE.from_pretrained(str(folder), low_cpu_mem_usage=False).eval()
    padded, (h, w) = pad_to_multiple(rgb, factor)
    x = torch.from_numpy(padded.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        y = model.decode(model.encode(x).latent_dist.mode()).sample[0].permute(1, 2, 0).numpy()
    y = y[:h, :w]
    return np.clip(np.rint((y + 1.0) * 127.5), 0, 255).astype(np.uint8)


def run_demo(out_dir: Path, vae_src: str | None = None, size: int = 256) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    if vae_src is None:
        config = PRESET_CONFIGS["tiny-sd"]
        vae = LoadedVAE(config, init_params(config, 0), "tiny-sd (random init, seed 0)")
        print("No --vae given: using the tiny-sd VAE with random weights (reconstructions will be poor by design).")
    else:
        vae = load_vae(vae_src)
    print(f"VAE: {vae.source}  ({sum(np.size(x) for x in _leaves(vae.params)) / 1e6:.2f}M params, "
          f"f={vae.config.downsample_factor}, {vae.config.latent_channels} latent channels)")

    folder = save_diffusers_folder(out_dir / "vae_diffusers", vae.config, vae.params)
    single = save_single_file(out_dir / "vae_single_file.safetensors", vae.config, vae.params)
    a, b = load_vae(folder), load_vae(single, config=vae.config)
    same = all(np.array_equal(x, y) for x, y in zip(_leaves(a.params), _leaves(b.params)))
    same &= all(np.array_equal(x, np.asarray(y)) for x, y in zip(_leaves(a.params), _leaves(vae.params)))
    print(f"exported {folder} and {single}; reloaded both bit-identically: {same}")
    if not same:
        raise RuntimeError("export round trip is not bit-identical")

    inputs = []
    for name in DEMO_PHOTOS:
        p = out_dir / "inputs" / f"{name}.png"
        save_png(p, _resize_short_side(skimage_photo(name), size))
        inputs.append(p)
    report = reconstruct_files(vae.config, vae.params, inputs, out_dir / "recon")

    rows, table = [], []
    for src, dst in zip(inputs, report.written):
        x, y = load_rgb(src), load_rgb(dst)
        ref = _diffusers_reconstruct(folder, x, vae.config.downsample_factor)
        row = {"image": src.stem, "size": f"{x.shape[1]}x{x.shape[0]}", "psnr_vs_input_db": round(psnr(x, y), 2)}
        grid_row = [x, y]
        if ref is not None:
            row["psnr_fvae_vs_diffusers_db"] = round(psnr(ref, y), 2)
            row["max_abs_diff_u8"] = int(np.abs(ref.astype(int) - y.astype(int)).max())
            grid_row += [ref, np.clip(np.abs(ref.astype(int) - y.astype(int)) * 64, 0, 255).astype(np.uint8)]
        rows.append(grid_row)
        table.append(row)
    save_png(out_dir / "demo_grid.png", image_grid(rows))
    (out_dir / "summary.json").write_text(json.dumps({"vae": vae.source, "images": table}, indent=2) + "\n")

    keys = list(table[0])
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in table:
        print("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")
    cols = "input | fvae | diffusers | 64x|fvae - diffusers|" if len(rows[0]) == 4 else "input | fvae"
    print(f"\nwrote {out_dir / 'demo_grid.png'} (columns: {cols}) and {out_dir / 'summary.json'}")
    return 0
