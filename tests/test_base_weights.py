"""The committed base in the card's regime (``weights/small-cpu``, made by ``fvae train --config small-cpu`` and
``weights/record_base.py``; see its RECORD.json): small, strictly loadable, the config it records is the
preset's, and its recorded 128² numbers on OpenMoji's validation split are recomputed here, image by image,
beside the no-learning bicubic×8 reference on the same images."""
from __future__ import annotations

import dataclasses
import math
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from fvae_core.autoencoder import PRESET_CONFIGS
from fvae_core.evaluate import ResizeReconstructor, VAEReconstructor, evaluate
from fvae_core.runs.config import RunConfig, from_dict, preset
from fvae_core.weights import load_vae

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "weights" / "small-cpu"


def _record_module():
    spec = importlib.util.spec_from_file_location("record_base", ROOT / "weights" / "record_base.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def record():
    return json.loads((WEIGHTS / "RECORD.json").read_text())


def test_base_is_small_and_records_the_preset(record):
    assert sum(p.stat().st_size for p in WEIGHTS.iterdir()) <= 20 * 2**20
    assert load_vae(WEIGHTS).config == PRESET_CONFIGS["small-sd"]
    recorded = from_dict(RunConfig, record["config"])
    assert dataclasses.replace(recorded, name="small-cpu") == preset("small-cpu")
    assert record["steps"] == recorded.steps and record["seconds"] > 0 and record["git_commit"]
    # the learning curve ends where the run ended, and has its scale beside it
    assert record["curve"][-1]["step"] == recorded.steps
    refs = record["curve_references"]
    assert {"bicubic×8", "bicubic×4", "previous base"} <= set(refs)
    assert all(isinstance(v, float) and math.isfinite(v) for v in refs.values()), refs  # a scale, never null
    assert refs["previous base"] < record["curve"][-1]["val_ema/psnr"]


def test_recorded_psnr_at_128_is_recomputed_image_by_image(record):
    images = _record_module().openmoji_val_images(128, limit=16)
    assert [im.name for im in images] == list(record["per_image"])
    vae = load_vae(WEIGHTS)
    res = evaluate([VAEReconstructor("base", vae.config, vae.params), ResizeReconstructor.parse("bicubic:8")],
                   images, [128], lpips_net=None, log=lambda *a: None)
    for vname in ("base", "bicubic×8"):
        got = {r["image"]: r["psnr"] for r in res.select(vname, 128)}
        want = {k: v[vname] for k, v in record["per_image"].items()}
        np.testing.assert_allclose([got[k] for k in want], list(want.values()), atol=0.02, err_msg=vname)
    # and the recorded means are those of the recorded per-image numbers' population (sanity on the record)
    full = record["eval128"]["base"]["flat art"]["psnr"]
    assert full["n"] == record["eval128_images"]["flat art"] and full["lo"] <= full["mean"] <= full["hi"]
