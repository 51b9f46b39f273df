"""Train steps: adaptive weight, one-backward gradient vs plain autodiff, EMA, overfit, bf16, validation."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fvae_core.autoencoder import AutoencoderKL, VAEConfig, init_params
from fvae_core.conventions import from_model_range, to_model_range
from fvae_core.critic import critic_input
from fvae_core.data import skimage_photo
from fvae_core.losses import adaptive_gan_weight, pixel_loss
from fvae_core.lpips import load_lpips, lpips_distance
from fvae_core.train_steps import (SMALL_LEAF_ELEMENTS, RecipeConfig, Trainer, all_finite, ema_decay_for_batch,
                                   ema_update, generator_grads, make_optimizer, merge_params, tree_norm)

E, D = "DownEncoderBlock2D", "UpDecoderBlock2D"
CFG = VAEConfig(block_out_channels=(16, 32), down_block_types=(E,) * 2, up_block_types=(D,) * 2,
                norm_num_groups=8, latent_channels=4)
BASE = RecipeConfig(critic_ndf=8, lr=2e-3, critic_lr=1e-4, warmup_steps=0, mae_schedule=False, w_mae=1.0,
                    w_mse=1.0, lpips_weight=0.5)


@pytest.fixture(scope="module")
def lp():
    return load_lpips("alexnet")  # the cheap backbone; VGG is the default in recipes


@pytest.fixture(scope="module")
def batch():
    img = skimage_photo("astronaut")[::8, ::8][:32, :32]  # a real, structured 32x32 image
    img2 = skimage_photo("coffee")[::8, ::8][10:42, 20:52]
    return {"image": jnp.asarray(np.stack([img, img2]).astype(np.float32) / 255.0)}


def _leaves(t):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(t)]


def test_adaptive_weight_halves_the_gradient_norm():
    rng = np.random.default_rng(0)
    for scale in [1e-3, 1.0, 30.0]:
        g_rec = rng.normal(size=(3, 3, 16, 3))
        g_adv = scale * rng.normal(size=(3, 3, 16, 3))
        w = float(adaptive_gan_weight(np.linalg.norm(g_rec), np.linalg.norm(g_adv), eps=1e-8))
        assert abs(np.linalg.norm(w * g_adv) / np.linalg.norm(g_rec) - 0.5) < 1e-3
    # Clamped to [0, 1e4] before the ratio (LDM), and never differentiated.
    assert float(adaptive_gan_weight(1.0, 0.0)) == pytest.approx(0.5 * 1e4)
    assert float(jax.grad(lambda a: adaptive_gan_weight(a, 2.0))(1.0)) == 0.0


def test_generator_gradient_equals_plain_autodiff_of_total_loss(lp, batch):
    """The one-backward gradient (image-space cotangents, last-layer norms, linearity) against jax.grad of
    the written-out total loss through the whole decoder, and the step's last-layer norms against the
    full-autodiff gradient of the decoder's conv_out kernel.

    The losses have kinks (the critic's leaky ReLUs, LPIPS' ReLUs and max pools), and the step's program
    computes y within 4e-6 of the eager decode (XLA fuses the larger program differently), which moved the
    adversarial conv_out gradient norm by 4.5e-4 (relative) and single parameter gradients by up to 3e-3.
    So the reference backpropagates the loss cotangents taken at the step's own output through the eager
    decoder (which is smooth), and the fully separate autodiff is checked with rtol 1e-3 on the norms."""
    recipe = dataclasses.replace(BASE, gan="wgan-gp", latent="mean")
    tr = Trainer(recipe, CFG)
    state = tr.init_state(init_params(CFG, 0), jax.random.PRNGKey(1), 32)
    x01 = batch["image"]
    grads, m, fake = jax.jit(lambda s, x, r, l: generator_grads(tr, "adversarial", s, x, r, l))(
        state, x01, jax.random.PRNGKey(2), lp)
    model, critic = tr.model, tr.critic
    z = model.apply({"params": merge_params(state.params, state.frozen)}, to_model_range(x01), method=model.encode).mode()

    def decode(trainable):
        return model.apply({"params": merge_params(trainable, state.frozen)}, z, method=model.decode)

    def adv_of(y):
        return -jnp.mean(critic.apply({"params": state.critic_params}, critic_input(y, "oklab")))

    def rec_of(y):
        return jnp.mean(pixel_loss(from_model_range(y), x01, "oklab", 1.0, 1.0)) + \
            0.5 * jnp.mean(lpips_distance(lp, y, to_model_range(x01), check=False))

    back = jax.vjp(decode, state.params)[1]
    g_rec, g_adv = back(jax.grad(rec_of)(fake))[0], back(jax.grad(adv_of)(fake))[0]
    n_rec = np.linalg.norm(g_rec["decoder"]["conv_out"]["kernel"])
    n_adv = np.linalg.norm(g_adv["decoder"]["conv_out"]["kernel"])
    np.testing.assert_allclose(float(m["grad_norm/rec_last_layer"]), n_rec, rtol=1e-5)
    np.testing.assert_allclose(float(m["grad_norm/adv_last_layer"]), n_adv, rtol=1e-5)
    for loss_of, key in ((rec_of, "grad_norm/rec_last_layer"), (adv_of, "grad_norm/adv_last_layer")):
        g_eager = jax.grad(lambda p: loss_of(decode(p)))(state.params)  # a fully separate program
        np.testing.assert_allclose(float(m[key]), np.linalg.norm(g_eager["decoder"]["conv_out"]["kernel"]), rtol=1e-3)
    w = float(m["adaptive_weight"])
    np.testing.assert_allclose(w, 0.5 * n_rec / (n_adv + 1e-4), rtol=1e-4)
    expected = jax.tree_util.tree_map(lambda a, b: a + w * b, g_rec, g_adv)
    for a, b in zip(_leaves(grads), _leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-6 * max(1.0, np.abs(b).max()))
    # After weighting, the adversarial gradient norm at W is half the reconstruction one.
    assert abs(w * n_adv / n_rec - 0.5) < 1e-3


def test_step_lpips_is_the_model_for_the_step_crop_and_dtype():
    """``Trainer.step_lpips`` is LPIPS loaded for the crop (non-square too) and the recipe's compute dtype,
    and None when the recipe has no LPIPS term."""
    from dataclasses import replace

    assert Trainer(BASE, CFG).step_lpips("alexnet", 32) is load_lpips("alexnet", image_size=(32, 32))
    bf16 = Trainer(replace(BASE, compute_dtype="bfloat16"), CFG)
    assert bf16.step_lpips("vgg16", 48, 64).only_for == (48, 64, "bfloat16")
    assert Trainer(replace(BASE, lpips_weight=0.0), CFG).step_lpips("vgg16", 32) is None


def test_last_layer_grad_equals_xla_kernel_gradient(monkeypatch):
    """The adaptive weight's dL/dW of conv_out against XLA's own kernel gradient of a lax conv."""
    from fvae_core.train_steps import _last_layer_grad

    r = np.random.default_rng(0)
    h = jnp.asarray(r.standard_normal((2, 9, 7, 16)), jnp.float32)
    k = jnp.asarray(r.standard_normal((3, 3, 16, 3)) / 12, jnp.float32)
    ct = jnp.asarray(r.standard_normal((2, 9, 7, 3)), jnp.float32)
    conv = lambda w: jax.lax.conv_general_dilated(h, w, (1, 1), [(1, 1), (1, 1)],
                                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
    ref = jax.vjp(conv, k)[1](ct)[0]
    import fvae_core.conv as C

    for backends in (("cpu",), ()):  # the one-matmul path, and XLA's gradient (what other backends use)
        monkeypatch.setattr(C, "CUSTOM_GRAD_BACKENDS", backends)
        got = jax.jit(_last_layer_grad)(h, k, ct)
        assert got.shape == k.shape and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))


def test_ema_matches_hand_computation():
    assert ema_decay_for_batch(32) == pytest.approx(1 - 0.001 * 32 / 192)
    assert ema_decay_for_batch(32) == pytest.approx(0.999833, abs=1e-6)
    assert ema_decay_for_batch(192) == pytest.approx(0.999)
    ema = {"a": np.array([1.0, 2.0], np.float32), "b": {"c": np.array(3.0, np.float32)}}
    seq = [{"a": np.array([3.0, -1.0], np.float32), "b": {"c": np.array(5.0, np.float32)}},
           {"a": np.array([0.0, 0.5], np.float32), "b": {"c": np.array(-2.0, np.float32)}}]
    ea, ec = np.array([1.0, 2.0]), 3.0
    for p in seq:
        ema = ema_update(ema, p, 0.9)
        ea, ec = 0.9 * ea + 0.1 * p["a"], 0.9 * ec + 0.1 * float(p["b"]["c"])
    np.testing.assert_allclose(ema["a"], ea, rtol=1e-6)
    np.testing.assert_allclose(ema["b"]["c"], ec, rtol=1e-6)


@pytest.mark.parametrize("stage", ["finetune", "pretrain"])
def test_30_step_overfit_lowers_reconstruction_loss(stage, lp, batch):
    recipe = dataclasses.replace(BASE, stage=stage, gan="none", kl_weight=1e-6 if stage == "pretrain" else 0.0,
                                 ema_decay=0.9)
    tr = Trainer(recipe, CFG)
    state = tr.init_state(init_params(CFG, 0), jax.random.PRNGKey(1), 32)
    frozen0, ema0 = _leaves(state.frozen), _leaves(state.ema)
    step = tr.step_fn("rec", lp)
    losses = []
    for i in range(30):
        state, m = step(state, batch, jax.random.PRNGKey(i))
        losses.append(float(m["loss/rec"]))
        assert all(np.isfinite(float(v)) for v in m.values())
        assert float(m["lpips/target_range_ok"]) == 1.0
    assert int(state.step) == 30
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:3]), losses
    recon = tr.eval_fn()
    assert recon is tr.eval_fn()  # cached: validation does not recompile
    y = recon(merge_params(state.ema, state.frozen), batch["image"])
    assert y.shape == batch["image"].shape and bool(jnp.all(jnp.isfinite(y)))
    if stage == "finetune":
        assert set(state.params) == {"decoder", "post_quant_conv"}
        assert all(np.array_equal(a, b) for a, b in zip(frozen0, _leaves(state.frozen)))
    else:
        assert set(state.params) >= {"encoder", "decoder"} and state.frozen == {}
        assert float(m["loss/kl"]) > 0
    assert not all(np.array_equal(a, b) for a, b in zip(ema0, _leaves(state.ema)))  # EMA moves


def test_gan_phases_train_the_critic_and_stay_finite(lp, batch):
    recipe = dataclasses.replace(BASE, gan="wgan-gp", critic_start=1, disc_start=2, drift_weight=1e-3)
    tr = Trainer(recipe, CFG)
    state = tr.init_state(init_params(CFG, 0), jax.random.PRNGKey(1), 32)
    assert [tr.phase_for_step(i) for i in range(3)] == ["rec", "critic-warmup", "adversarial"]
    c0 = _leaves(state.critic_params)
    for i in range(3):
        phase = tr.phase_for_step(i)
        params_before = _leaves(state.critic_params)
        state, m = tr.step_fn(phase, lp)(state, batch, jax.random.PRNGKey(i))
        assert all(np.isfinite(float(v)) for v in m.values()), m
        moved = not all(np.array_equal(a, b) for a, b in zip(params_before, _leaves(state.critic_params)))
        assert moved == (phase != "rec")
    for key in ["adaptive_weight", "critic/penalty", "critic/wasserstein", "critic/d_real", "critic/d_fake",
                "gen/update_norm", "critic/update_norm", "grad_norm/rec_last_layer"]:
        assert key in m
    assert float(m["adaptive_weight"]) > 0
    assert not all(np.array_equal(a, b) for a, b in zip(c0, _leaves(state.critic_params)))
    # A critic-only step (n_critic > 1) moves the critic and nothing else.
    gen_before, c_before = _leaves(state.params), _leaves(state.critic_params)
    state, m = tr.critic_step_fn()(state, batch, jax.random.PRNGKey(9))
    assert all(np.isfinite(float(v)) for v in m.values()) and "critic/penalty" in m
    assert all(np.array_equal(a, b) for a, b in zip(gen_before, _leaves(state.params)))
    assert not all(np.array_equal(a, b) for a, b in zip(c_before, _leaves(state.critic_params)))


def test_merged_gan_program_equals_the_separate_phases(lp, batch):
    """``fvae train`` runs warm-up and adversarial steps as one program ("gan", gated by a traced
    ``step >= disc_start``): each of its steps must equal the separate phase's step from the same state."""
    recipe = dataclasses.replace(BASE, gan="wgan-gp", critic_start=0, disc_start=2)
    tr = Trainer(recipe, CFG)
    assert [tr.program_for_step(i) for i in range(3)] == ["gan"] * 3
    assert Trainer(dataclasses.replace(recipe, critic_start=1), CFG).program_for_step(0) == "rec"
    state = tr.init_state(init_params(CFG, 0), jax.random.PRNGKey(1), 32)
    merged = tr.step_fn("gan", lp)
    for i in range(3):
        copy = jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), state)  # the steps donate the state
        ref_state, ref = tr.step_fn(tr.phase_for_step(i), lp)(copy, batch, jax.random.PRNGKey(i))
        state, m = merged(state, batch, jax.random.PRNGKey(i))
        assert int(state.step) == int(ref_state.step) == i + 1
        for k in ref:
            np.testing.assert_allclose(float(m[k]), float(ref[k]), rtol=2e-5, atol=1e-6, err_msg=f"step {i} {k}")
        if i < 2:  # warm-up: the generator saw no critic
            assert float(m["adaptive_weight"]) == 0.0 and "adaptive_weight" not in ref
        else:
            assert float(m["adaptive_weight"]) > 0
        for a, b in zip(_leaves((state.params, state.ema, state.critic_params)),
                        _leaves((ref_state.params, ref_state.ema, ref_state.critic_params))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        state = ref_state  # both continue from the same state


def test_bf16_step_is_finite_and_close_to_fp32(lp, batch):
    out = {}
    for dt in ["float32", "bfloat16"]:
        tr = Trainer(dataclasses.replace(BASE, gan="none", compute_dtype=dt), CFG)
        state = tr.init_state(init_params(CFG, 0), jax.random.PRNGKey(1), 32)
        _, m = tr.step_fn("rec", lp)(state, batch, jax.random.PRNGKey(0))
        out[dt] = {k: float(v) for k, v in m.items()}
        assert all(np.isfinite(v) for v in out[dt].values())
    for k in ["loss/pixel", "loss/lpips", "loss/rec"]:
        assert out["bfloat16"][k] == pytest.approx(out["float32"][k], rel=0.05), k
    # bf16 (8-bit mantissa) gradients through a deep random-init net: measured 7% off in norm here.
    assert out["bfloat16"]["gen/grad_norm"] == pytest.approx(out["float32"]["gen/grad_norm"], rel=0.15)
    assert out["bfloat16"]["loss/pixel"] != out["float32"]["loss/pixel"]  # bf16 really was used


@pytest.mark.parametrize("kw, msg", [
    (dict(critic_norm="batch", gan="wgan-gp"), "batch"),
    (dict(stage="distill"), "stage"),
    (dict(critic_start=10, disc_start=5), "critic_start"),
    (dict(loss_space="lab"), "loss_space"),
    (dict(compute_dtype="float16"), "compute_dtype"),
    # built in Python (not through the CLI's config parsing), a NaN lr passed "lr < 0" and trained into NaN
    (dict(lr=float("nan")), "lr nan is not a finite number"),
    (dict(critic_lr=float("inf")), "critic_lr inf is not a finite number"),
    (dict(channel_weights=(1.0, float("nan"), 1.0)), "channel_weights nan"),
    (dict(penalty_weight=float("-inf")), "penalty_weight -inf"),
])
def test_recipe_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        RecipeConfig(**kw)
    assert RecipeConfig(critic_norm="batch", gan="hinge").critic_norm == "batch"


def test_optimizer_warmup_and_clipping_against_hand_computed_adam():
    """AdamW(b1, b2) after global-norm clipping and a linear warm-up, against the Adam equations."""
    g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([[12.0]])}  # global norm 13
    params = {"a": jnp.zeros(2), "b": jnp.zeros((1, 1))}
    tx = make_optimizer(1e-2, warmup_steps=4, b1=0.5, b2=0.9, grad_clip=1.0)
    state = tx.init(params)
    m = v = 0.0
    for t in range(1, 4):
        updates, state = tx.update(g, state, params)
        clipped = np.array([3.0, 4.0, 12.0]) / 13.0
        m = 0.5 * m + 0.5 * clipped
        v = 0.9 * v + 0.1 * clipped ** 2
        lr = 1e-2 * (t - 1) / 4  # optax's linear schedule is evaluated at the pre-update count
        want = -lr * (m / (1 - 0.5 ** t)) / (np.sqrt(v / (1 - 0.9 ** t)) + 1e-8)
        got = np.concatenate([np.asarray(updates["a"]), np.asarray(updates["b"]).ravel()])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)


