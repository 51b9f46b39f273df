"""The ``fvae`` command line: reconstruct (vs the diffusers oracle), export, and its errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fvae_core import weights as W
from fvae_core.cli import main
from fvae_core.images import load_rgb
from fvae_core.metrics import psnr
from fvae_core.reconstruct import pad_to_multiple
from conftest import PARITY_CONFIGS, make_torch_vae, torch_state_numpy


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    cfg = PARITY_CONFIGS["tiny-sd"]
    model = make_torch_vae(cfg, seed=1)
    folder = tmp_path_factory.mktemp("vae") / "vae"
    W.save_diffusers_folder(folder, cfg, W.params_from_diffusers_state_dict(torch_state_numpy(model), cfg))
    return folder, model, cfg


def _smooth_image(h, w, seed):
    """A smooth colourful test image (random weights still give a structured output)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    chans = [np.sin(2 * np.pi * (rng.uniform(0.5, 2) * xx + rng.uniform(0.5, 2) * yy) + rng.uniform(0, 6)) for _ in range(3)]
    return np.clip(np.rint((np.stack(chans, -1) * 0.45 + 0.5) * 255), 0, 255).astype(np.uint8)


def _diffusers_reference(model, rgb, factor):
    padded, (h, w) = pad_to_multiple(rgb, factor)
    x = torch.from_numpy(padded.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        y = model.decode(model.encode(x).latent_dist.mode()).sample[0].permute(1, 2, 0).numpy()[:h, :w]
    return np.clip(np.rint((y + 1) * 127.5), 0, 255).astype(np.uint8)


def test_reconstruct_matches_diffusers_on_odd_nonsquare_images(vae_folder, tmp_path):
    folder, model, cfg = vae_folder
    paths = []
    for i, (h, w) in enumerate([(37, 61), (50, 23), (8, 8)]):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(_smooth_image(h, w, i)).save(p)
        paths.append(p)
    assert main(["reconstruct", "--vae", str(folder), *map(str, paths), "--out", str(tmp_path / "out")]) == 0
    for p in paths:
        x = load_rgb(p)
        y = load_rgb(tmp_path / "out" / (p.stem + ".png"))
        assert y.shape == x.shape
        ref = _diffusers_reference(model, x, cfg.downsample_factor)
        assert psnr(ref, y) >= 50.0, (p.name, psnr(ref, y))
        assert psnr(x, y) < 40  # the oracle comparison is not trivially "output == input"


def test_reconstruct_sample_mode_is_seeded(vae_folder, tmp_path):
    folder, _, _ = vae_folder
    p = tmp_path / "a.png"
    Image.fromarray(_smooth_image(24, 40, 0)).save(p)
    outs = []
    for seed, name in [(1, "s1"), (1, "s1b"), (2, "s2")]:
        assert main(["reconstruct", "--vae", str(folder), str(p), "--out", str(tmp_path / name),
                     "--mode", "sample", "--seed", str(seed)]) == 0
        outs.append(load_rgb(tmp_path / name / "a.png"))
    assert np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[0], outs[2])


