"""``fvae latents train`` and ``fvae latents sample`` end to end: deterministic for a seed, and the PNGs equal
diffusers' PyTorch decode of the saved latents (the independent oracle)."""
import jax
import numpy as np
import pytest
from PIL import Image

from conftest import make_torch_vae
from fvae_core.autoencoder import PRESET_CONFIGS
from fvae_core.cli import main
from fvae_core.metrics import psnr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A diffusers-saved random micro VAE (norm affines randomised) and a latent-smoke model on its latents."""
    base = tmp_path_factory.mktemp("latents-cli")
    torch_vae = make_torch_vae(PRESET_CONFIGS["micro"], seed=1)
    torch_vae.save_pretrained(str(base / "vae"))
    assert main(["latents", "train", "--config", "latent-smoke", "--vae", str(base / "vae"),
                 "--run-dir", str(base / "run"), "--quiet"]) == 0
    return base, torch_vae


def test_sample_is_deterministic_and_decodes_like_diffusers(trained, tmp_path):
    import torch

    base, torch_vae = trained
    args = ["latents", "sample", "--model", str(base / "run" / "model"), "--n", "3", "--seed", "7",
            "--vae", str(base / "vae")]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    za, zb = np.load(tmp_path / "a" / "latents.npy"), np.load(tmp_path / "b" / "latents.npy")
    assert za.shape == (3, 16, 16, 4) and np.array_equal(za, zb)
    pngs = sorted((tmp_path / "a" / "vae").glob("*.png"))
    assert [p.name for p in pngs] == ["0000.png", "0001.png", "0002.png"]
    assert all((tmp_path / "b" / "vae" / p.name).read_bytes() == p.read_bytes() for p in pngs)
    with torch.no_grad():
        ref = torch_vae.decode(torch.from_numpy(za).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()
    ref = np.clip((ref + 1) / 2, 0, 1)
    for p, r in zip(pngs, ref):
        assert psnr(r, np.asarray(Image.open(p)) / 255.0) >= 50.0
    # another seed, another size
    assert main(["latents", "sample", "--model", str(base / "run" / "model"), "--n", "2", "--seed", "8",
                 "--size", "8", "--out", str(tmp_path / "c")]) == 0
    zc = np.load(tmp_path / "c" / "latents.npy")
    assert zc.shape == (2, 8, 8, 4) and not (tmp_path / "c" / "vae").exists()


def test_fp16_export_halves_the_file_and_samples_alike(trained, tmp_path):
    """``fvae latents export --dtype fp16``: half the bytes, every weight the fp16 rounding of the fp32 one,
    loaded back as float32, and samples of the same seed equal to rounding (the committed
    weights/latent-flow is stored this way)."""
    from safetensors.numpy import load_file

    from fvae_core.latents.train import WEIGHTS_FILE, load_model

    base, _ = trained
    src = base / "run" / "model"
    assert main(["latents", "export", "--model", str(src), "--out", str(tmp_path / "h")]) == 0
    a, b = load_file(str(src / WEIGHTS_FILE)), load_file(str(tmp_path / "h" / WEIGHTS_FILE))
    assert a.keys() == b.keys() and all(b[k].dtype == np.float16 for k in b)
    assert all(np.array_equal(b[k], a[k].astype(np.float16)) for k in a)
    size = lambda p: (p / WEIGHTS_FILE).stat().st_size  # noqa: E731
    assert size(tmp_path / "h") < 0.55 * size(src)
    m32, m16 = load_model(src), load_model(tmp_path / "h")
    assert {str(x.dtype) for x in jax.tree_util.tree_leaves(m16.params)} == {"float32"}  # loaded as float32
    assert m16.meta["dtype"] == "fp16" and m16.scaling_factor == m32.scaling_factor
    z32, z16 = m32.sample(4, 3), m16.sample(4, 3)
    assert z16.dtype == np.float32 and not np.array_equal(z16, z32)  # really rounded ...
    np.testing.assert_allclose(z16, z32, atol=0.02 * float(np.std(z32)))  # ... and only that


def test_bad_arguments_exit_2_with_one_line(trained, tmp_path, capsys):
    base, _ = trained
    model = str(base / "run" / "model")
    cases = [
        (["latents", "sample", "--model", str(tmp_path), "--out", str(tmp_path / "o")], "not a latent model folder"),
        (["latents", "sample", "--model", model, "--size", "7", "--out", str(tmp_path / "o")], "not a multiple"),
        (["latents", "sample", "--model", model, "--n", "0", "--out", str(tmp_path / "o")], ">= 1"),
        (["latents", "train", "--config", "nope", "--run-dir", str(tmp_path / "r")], "unknown latent preset"),
        (["latents", "train", "--config", "latent-smoke", "--set", "lr=-1", "--run-dir", str(tmp_path / "r")], "lr"),
        (["latents", "train", "--resume", str(base / "run"), "--vae", "x"], "--resume takes only"),
        (["latents", "export", "--model", str(tmp_path), "--out", str(tmp_path / "o")], "not a latent model folder"),
        (["latents", "export", "--model", model, "--out", model], "must differ"),
    ]
    for argv, msg in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