def _mixed_tree(n_small: int, seed: int = 0) -> dict:
    r = np.random.default_rng(seed)
    small = {f"s{i}": jnp.asarray(r.standard_normal((3, i + 1)), jnp.float32) for i in range(n_small)}
    return {"small": small, "big": jnp.asarray(r.standard_normal((SMALL_LEAF_ELEMENTS + 7,)), jnp.float32),
            "half": jnp.asarray(r.standard_normal((4,)), jnp.bfloat16)}


@pytest.mark.parametrize("clip", [None, 0.5])
def test_small_leaves_are_updated_as_one_vector_exactly_as_the_tree(clip):
    """make_optimizer updates the float32 leaves of at most SMALL_LEAF_ELEMENTS elements as one vector
    (pack_small_leaves). Its updates are optax's AdamW (+ global-norm clip, weight decay) on the tree itself,
    step after step; large and non-float32 leaves stay leaves of the state; and the update program does not
    grow with the number of small leaves (one Adam square root for all of them)."""
    params, grads = _mixed_tree(6, 0), _mixed_tree(6, 1)
    tx = make_optimizer(1e-2, warmup_steps=2, b1=0.5, b2=0.9, weight_decay=0.01, grad_clip=clip)
    ref = optax.chain(*([optax.clip_by_global_norm(clip)] if clip else []),
                      optax.adamw(optax.linear_schedule(0.0, 1e-2, 2), b1=0.5, b2=0.9, weight_decay=0.01))
    state, ref_state = tx.init(params), ref.init(params)
    for t in range(4):
        g = jax.tree_util.tree_map(lambda x, t=t: x * (t + 1.0), grads)
        got, state = jax.jit(tx.update)(g, state, params)
        want, ref_state = jax.jit(ref.update)(g, ref_state, params)
        assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(params)
        for a, b in zip(_leaves(got), _leaves(want)):
            assert a.dtype == b.dtype and a.shape == b.shape
            # the clip's global norm is summed in another order: a rounding of the scale, nothing more
            np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=2e-6, atol=0)
        params = optax.apply_updates(params, got)
    adam = next(s for s in jax.tree_util.tree_leaves(state, is_leaf=lambda s: hasattr(s, "mu")) if hasattr(s, "mu"))
    assert adam.mu["small"].shape == (sum(3 * (i + 1) for i in range(6)),)
    assert [x.shape for x in adam.mu["big"]] == [(SMALL_LEAF_ELEMENTS + 7,), (4,)]  # tree order: big, half

    def sqrt_count(n_small):
        p = _mixed_tree(n_small)
        tx = make_optimizer(1e-2)
        jaxpr = jax.make_jaxpr(tx.update)(p, tx.init(p), p)
        return sum(e.primitive.name == "sqrt" for e in jaxpr.jaxpr.eqns)

    assert sqrt_count(3) == sqrt_count(40) == 3  # the small vector, the big leaf, the bfloat16 leaf


