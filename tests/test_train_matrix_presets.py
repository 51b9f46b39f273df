"""Every preset and every ablation in ``PRESETS`` trains through a checkpoint, a resume and an export
(``tests/train_matrix.py`` says how the cases are shrunk). This is the test that was missing when the
``no-gan`` ablation could not write its first checkpoint (an empty packed critic optimiser state)."""
from __future__ import annotations

import dataclasses

import pytest

from fvae_core import cli
from fvae_core.runs.config import preset
import train_matrix as M


@pytest.fixture(scope="module")
def inits(tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix-presets")
    M.use_cache(root / "cache")
    return {"sd": M.make_init(root / "sd-shaped", M.SD_SHAPED), "micro": M.make_init(root / "micro", M.MICRO),
            "root": root}


@pytest.mark.parametrize("name", M.preset_names())
def test_preset_checkpoints_resumes_and_exports(inits, name):
    cfg = preset(name)
    init = inits["micro"] if name == "tiny-cpu-finetune" else inits["sd"]
    M.run_case(M.shrink(cfg, init), inits["root"] / "runs" / name.replace("/", "__"))


def test_no_gan_ablation_from_the_command_line(inits, capsys):
    """The card's own no-GAN ablation as a user runs it: ``fvae train --config sd-vae-ft-mse/no-gan`` from a
    local SD-shaped folder for two steps (a checkpoint after each), then ``--resume`` of that run; both exit
    0 and the export is written. (Resuming from the middle of a run is the parametrised case above.)"""
    run = inits["root"] / "cli-no-gan"
    sets = [f"init={inits['sd']}", "steps=2", "batch_size=2", "data.crop=32", 'data.sources=["photos"]',
            "data.val_scales=[0.1]", "ckpt_every=1", "eval_every=2", "sample_every=2", "sample_count=2",
            "steps_per_call=1"]
    args = ["train", "--config", "sd-vae-ft-mse/no-gan", *[a for s in sets for a in ("--set", s)]]
    assert cli.main(args + ["--run-dir", str(run), "--quiet"]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]
    assert cli.main(["train", "--resume", str(run), "--quiet"]) == 0, capsys.readouterr().err
    assert (run / "export" / "diffusers" / "config.json").is_file() and (run / "export" / "vae.safetensors").is_file()


def test_presets_are_all_in_the_matrix():
    """A preset added later is trained by the parametrised test above (it reads PRESETS itself)."""
    names = M.preset_names()
    assert {"smoke", "tiny-cpu", "tiny-cpu-finetune", "sd-vae-ft-mse"} <= set(names)
    assert all(f"sd-vae-ft-mse/{a}" in names for a in ("no-gan", "hinge-gan", "mae-only", "mse-only", "srgb-loss"))
    assert dataclasses.replace(preset("sd-vae-ft-mse/no-gan")).recipe.gan == "none"
