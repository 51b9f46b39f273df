"""The latent model's data (fvae_core.latents.data): posteriors of augmented crops encoded by a VAE, their
scaling factor, and their file."""
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from fvae_core.autoencoder import PRESET_CONFIGS, AutoencoderKL, init_params
from fvae_core.conventions import to_model_range, unit_from_uint8
from fvae_core.data.augment import AugmentConfig
from fvae_core.data.loader import make_iterator, train_dataset
from fvae_core.data.prepare import PrepareConfig, prepare
from fvae_core.latents.data import Posteriors, encode_posteriors

MICRO = PRESET_CONFIGS["micro"]
AUG = AugmentConfig(crop=16)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("latents")
    rng = np.random.default_rng(0)
    (base / "src").mkdir()
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (24 + i, 30, 3), dtype=np.uint8)).save(base / "src" / f"im{i}.png")
    prepare([str(base / "src")], base / "ds", PrepareConfig(min_side=8, val_fraction=0.0), workers=0,
            progress=False)
    return base / "ds"


def test_posteriors_are_the_encoder_of_the_loader_crops(prepared):
    params = init_params(MICRO, 0, 16)
    post = encode_posteriors(MICRO, params, prepared, AUG, passes=2, seed=3, batch=4, meta={"vae": "micro"},
                             log=lambda m: None)
    assert len(post) == 2 * 10 // 4 * 4 == post.meta["n"] and post.mean.shape[1:] == (8, 8, 4)  # f=2
    assert post.meta["vae"] == "micro" and post.meta["crop"] == 16 and np.all(post.std > 0)
    # the same crops through the model directly: the first batch of the same pipeline
    with make_iterator(train_dataset(prepared, AUG, 4, seed=3, num_epochs=2, log=lambda m: None)) as it:
        b = next(it)
    q = AutoencoderKL(MICRO).apply({"params": params}, to_model_range(unit_from_uint8(b["image"])),
                                   method=AutoencoderKL.encode)
    np.testing.assert_allclose(post.mean[:4], np.asarray(q.mean), atol=1e-5)
    np.testing.assert_allclose(post.std[:4], np.asarray(q.std), rtol=1e-5)


def test_scaling_factor_is_one_over_the_std_of_a_posterior_sample():
    rng = np.random.default_rng(0)
    mean = rng.normal(0.5, 3.0, (50, 4, 4, 4)).astype(np.float32)
    post = Posteriors(mean, np.full_like(mean, 0.5), {})
    z = np.asarray(post.sample(jax.random.PRNGKey(7)), np.float64)
    assert post.scaling_factor(seed=7) == pytest.approx(1 / z.std(), rel=1e-12)
    # the sample's variance is the means' plus the posterior's: std ~ sqrt(9 + 0.25)
    assert 1 / post.scaling_factor() == pytest.approx(np.sqrt(9.25), rel=0.03)
    assert np.std(z * post.scaling_factor(seed=7)) == pytest.approx(1.0, rel=1e-6)


def test_save_load_round_trip_and_bad_files(tmp_path):
    rng = np.random.default_rng(1)
    post = Posteriors(rng.normal(size=(3, 2, 2, 4)).astype(np.float32),
                      rng.uniform(0.1, 1, (3, 2, 2, 4)).astype(np.float32), {"vae": "x", "crop": 16})
    path = post.save(tmp_path / "post.npz")
    back = Posteriors.load(path)
    assert np.array_equal(back.mean, post.mean) and np.array_equal(back.std, post.std) and back.meta == post.meta
    assert [p.name for p in tmp_path.iterdir()] == ["post.npz"]        # no temporary file left behind
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a latent posterior file"):
        Posteriors.load(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="equal"):
        Posteriors(np.zeros((2, 2, 2, 4)), np.zeros((2, 2, 2, 3)), {})