def test_tree_norm_is_optax_norm_over_small_and_large_leaves():
    tree = _mixed_tree(5, 3)
    np.testing.assert_allclose(float(tree_norm(tree)), float(optax.tree.norm(tree)), rtol=1e-6)
    assert float(tree_norm({})) == 0.0


def test_nonfinite_step_is_skipped_and_leaves_the_state_bit_identical(lp, batch):
    """NaN guard: a batch with a NaN pixel makes the loss and gradients non-finite; the generator and critic
    updates are skipped (params, moments, EMA, critic untouched) and counted in the metrics."""
    recipe = dataclasses.replace(BASE, gan="wgan-gp", critic_start=0, disc_start=0)
    tr = Trainer(recipe, CFG)
    state = tr.init_state(init_params(CFG, 0), jax.random.PRNGKey(1), 32)
    step = tr.step_fn("adversarial", lp)
    state, m = step(state, batch, jax.random.PRNGKey(0))  # a good step first: moments are non-zero
    assert float(m["gen/skipped"]) == 0.0 and float(m["critic/skipped"]) == 0.0
    before = _leaves(state.replace(step=0))
    bad = {"image": batch["image"].at[0, 3, 5, 1].set(jnp.nan)}
    state, m = step(state, bad, jax.random.PRNGKey(1))
    assert float(m["gen/skipped"]) == 1.0 and float(m["critic/skipped"]) == 1.0
    assert not np.isfinite(float(m["loss/total"]))
    after = _leaves(state.replace(step=0))
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    assert int(state.step) == 2  # the step counter (and the data) move on
    state, m = step(state, batch, jax.random.PRNGKey(2))  # and training continues
    assert float(m["gen/skipped"]) == 0.0 and np.isfinite(float(m["loss/total"]))


