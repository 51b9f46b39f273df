"""The committed latent model ``weights/latent-flow`` against its ``RECORD.json`` (weights/record_latent.py):
small enough, stored as fp16, and its samples reproduce the recorded moments, which sit near the real
latents' (the record's real moments come from the run's 16,832 encoded crops, not committed)."""
import json
from pathlib import Path

import numpy as np
import pytest

from fvae_core.latents.train import WEIGHTS_FILE, load_model

W = Path(__file__).resolve().parents[1] / "weights" / "latent-flow"


@pytest.fixture(scope="module")
def record():
    return json.loads((W / "RECORD.json").read_text())


def test_size_dtype_and_shape(record):
    from safetensors.numpy import load_file

    assert (W / WEIGHTS_FILE).stat().st_size == record["weights_bytes"] <= 10 * 2**20
    assert all(v.dtype == np.float16 for v in load_file(str(W / WEIGHTS_FILE)).values())
    m = load_model(W)
    assert m.latent_hw == (8, 8) and m.config.channels == 4 and m.meta["vae"] == "weights/small-cpu"
    assert m.scaling_factor == pytest.approx(record["scaling_factor"])
    assert record["steps"] == record["config"]["steps"] and record["curve"][-1]["loss"] < 0.7 * record["curve"][0]["loss"]


def test_samples_reproduce_the_recorded_moments(record):
    m, c = load_model(W), record["check"]
    z = m.sample(c["n"], c["seed"]).reshape(-1, 4)  # the model's own sampler and steps, as recorded
    np.testing.assert_allclose(z.mean(0), c["mean"], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(z.std(0), c["std"], rtol=1e-3)
    mo = record["moments"]
    # The re-sampled latents against the recorded real ones (64 latents: looser than the record's 512).
    assert np.all(np.abs(z.std(0) / np.array(mo["std_real"]) - 1) < 0.1), z.std(0)
    assert np.all(np.abs(z.mean(0) - np.array(mo["mean_real"])) < 0.3 * np.array(mo["std_real"])), z.mean(0)
    # The samples' statistics are the real latents': std within 5 %, means within 0.15 real std per channel.
    assert all(abs(r - 1) < 0.05 for r in mo["std_ratio"]), mo["std_ratio"]
    assert all(abs(g) < 0.15 for g in mo["mean_gap_in_real_std"]), mo["mean_gap_in_real_std"]
    # Decoded, their spectrum is the decoded real latents' within 0.5 dB in every band.
    sp = record["spectrum"]
    assert all(abs(a - b) < 0.5 for a, b in zip(sp["generated"]["mean_db"], sp["real_latents"]["mean_db"]))
