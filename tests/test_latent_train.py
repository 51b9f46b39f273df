"""``fvae_core.latents.train``: the smoke run trains, resumes bit-exactly, exports, and its model samples
deterministically; configs are checked before any compute."""
import dataclasses
import json

import jax
import numpy as np
import pytest

from fvae_core.autoencoder import PRESET_CONFIGS, init_params
from fvae_core.latents import train as lt
from fvae_core.runs.checkpoint import load_state_arrays
from fvae_core.runs.config import ConfigError, apply_overrides
from fvae_core.weights import save_diffusers_folder


@pytest.fixture(scope="module")
def micro_vae(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae") / "micro"
    save_diffusers_folder(folder, PRESET_CONFIGS["micro"], init_params(PRESET_CONFIGS["micro"], 0, 32))
    return folder


def smoke(vae, **kw):
    return dataclasses.replace(lt.PRESETS["latent-smoke"], vae=str(vae), **kw)


def test_smoke_run_trains_resumes_exactly_and_exports(micro_vae, tmp_path):
    quiet = lambda m: None  # noqa: E731
    cfg = smoke(micro_vae)
    model_dir = lt.train(cfg, tmp_path / "a", log=quiet)
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, cfg.steps + 1)) and all(np.isfinite(r["loss"]) for r in rows)
    # the same run stopped after 3 steps and resumed: bitwise the same state at the end
    lt.train(dataclasses.replace(cfg, steps=3), tmp_path / "b", log=quiet)
    lt.train(cfg, tmp_path / "b", resume=True, log=quiet)
    a, b = load_state_arrays(tmp_path / "a" / "checkpoints"), load_state_arrays(tmp_path / "b" / "checkpoints")
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert np.array_equal(x, y)
    # the model folder: the EMA weights and the measured scaling factor
    m = lt.load_model(model_dir)
    post = lt.Posteriors.load(tmp_path / "a" / "posteriors.npz")
    assert m.scaling_factor == post.scaling_factor(cfg.seed) and m.latent_hw == post.mean.shape[1:3]
    for x, y in zip(jax.tree_util.tree_leaves(m.params), jax.tree_util.tree_leaves(a["ema"])):
        np.testing.assert_array_equal(np.asarray(x), y)
    z1, z2 = m.sample(3, seed=5), m.sample(3, seed=5)
    assert z1.shape == (3, *m.latent_hw, 4) and np.array_equal(z1, z2)
    assert not np.array_equal(z1, m.sample(3, seed=6))
    assert m.sample(1, seed=5, size=(4, 4)).shape == (1, 4, 4, 4)


def test_batch_indices_are_a_pure_function_of_seed_and_step():
    a = [lt.batch_indices(10, 4, 0, s) for s in range(4)]
    assert all(len(set(x)) == 4 for x in a)
    assert set(a[0]).isdisjoint(a[1])                            # one epoch: two disjoint batches of 10 crops
    assert np.array_equal(a[2], lt.batch_indices(10, 4, 0, 2))
    assert not all(np.array_equal(x, y) for x, y in zip(a[:2], a[2:]))  # a new permutation each epoch


def test_bad_configs_and_folders_are_one_line_errors(micro_vae, tmp_path):
    with pytest.raises(ConfigError, match="ema_decay"):
        apply_overrides(lt.PRESETS["latent-smoke"], ["ema_decay=1.5"])
    with pytest.raises(ConfigError, match="unknown config key"):
        apply_overrides(lt.PRESETS["latent-smoke"], ["unet.depth=3"])
    with pytest.raises(ConfigError, match="multiples of groups"):
        apply_overrides(lt.PRESETS["latent-smoke"], ["unet.widths=[10, 20]"])
    with pytest.raises(ConfigError, match="sampler"):
        apply_overrides(lt.PRESETS["latent-smoke"], ["sampler=dpm"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        lt.train(smoke(micro_vae), tmp_path / "full", log=lambda m: None)
    with pytest.raises(ConfigError, match="not a latent model folder"):
        lt.load_model(tmp_path / "full")