def test_update_as_where_matches_the_cond_form_and_skips_bit_identically(lp, batch, monkeypatch):
    """Off :data:`COND_UPDATE_BACKENDS` (the GPU choice) a skipped update is a ``where`` per leaf instead of a
    ``lax.cond``: a good step gives the cond form's state (to float rounding: the two compile to different
    fusions), and a non-finite batch still leaves the state bit-identical and counts as skipped."""
    import fvae_core.train_steps as T

    recipe = dataclasses.replace(BASE, gan="wgan-gp", critic_start=0, disc_start=0)
    states = {}
    for backends in (("cpu",), ()):
        monkeypatch.setattr(T, "COND_UPDATE_BACKENDS", backends)
        monkeypatch.setattr(T, "_JIT_CACHE", {})  # equal Trainers share a cache entry: compile this form
        tr = Trainer(recipe, CFG)
        init = tr.init_state(init_params(CFG, 0), jax.random.PRNGKey(1), 32)  # the step donates its state
        step = tr.step_fn("adversarial", lp)
        states[backends], m = step(init, batch, jax.random.PRNGKey(0))
        assert float(m["gen/skipped"]) == 0.0 and float(m["critic/update_norm"]) > 0.0
    # Adam's first step moves each weight by about lr = 2e-3 whatever its gradient's size, so a weight whose
    # gradient is near Adam's eps moves by an amount that float rounding changes: measured 3e-5 at most. A
    # missing or stale update would be off by about lr; the tolerance is 1/20 of it.
    for a, b in zip(_leaves(states[("cpu",)]), _leaves(states[()])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=0.05 * BASE.lr)
    state = states[()]
    before = _leaves(state.replace(step=0))
    bad = {"image": batch["image"].at[1, 7, 2, 0].set(jnp.inf)}
    state, m = step(state, bad, jax.random.PRNGKey(1))
    assert float(m["gen/skipped"]) == 1.0 and float(m["critic/skipped"]) == 1.0
    assert float(m["gen/update_norm"]) == 0.0 and float(m["critic/update_norm"]) == 0.0
    assert all(np.array_equal(a, b) for a, b in zip(before, _leaves(state.replace(step=0))))


