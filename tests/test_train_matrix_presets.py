"""Every preset and every ablation in ``PRESETS`` trains through a checkpoint, a resume and an export
(``tests/train_matrix.py`` says how the cases are shrunk). This is the test that was missing when the
``no-gan`` ablation could not write its first checkpoint (an empty packed critic optimiser state)."""
from __future__ import annotations

import json

import pytest
import train_matrix as M

from fvae_core import cli
from fvae_core.runs.config import apply_overrides, preset, to_dict


@pytest.fixture(scope="module")
def inits(tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix-presets")
    M.use_cache(root / "cache")
    return {"sd": M.make_init(root / "sd-shaped", M.SD_SHAPED), "micro": M.make_init(root / "micro", M.MICRO),
            "root": root}


@pytest.mark.parametrize("name", M.preset_names())
def test_preset_checkpoints_resumes_and_exports(inits, name, capsys):
    cfg = M.shrink(preset(name), inits["micro"] if name.endswith("-cpu-finetune") else inits["sd"])
    M.run_case(cfg, inits["root"] / "runs" / name.replace("/", "__"))
    if name == "sd-vae-ft-mse/no-gan":
        _no_gan_from_the_command_line(inits["root"] / "cli-no-gan", name, cfg, capsys)


def _overrides(name: str, cfg) -> list[str]:
    """The ``--set key=value`` list that turns preset ``name`` into ``cfg`` (every differing leaf)."""
    def flat(d, prefix=""):
        for k, v in d.items():
            yield from flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [(prefix + k, v)]
    base = dict(flat(to_dict(preset(name))))
    return [f"{k}={json.dumps(v)}" for k, v in flat(to_dict(cfg)) if base[k] != v]


def _no_gan_from_the_command_line(run, name, cfg, capsys):
    """The card's own no-GAN ablation as a user runs it: ``fvae train --config sd-vae-ft-mse/no-gan`` from a
    local SD-shaped folder for two steps (a checkpoint after each), then ``--resume`` of that run; both exit
    0 and the export is written. The overrides build exactly the matrix case's config (checked), so the
    step compiled for it is reused. (Resuming from the middle of a run is the matrix case itself.)"""
    sets = _overrides(name, cfg)
    assert apply_overrides(preset(name), sets) == cfg
    args = ["train", "--config", name, *[a for s in sets for a in ("--set", s)], "--run-dir", str(run), "--quiet"]
    assert cli.main(args) == 0, capsys.readouterr().err
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]
    assert cli.main(["train", "--resume", str(run), "--quiet"]) == 0, capsys.readouterr().err
    assert (run / "export" / "diffusers" / "config.json").is_file() and (run / "export" / "vae.safetensors").is_file()


def test_presets_are_all_in_the_matrix():
    """A preset added later is trained by the parametrised test above (it reads PRESETS itself)."""
    names = M.preset_names()
    assert {"smoke", "tiny-cpu", "tiny-cpu-finetune", "small-cpu", "small-cpu-finetune", "sd-vae-ft-mse"} <= set(names)
    assert all(f"sd-vae-ft-mse/{a}" in names for a in ("no-gan", "hinge-gan", "mae-only", "mse-only", "srgb-loss"))
    assert preset("sd-vae-ft-mse/no-gan").recipe.gan == "none"
