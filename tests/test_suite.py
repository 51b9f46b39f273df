"""Suite plumbing: run-cache keys, ablations, notebook settings (cheap; the notebooks themselves run in test_notebooks)."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from fvae_core import suite
from fvae_core.runs import cache
from fvae_core.runs.config import ABLATIONS, ConfigError, preset, smoke_variant

ROOT = Path(__file__).resolve().parents[1]


def test_config_key_ignores_the_name_and_tracks_what_is_computed(tmp_path):
    cfg = dataclasses.replace(preset(suite.FINETUNE), init=str(ROOT / "weights" / suite.BASE))
    key = cache.config_key(cfg)
    assert cache.config_key(dataclasses.replace(cfg, name="renamed")) == key
    assert cache.config_key(dataclasses.replace(cfg, steps=cfg.steps + 1)) != key
    assert cache.config_key(cache.ablation(cfg, "mse-only")) != key
    # The same weights elsewhere give the same key; changed weight bytes give a new one.
    copy = tmp_path / "w"
    shutil.copytree(ROOT / "weights" / suite.BASE, copy)
    assert cache.config_key(dataclasses.replace(cfg, init=str(copy))) == key
    st = next(copy.rglob("*.safetensors"))
    data = bytearray(st.read_bytes())
    data[-1] ^= 1
    st.write_bytes(bytes(data))
    assert cache.config_key(dataclasses.replace(cfg, init=str(copy))) != key


def test_ablations_change_one_recipe_field_each():
    cfg = preset(suite.FINETUNE)
    assert cache.ablation(cfg, "card") is cfg
    for name, change in ABLATIONS.items():
        a = cache.ablation(cfg, name)
        assert a.name.endswith(name) and {k: getattr(a.recipe, k) for k in change} == change
        assert dataclasses.replace(a.recipe, **{k: getattr(cfg.recipe, k) for k in change}) == cfg.recipe
    with pytest.raises(ConfigError, match="unknown ablation"):
        cache.ablation(cfg, "no-such")


def test_smoke_variant_keeps_the_recipe_and_shrinks_the_run():
    cfg = preset(suite.FINETUNE)
    s = smoke_variant(cfg)
    assert (s.steps, s.batch_size, s.data.crop) == (3, 2, 32) and s.recipe.disc_start == 0
    for f in ("loss_space", "gan", "critic_norm", "lpips_weight", "w_mae", "w_mse", "ema_decay"):
        assert getattr(s.recipe, f) == getattr(cfg.recipe, f)


def test_settings_resolve_environment_then_defaults(tmp_path, monkeypatch):
    monkeypatch.delenv("FVAE_RUN_ROOT", raising=False)
    monkeypatch.setenv("FVAE_FIG_DIR", str(tmp_path / "figs"))
    monkeypatch.setenv("FVAE_SMOKE", "1")
    s = suite.settings(run_root=tmp_path / "r")
    assert s.smoke and s.fig_dir == tmp_path / "figs" and s.run_root == tmp_path / "r" and s.root == ROOT
    assert not suite.settings(smoke=False, run_root=tmp_path / "r").smoke  # the parameter wins
    monkeypatch.setenv("FVAE_SMOKE", "0")
    assert suite.settings(run_root=tmp_path / "r").smoke is False


def test_cached_runs_reports_a_failed_child_with_its_reason(tmp_path, monkeypatch):
    """Runs trained in child processes: a child that fails (here: its init weights are gone) raises one error
    naming the run and the child's own last line, and leaves its log; nothing is reported finished."""
    monkeypatch.setenv("FVAE_CACHE", str(tmp_path / "cache"))
    cfg = smoke_variant(dataclasses.replace(preset(suite.FINETUNE), init=str(tmp_path / "no-such-weights")))
    cfgs = [cfg, dataclasses.replace(cfg, seed=1)]
    with pytest.raises(RuntimeError, match=r"small-cpu-finetune/smoke: .*no-such-weights.* \(see .*\.log\)"):
        cache.cached_runs(cfgs, tmp_path / "runs", workers=2, log=lambda m: None)
    assert len(list((tmp_path / "runs").glob("*.log"))) == 2
    assert not any(cache.is_finished(cache.run_dir_for(c, tmp_path / "runs")) for c in cfgs)


def test_runs_sharing_a_program_are_not_started_together():
    """The card and its mae-only / mse-only / srgb-loss ablations differ only in step inputs (one program
    key); the suite's ablations are started so that no two of one program start at once, and a config that
    changes the step (no GAN, hinge) has its own key."""
    s = suite.settings(smoke=False)
    cfgs = {n: suite.finetune_config(s, ROOT / "weights" / suite.BASE, n) for n in suite.ABLATIONS}
    keys = {n: cache.program_key(c) for n, c in cfgs.items()}
    assert keys["card"] == keys["mae-only"] == keys["mse-only"] == keys["srgb-loss"]
    assert len({keys[n] for n in ("card", "no-gan", "hinge-gan")}) == 3
    linear = dataclasses.replace(cfgs["card"], recipe=dataclasses.replace(cfgs["card"].recipe, loss_space="linear"))
    assert cache.program_key(linear) != keys["card"]  # a space that is not an input is compiled in
    assert len({cache.config_key(c) for c in cfgs.values()}) == 6  # the runs themselves stay distinct
    queue, running, order = list(cfgs.values()), [], []
    while queue:  # two workers; the oldest finishes first
        if len(running) == 2:
            running.pop(0)
        cfg = queue.pop(cache._next_to_start(queue, running))
        running.append(cfg)
        order.append(cfg.name.split("/")[-1])
    assert order == ["small-cpu-finetune", "no-gan", "mae-only", "hinge-gan", "mse-only", "srgb-loss"], order
    assert cache._next_to_start([cfgs["mae-only"]], [cfgs["card"]]) == 0  # nothing else to start: start it