@pytest.mark.parametrize("where", ["bf16", "small", "big"])
@pytest.mark.parametrize("bad", [None, np.inf, -np.inf, np.nan])
def test_all_finite_flags_any_nonfinite_element_and_accepts_huge_finite_ones(bad, where):
    """The NaN guard's flag, checked against numpy: one inf or NaN anywhere (a bfloat16 leaf, a small
    float32 leaf, which is checked inside the packed vector, or a large one) makes it False; values near
    float32's max stay True (a norm-based shortcut would overflow there and fail)."""
    tree = {"a": jnp.full((3, 4), 3.0e38, jnp.float32), "b": [jnp.arange(5), jnp.ones((2,), jnp.bfloat16)],
            "c": jnp.asarray(-2.5e38, jnp.float32), "d": jnp.full((SMALL_LEAF_ELEMENTS + 1,), 1.0e38)}
    if bad is not None:
        if where == "bf16":
            tree["b"][1] = tree["b"][1].at[1].set(bad)
        elif where == "small":
            tree["a"] = tree["a"].at[2, 1].set(bad)
        else:
            tree["d"] = tree["d"].at[-1].set(bad)
    expected = all(np.all(np.isfinite(np.asarray(x, np.float32))) for x in jax.tree_util.tree_leaves(tree))
    assert expected == (bad is None)
    assert bool(jax.jit(all_finite)(tree, jnp.asarray(1.0))) == expected
    assert bool(all_finite({})) is True


