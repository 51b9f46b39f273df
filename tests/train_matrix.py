"""The training matrix: one real run per config, shrunk, through a checkpoint, a resume and an export.

Shared by ``test_train_matrix_presets.py`` and ``test_train_matrix_recipes.py`` (two files, so that pytest's
two workers take one each). Every case runs in this process (``fvae_core.runs.train.train`` and ``resume``,
what ``fvae train`` calls): a run stops after step 1 with a checkpoint, as a signal would, then a resume
finishes step 2 and exports the EMA weights. The resume reuses the step compiled for the first call
(``runs.train._reuse_compiled``), so each case traces and compiles its real step once.

Sizes are the smallest that still compile each config's real step: 32² crops (the PatchGAN's three stride-2
convs need them), batch 2, the ``micro`` model for a pretrain and small SD-shaped init folders for a
finetune; the recipe itself (loss space, LPIPS net, GAN, critic norm, compute dtype) is the config's own.
The critic and the GAN start at step 0, so both steps are the adversarial one (``rec`` without a GAN).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import numpy as np

from fvae_core.autoencoder import VAEConfig, init_params
from fvae_core.runs import train as runs_train
from fvae_core.runs.checkpoint import load_state_arrays
from fvae_core.runs.config import PRESETS, RunConfig, smoke_variant
from fvae_core.weights import load_vae, save_diffusers_folder

E, D = "DownEncoderBlock2D", "UpDecoderBlock2D"
#: An SD-shaped init (f = 8, 4 latent channels, mid attention) at the smallest width GroupNorm allows.
SD_SHAPED = VAEConfig(block_out_channels=(8, 8, 8, 8), down_block_types=(E,) * 4, up_block_types=(D,) * 4,
                      layers_per_block=1, norm_num_groups=4, sample_size=32)
#: The f = 2 model of the ``smoke`` preset, as an init folder for the ``tiny-cpu-finetune`` case.
MICRO = VAEConfig(block_out_channels=(8, 16), down_block_types=(E,) * 2, up_block_types=(D,) * 2,
                  layers_per_block=1, norm_num_groups=4, sample_size=32)


def use_cache(path: Path) -> None:
    os.environ["FVAE_CACHE"] = str(path)


def make_init(folder: Path, config: VAEConfig) -> Path:
    if not (folder / "config.json").exists():
        save_diffusers_folder(folder, config, init_params(config, 0, image_size=32))
    return folder


def shrink(cfg: RunConfig, init: Path | None = None, steps: int = 2, **changes) -> RunConfig:
    """``cfg`` at matrix size: :func:`smoke_variant`'s data, batch and stops, a checkpoint every step; a
    pretrain builds ``micro``, a finetune starts from ``init``."""
    small = smoke_variant(cfg, steps=steps)
    small = dataclasses.replace(small, ckpt_every=1, keep_ckpts=2, steps_per_call=1, **changes)
    if small.recipe.stage == "pretrain":
        return dataclasses.replace(small, model="micro")
    return dataclasses.replace(small, init=str(init))


def run_case(cfg: RunConfig, run_dir: Path, first_stop: int = 1) -> dict:
    """Train to ``first_stop`` (checkpoint), resume to the end (export); check each stage. Returns the final
    state."""
    quiet = dict(progress=False, log=lambda *a: None)
    first = runs_train.train(cfg, run_dir, stop_at=first_stop, **quiet)
    assert first.stopped == "limit" and first.step == first_stop, first
    assert (run_dir / "checkpoints" / str(first_stop)).is_dir(), sorted((run_dir / "checkpoints").iterdir())
    after_first = load_state_arrays(run_dir / "checkpoints", first_stop)
    last = runs_train.resume(run_dir, **quiet)
    assert last.stopped == "done" and last.step == cfg.steps, last
    assert last.skipped_steps == 0, f"{last.skipped_steps} non-finite steps"
    state = load_state_arrays(run_dir / "checkpoints")
    assert int(state["step"]) == cfg.steps and int(after_first["step"]) == first_stop
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(after_first["params"]),
                                                     jax.tree_util.tree_leaves(state["params"]))]
    assert any(moved), "the resumed step did not update the params"
    for leaf in jax.tree_util.tree_leaves(state):
        assert np.size(leaf) > 0 and np.all(np.isfinite(leaf))
    # The export: the EMA weights, reloadable through both formats, finite, the frozen encoder unchanged.
    folder = load_vae(run_dir / "export" / "diffusers")
    single = load_vae(run_dir / "export" / "vae.safetensors", config=folder.config)
    for a, b in zip(jax.tree_util.tree_leaves(folder.params), jax.tree_util.tree_leaves(single.params)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
        assert np.all(np.isfinite(np.asarray(a)))
    if cfg.recipe.stage == "finetune":
        init = load_vae(cfg.init)
        for a, b in zip(jax.tree_util.tree_leaves(init.params["encoder"]),
                        jax.tree_util.tree_leaves(folder.params["encoder"])):
            assert np.array_equal(np.asarray(a), np.asarray(b)), "a finetune moved the frozen encoder"
    return state


def preset_names() -> list[str]:
    return list(PRESETS)
