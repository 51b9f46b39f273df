"""The committed tiny base weights (made by `fvae train --config tiny-cpu`, see weights/tiny-cpu/RECORD.json)
load strictly and reach the validation PSNR recorded beside them, far above the same model at random init."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fvae_core.autoencoder import PRESET_CONFIGS, init_params
from fvae_core.runs.config import RunConfig, from_dict
from fvae_core.runs.train import PSNR_8BIT_CAP, evaluate_reconstructor, evaluate_vae
from fvae_core.weights import load_vae

WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "tiny-cpu"


@pytest.fixture(scope="module")
def record():
    return json.loads((WEIGHTS / "RECORD.json").read_text())


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One prepared-data cache for the module's evaluations (preparing is the slow part)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FVAE_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def test_tiny_weights_are_small_and_recorded(record):
    size = sum(p.stat().st_size for p in WEIGHTS.iterdir())
    assert size <= 10 * 2**20
    assert record["command"].startswith("fvae train --config tiny-cpu")
    assert record["git_commit"] and record["final"]["val_ema/psnr"] > 0


def test_tiny_weights_reach_the_recorded_validation_psnr(record, cache):
    vae = load_vae(WEIGHTS)
    assert vae.config == PRESET_CONFIGS["tiny-sd"]
    cfg = from_dict(RunConfig, record["config"])
    got = evaluate_vae(cfg, vae.config, vae.params, log=lambda m: None)
    want = record["final"]
    assert got["val/images"] == want["val_ema/images"]
    assert abs(got["val/psnr"] - want["val_ema/psnr"]) < 0.05, (got, want)
    assert abs(got["val/delta_e_ok"] - want["val_ema/delta_e_ok"]) < 1e-3, (got, want)
    random = evaluate_vae(cfg, vae.config, init_params(vae.config, 0, image_size=64), log=lambda m: None)
    assert got["val/psnr"] > random["val/psnr"] + 5.0, (got, random)


def test_validation_psnr_is_finite_for_an_exact_reconstruction(record, cache):
    """An identity "VAE" reproduces every crop exactly; the mean PSNR is the 8-bit cap, not inf (the
    curve references of weights/record_base.py were null before the cap)."""
    cfg = from_dict(RunConfig, record["config"])
    exact = evaluate_reconstructor(cfg, lambda batch: batch, log=lambda m: None)
    assert exact["val/psnr"] == pytest.approx(PSNR_8BIT_CAP) and 58.8 < PSNR_8BIT_CAP < 59.0
    assert exact["val/delta_e_ok"] == 0.0