def test_grad_accumulation_averages_micro_batch_gradients(lp, batch):
    """grad_accum=2 on a batch of 2 equals averaging generator_grads over the two single-image batches,
    each with its own rng (the split the step uses), in a phase without the critic. The pixel loss is taken
    in sRGB here: Oklab's cube root has a steep derivative near 0, and the ~3e-6 differences in y between the
    scanned and the separate programs moved the Oklab gradients by up to 6e-4 (relative), which says nothing
    about how micro-batches are accumulated (in sRGB they agree to a tenth of the tolerance below)."""
    recipe = dataclasses.replace(BASE, gan="none", latent="mean", loss_space="srgb")
    tr = Trainer(recipe, CFG)
    params = init_params(CFG, 0)
    s0 = tr.init_state(params, jax.random.PRNGKey(1), 32)
    g0, _, _ = generator_grads(tr, "rec", s0, batch["image"][:1], jax.random.PRNGKey(5), lp)
    g1, _, _ = generator_grads(tr, "rec", s0, batch["image"][1:], jax.random.PRNGKey(6), lp)
    want = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, g0, g1)
    full, _, _ = generator_grads(tr, "rec", s0, batch["image"], jax.random.PRNGKey(5), lp)
    from fvae_core.train_steps import _accumulated_generator_grads
    got, m, fake = _accumulated_generator_grads(tr, "rec", s0, batch["image"], jax.random.PRNGKey(7), lp, 2)
    for a, b in zip(_leaves(got), _leaves(want)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
    assert fake.shape == batch["image"].shape
    # With a posterior mean and per-sample losses, the full-batch gradient is the same average.
    for a, b in zip(_leaves(full), _leaves(want)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
    s1, m1 = tr.step_fn("rec", lp, grad_accum=2)(tr.init_state(params, jax.random.PRNGKey(1), 32), batch,
                                                 jax.random.PRNGKey(3))
    assert int(s1.step) == 1 and np.isfinite(float(m1["loss/total"]))


def test_steps_per_call_scan_equals_single_steps(lp, batch):
    """``raw_steps`` over two batches and keys (one ``lax.scan`` call) against two calls of the one-step
    function on the same batches and keys, adversarial from step 0 (generator and critic): the same metrics
    row by row and the same state. The single steps are traced under ``loop_body`` too, so both programs take
    the same conv gradients (custom, matmul) and differ only by XLA's fusion rounding. Adam's first updates
    are about ``lr * sign(g)``, so a rounding-level change of a near-zero gradient can flip an element by up
    to ``2 lr`` (seen: 2e-4 after three steps, lr 2e-3); the state check allows that for a few elements."""
    from fvae_core.conv import loop_body

    recipe = dataclasses.replace(BASE, gan="wgan-gp", critic_start=0, disc_start=0, loss_space="srgb")
    tr = Trainer(recipe, CFG)
    state0 = tr.init_state(init_params(CFG, 0), jax.random.PRNGKey(1), 32)
    images = jnp.stack([batch["image"], batch["image"][::-1, ::-1]])
    keys = jnp.stack([jax.random.PRNGKey(10 + i) for i in range(2)])
    multi, rows = jax.jit(tr.raw_steps("adversarial"))(state0, {"image": images}, keys, lp)
    single = jax.jit(tr.raw_step("adversarial"))
    state, want = state0, []
    with loop_body():  # read at trace time: the first call traces
        for i in range(2):
            state, m = single(state, {"image": images[i]}, keys[i], lp)
            want.append(m)
    assert int(multi.step) == int(state.step) == 2
    assert set(rows) == set(want[0]) and all(np.shape(v) == (2,) for v in rows.values())
    for i in range(2):  # row 1 is computed from the state after step 0: the state is threaded through
        for name in ("loss/total", "loss/pixel", "loss/lpips", "adaptive_weight", "critic/loss",
                     "gen/grad_norm", "critic/grad_norm", "gen/update_norm"):
            np.testing.assert_allclose(float(rows[name][i]), float(want[i][name]), rtol=1e-5, err_msg=name)
    assert float(rows["loss/total"][0]) != float(rows["loss/total"][1])  # two different steps
    lr = recipe.lr
    for part in ("params", "ema", "opt_state", "critic_params", "critic_opt_state"):
        a, b = (np.concatenate([np.ravel(x) for x in _leaves(getattr(t, part))]) for t in (multi, state))
        off = np.abs(a - b) > 1e-6 + 1e-5 * np.abs(b)
        assert off.mean() < 1e-3, (part, off.mean())
        if part in ("params", "ema", "critic_params"):
            assert np.max(np.abs(a - b)) <= 2.5 * lr, part


def test_pixel_weights_fed_as_input_equal_the_computed_ones(lp, batch):
    """``fvae train`` feeds ``(w_mae, w_mse)`` as ``batch["pixel_weights"]`` (Trainer.host_pixel_weights):
    a step fed them must equal one that computes them from its recipe, for the card's cosine schedule (at
    its start, middle and end, where the weights differ) and for fixed weights; as ``[n, 2]`` rows they
    follow ``raw_steps``' steps."""
    from fvae_core.train_steps import pixel_weights_at

    sched = dataclasses.replace(BASE, gan="wgan-gp", critic_start=0, disc_start=0, mae_schedule=True,
                                mae_schedule_steps=4)
    for recipe, steps in ((sched, (0, 2, 5)), (dataclasses.replace(BASE, w_mae=0.3, w_mse=2.0), (0,))):
        tr = Trainer(recipe, CFG)
        state0 = tr.init_state(init_params(CFG, 0), jax.random.PRNGKey(1), 32)
        for step in steps:
            state0 = state0.replace(step=jnp.asarray(step, state0.step.dtype))
            fed = tr.host_pixel_weights(step)
            assert fed.dtype == np.float32 and fed.shape == (2,)
            np.testing.assert_array_equal(fed, np.float32(jax.device_get(pixel_weights_at(recipe, step))))
            copy = jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), state0)
            phase = tr.program_for_step(step)
            s_in, m_in = tr.step_fn(phase, lp)(copy, {**batch, "pixel_weights": fed}, jax.random.PRNGKey(3))
            copy = jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), state0)
            s_own, m_own = tr.step_fn(phase, lp)(copy, batch, jax.random.PRNGKey(3))
            assert float(m_in["w_mae"]) == float(m_own["w_mae"]) and float(m_in["w_mse"]) == float(m_own["w_mse"])
            for k in m_own:
                np.testing.assert_allclose(float(m_in[k]), float(m_own[k]), rtol=2e-5, atol=1e-6, err_msg=k)
            # Weights that are constants get folded (a 0 MSE weight drops that term): two programs, equal up
            # to fusion rounding. Adam's first update is about lr * sign(g), so a rounding-level change of a
            # near-zero gradient moves that element by up to 2 lr (3.4e-5 seen); the rest must agree.
            diff = np.concatenate([np.abs(a - b).ravel() for a, b in zip(_leaves(s_in.params), _leaves(s_own.params))])
            assert diff.max() <= 2 * recipe.lr and np.mean(diff > 1e-6) < 0.01, (step, diff.max(), np.mean(diff > 1e-6))
    # the schedule really moves over these steps: a fixed weight could not pass the first loop by accident
    tr = Trainer(sched, CFG)
    rows = tr.host_pixel_weights(0, 5)
    assert rows.shape == (5, 2) and rows[0, 0] == 1.0 and rows[0, 1] == 0.0
    assert rows[2, 0] == pytest.approx(0.8) and rows[4, 0] == pytest.approx(0.6)
    np.testing.assert_array_equal(rows[3], tr.host_pixel_weights(3))


