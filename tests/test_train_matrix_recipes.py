"""Every GAN objective x critic norm that config validation accepts, and gradient accumulation, each
trained through a checkpoint, a resume and an export (``tests/train_matrix.py``); and every combination it
refuses exits 2 with one line before any compute. Several steps per call through a stop at a call's end, a
resume and an export is ``test_runs.py``'s test, which also checks the result bit for bit (this file's copy of
it, 25 s of the suite, checked less and was dropped)."""
from __future__ import annotations

import dataclasses
import itertools

import pytest
import train_matrix as M

from fvae_core import cli
from fvae_core.critic import NORMS, OBJECTIVES
from fvae_core.runs.config import ConfigError, apply_overrides, preset
from fvae_core.train_steps import RecipeConfig, Trainer

GANS = (*OBJECTIVES, "none")


def _ndf(norm: str) -> int:
    return 16 if norm == "group" else 8  # group norm: 32 groups need 32, 64, 128 channels


def _accepted(gan: str, norm: str, ndf: int) -> bool:
    try:
        RecipeConfig(gan=gan, critic_norm=norm, critic_ndf=ndf)
        return True
    except ValueError:
        return False


ACCEPTED = [(g, n) for g, n in itertools.product(GANS, NORMS) if _accepted(g, n, _ndf(n))]
REFUSED = [(g, n, 8) for g, n in itertools.product(GANS, NORMS) if not _accepted(g, n, 8)]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix-recipes")
    M.use_cache(root / "cache")
    return root


def _smoke(**recipe):
    cfg = preset("smoke")
    return M.shrink(dataclasses.replace(cfg, recipe=dataclasses.replace(cfg.recipe, **recipe)))


def test_the_grid_is_what_validation_says():
    """The refused cells are exactly the batch-norm critic with a per-sample penalty, and group norm on a
    critic too narrow for 32 groups; without a GAN every norm is accepted (the critic is never built)."""
    assert ("wgan-gp", "layer") in ACCEPTED and ("none", "batch") in ACCEPTED
    assert M.shrink(preset("smoke")) == _smoke(gan="hinge", critic_norm="layer", critic_ndf=8)
    assert {(g, n) for g, n, _ in REFUSED} == {("wgan-gp", "batch"), ("ns-r1", "batch"), ("wgan-gp", "group"),
                                              ("hinge", "group"), ("ns-r1", "group")}


#: hinge x layer at width 8 is the ``smoke`` preset itself, trained in test_train_matrix_presets.py.
TRAINED = [c for c in ACCEPTED if c[0] != "none" and c != ("hinge", "layer")] + [("none", "layer")]


@pytest.mark.parametrize("gan,norm", TRAINED, ids=lambda v: str(v))
def test_gan_and_critic_norm_train_checkpoint_resume_export(root, gan, norm):
    M.run_case(_smoke(gan=gan, critic_norm=norm, critic_ndf=_ndf(norm)), root / "runs" / f"{gan}-{norm}")


def test_without_a_gan_the_critic_norm_changes_nothing_that_is_trained():
    """Why one ``gan = none`` case stands for all four norms: the state has no critic and no critic
    optimiser leaves, whatever the norm, and no leaf is empty (orbax cannot save a zero-size array)."""
    import jax

    from fvae_core.autoencoder import init_params

    states = []
    for norm in NORMS:
        trainer = Trainer(RecipeConfig(gan="none", critic_norm=norm), M.MICRO)
        states.append(trainer.init_state(init_params(M.MICRO, 0, image_size=32), jax.random.PRNGKey(0), 32))
    for s in states:
        assert jax.tree_util.tree_leaves(s.critic_params) == [] and jax.tree_util.tree_leaves(s.critic_opt_state) != []
        assert all(leaf.size > 0 for leaf in jax.tree_util.tree_leaves(s))
        assert jax.tree_util.tree_structure(s) == jax.tree_util.tree_structure(states[0])


@pytest.mark.parametrize("gan,norm,ndf", REFUSED, ids=lambda v: str(v))
def test_refused_combinations_exit_2_in_one_line_before_compute(root, tmp_path, capsys, gan, norm, ndf):
    with pytest.raises(ConfigError):
        apply_overrides(preset("smoke"), [f"recipe.gan={gan}", f"recipe.critic_norm={norm}"])
    run = tmp_path / "run"
    rc = cli.main(["train", "--config", "smoke", "--set", f"recipe.gan={gan}", "--set", f"recipe.critic_norm={norm}",
                   "--set", f"recipe.critic_ndf={ndf}", "--run-dir", str(run), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "critic norm" in err, err
    assert not run.exists()


def test_gradient_accumulation(root):
    cfg = dataclasses.replace(_smoke(gan="wgan-gp", critic_norm="layer"), batch_size=4, grad_accum=2)
    M.run_case(cfg, root / "runs" / "accum")