def test_reconstruct_odd_modes_and_bad_files(vae_folder, tmp_path, capsys):
    folder, _, _ = vae_folder
    base = _smooth_image(30, 45, 3)
    files = {
        "rgba.png": Image.fromarray(np.dstack([base, np.full(base.shape[:2], 128, np.uint8)]), "RGBA"),
        "grey.png": Image.fromarray(base[..., 0], "L"),
        "palette.gif": Image.fromarray(base).quantize(16),
        "cmyk.jpg": Image.fromarray(base).convert("CMYK"),
        "deep.png": Image.fromarray(base[..., 0].astype(np.uint16) * 257),
    }
    for name, im in files.items():
        im.save(tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    inputs = [str(tmp_path / n) for n in [*files, "broken.png"]]
    rc = main(["reconstruct", "--vae", str(folder), *inputs, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1  # finished, but one input was skipped
    assert "broken.png" in err
    for name in files:
        out = load_rgb(tmp_path / "out" / (name.rsplit(".", 1)[0] + ".png"))
        assert out.shape == (30, 45, 3)
    assert not (tmp_path / "out" / "broken.png").exists()


def test_reconstruct_all_inputs_missing_is_usage_error(vae_folder, tmp_path, capsys):
    folder, _, _ = vae_folder
    assert main(["reconstruct", "--vae", str(folder), str(tmp_path / "nope.png"), "--out", str(tmp_path)]) == 2
    assert "no input image exists" in capsys.readouterr().err


def test_export_cli_roundtrip_and_errors(vae_folder, tmp_path, capsys):
    folder, _, cfg = vae_folder
    single = tmp_path / "vae.safetensors"
    assert main(["export", "--vae", str(folder), "--format", "single-file", "--out", str(single)]) == 0
    assert main(["export", "--vae", str(single), "--config", str(folder / "config.json"), "--format",
                 "diffusers", "--out", str(tmp_path / "back")]) == 0
    a, b = W.load_vae(folder), W.load_vae(tmp_path / "back")
    assert a.config == b.config
    import jax
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)))
    capsys.readouterr()
    (tmp_path / "x.ckpt").write_bytes(b"whatever")
    assert main(["export", "--vae", str(tmp_path / "x.ckpt"), "--format", "diffusers", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fvae: error: refusing to load pickle") and "\n" not in err
    assert main(["export", "--vae", "owner/missing-vae", "--format", "diffusers", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "owner/missing-vae" in err and "local folder" in err and "\n" not in err


def test_output_errors_are_one_line_and_inputs_never_overwritten(vae_folder, tmp_path, capsys):
    folder, _, _ = vae_folder
    img = tmp_path / "in.png"
    Image.fromarray(_smooth_image(16, 24, 0)).save(img)
    original = img.read_bytes()
    # --out is the input folder: the input must survive, and the file is reported as skipped.
    assert main(["reconstruct", "--vae", str(folder), str(img), "--out", str(tmp_path)]) == 2
    assert img.read_bytes() == original
    assert "refusing to overwrite an input" in capsys.readouterr().err
    # --out is an existing file: one line, exit 2, no traceback.
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    assert main(["reconstruct", "--vae", str(folder), str(img), "--out", str(blocker)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fvae: error:") and "\n" not in err and "blocker" in err
    assert main(["export", "--vae", str(folder), "--format", "diffusers", "--out", str(blocker)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fvae: error:") and "\n" not in err


def test_reconstruct_tiled_matches_diffusers_and_the_untiled_output(vae_folder, tmp_path, capsys, monkeypatch):
    """``--tile 8`` (bands of 8 rows) on an odd, non-square image: against diffusers' untiled decode, as the
    untiled command is (>= 50 dB), and stderr says it was tiled; ``--mode sample`` tiled draws the same
    latent as untiled. Automatic tiling above the size threshold (lowered here) says so too; ``--tile 0``
    never tiles; bad values are one-line usage errors."""
    from fvae_core import reconstruct

    folder, model, cfg = vae_folder
    p = tmp_path / "img.png"
    Image.fromarray(_smooth_image(45, 70, 3)).save(p)
    base = ["reconstruct", "--vae", str(folder), str(p)]
    assert main([*base, "--out", str(tmp_path / "plain")]) == 0
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "tiled"), "--tile", "8"]) == 0
    err = capsys.readouterr().err
    assert "bands" in err and "exact" in err
    plain, tiled = load_rgb(tmp_path / "plain/img.png"), load_rgb(tmp_path / "tiled/img.png")
    assert psnr(_diffusers_reference(model, load_rgb(p), cfg.downsample_factor), tiled) >= 50.0
    assert np.abs(plain.astype(int) - tiled.astype(int)).max() <= 1
    for name, tile in (("s-plain", "0"), ("s-tiled", "8")):
        assert main([*base, "--out", str(tmp_path / name), "--mode", "sample", "--seed", "4", "--tile", tile]) == 0
    a, b = load_rgb(tmp_path / "s-plain/img.png"), load_rgb(tmp_path / "s-tiled/img.png")
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    capsys.readouterr()
    monkeypatch.setattr(reconstruct, "AUTO_TILE_BYTES", 1000)
    assert main([*base, "--out", str(tmp_path / "auto")]) == 0
    assert "bands" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "never"), "--tile", "0"]) == 0
    assert "bands" not in capsys.readouterr().err
    for bad, msg in ((["--tile", "-1"], "--tile must be >= 0"), (["--tile", "8", "--dtype", "bfloat16"], "float32")):
        assert main([*base, "--out", str(tmp_path / "bad"), *bad]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1