def test_pixel_weight_ablations_share_one_program(lp, batch):
    """With the pixel weights as an input, the card's recipe and its mae-only / mse-only ablations lower
    to the same program (so jax's persistent cache compiles it once for the three); a recipe that changes
    the computation (the sRGB loss space) does not, and neither does the card without the input."""
    from fvae_core.runs.config import ABLATIONS

    card = dataclasses.replace(BASE, gan="wgan-gp", critic_start=0, disc_start=2, mae_schedule=True,
                               mae_schedule_steps=300)
    recipes = {"card": card, **{n: dataclasses.replace(card, **ABLATIONS[n]) for n in ("mae-only", "mse-only",
                                                                                          "srgb-loss")}}
    state = Trainer(card, CFG).init_state(init_params(CFG, 0), jax.random.PRNGKey(1), 32)

    def hlo(recipe, feed=True):
        b = {**batch, "pixel_weights": np.zeros(2, np.float32)} if feed else batch
        text = jax.jit(Trainer(recipe, CFG).raw_step("gan")).lower(state, b, jax.random.PRNGKey(0), lp).as_text()
        return "\n".join(line.split(" loc(")[0] for line in text.splitlines() if not line.startswith("#loc"))

    card_hlo = hlo(card)
    assert hlo(recipes["mae-only"]) == card_hlo and hlo(recipes["mse-only"]) == card_hlo
    assert hlo(recipes["srgb-loss"]) != card_hlo  # the spaces not fed: compiled in
    assert hlo(card, feed=False) != hlo(recipes["mae-only"], feed=False)

    def hlo_fed(recipe):
        tr = Trainer(recipe, CFG)
        b = {**batch, **tr.host_step_inputs(0)}
        text = jax.jit(tr.raw_step("gan")).lower(state, b, jax.random.PRNGKey(0), lp).as_text()
        return "\n".join(line.split(" loc(")[0] for line in text.splitlines() if not line.startswith("#loc"))

    fed = hlo_fed(card)
    assert all(hlo_fed(recipes[n]) == fed for n in ("mae-only", "mse-only", "srgb-loss"))
    assert hlo_fed(dataclasses.replace(card, adaptive_ratio=0.25)) != fed  # a constant of the step


def test_spaces_fed_as_input_equal_the_compiled_ones(lp, batch):
    """``fvae train`` feeds the loss and critic spaces as ``batch["spaces"]`` (Trainer.host_step_inputs): a
    step fed them must equal one that has them compiled in, for the card (Oklab, Oklab), the srgb-loss
    ablation (sRGB, sRGB) and the two mixed choices, in the GAN phase (critic and generator both use them)."""
    from fvae_core.train_steps import spaces_input

    card = dataclasses.replace(BASE, gan="wgan-gp", critic_start=0, disc_start=0, mae_schedule=True,
                               mae_schedule_steps=300)
    losses = {}
    for loss_space, critic_space in (("oklab", "oklab"), ("srgb", "srgb"), ("srgb", "oklab"), ("oklab", "srgb")):
        recipe = dataclasses.replace(card, loss_space=loss_space, critic_space=critic_space)
        tr = Trainer(recipe, CFG)
        fed = tr.host_step_inputs(0)
        np.testing.assert_array_equal(fed["spaces"], [loss_space == "oklab", critic_space == "oklab"])
        state0 = tr.init_state(init_params(CFG, 0), jax.random.PRNGKey(1), 32)
        runs = []
        for b in ({**batch, **fed}, {**batch, "pixel_weights": fed["pixel_weights"]}):
            copy = jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), state0)
            runs.append(tr.step_fn("gan", lp)(copy, b, jax.random.PRNGKey(3)))
        (s_in, m_in), (s_own, m_own) = runs
        for k in m_own:
            np.testing.assert_allclose(float(m_in[k]), float(m_own[k]), rtol=2e-5, atol=1e-6,
                                       err_msg=f"{loss_space}/{critic_space} {k}")
        # Adam's first update is about lr * sign(g): a rounding-level change of a near-zero gradient moves that
        # element by up to 2 lr; the fraction of elements that moved at all is the real check
        for part, lr in (("params", recipe.lr), ("critic_params", recipe.critic_lr)):
            a, b = _leaves(getattr(s_in, part)), _leaves(getattr(s_own, part))
            diff = np.concatenate([np.abs(x - y).ravel() for x, y in zip(a, b)])
            assert diff.max() <= 2 * lr and np.mean(diff > 1e-6) < 0.01, (loss_space, critic_space, part)
        losses[(loss_space, critic_space)] = (float(m_own["loss/pixel"]), float(m_own["critic/d_real"]))
    # the spaces really change the step: a select that ignored its flag could not pass the loop by accident
    assert losses[("oklab", "oklab")][0] != losses[("srgb", "oklab")][0]
    assert losses[("oklab", "oklab")][1] != losses[("oklab", "srgb")][1]
    assert spaces_input(dataclasses.replace(card, loss_space="linear")) is None
