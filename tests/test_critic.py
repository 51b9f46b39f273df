"""The critic: PatchGAN architecture vs a PyTorch oracle, per-sample norms, penalties vs analytic linear
critics and PyTorch double-backprop, objectives vs NumPy references, and refusal of invalid configs."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import patchgan_state_from_flax, torch_patchgan
from fvae_core import critic as C

NORMS_PER_SAMPLE = ("layer", "group", "none")


# Most tests use a narrow critic (ndf 8, 4 groups): same layer list and code paths, a fraction of the cost.
SMALL = dict(ndf=8, groups=4)


@functools.lru_cache(maxsize=None)
def _init_cached(norm, seed, kw_items):
    model = C.PatchGAN(norm=norm, **{**SMALL, **dict(kw_items)})
    params = jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((2, 32, 32, 3)))["params"]
    return model, params


def _init(norm="layer", seed=0, **kw):
    """(model, params); cached, since param trees are immutable and init compiles are the slow part.
    Params do not depend on the image size, so the module can be applied at any size >= 24."""
    return _init_cached(norm, seed, tuple(sorted(kw.items())))


def _default_param_shapes(norm):
    """Param shapes of the full-size (ndf 64) critic without computing anything."""
    model = C.PatchGAN(norm=norm)
    tree = jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32))
    return tree["params"]


def _randomize_norms(params, seed=1):
    """Non-trivial norm affines, so that a swapped scale/shift or a wrong axis cannot hide behind 1/0."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, p in params.items():
        p = dict(p)
        if "scale" in p:
            p["scale"] = jnp.asarray(1.0 + 0.3 * rng.standard_normal(p["scale"].shape), jnp.float32)
            p["bias"] = jnp.asarray(0.3 * rng.standard_normal(p["bias"].shape), jnp.float32)
        elif "bias" in p:
            p["bias"] = jnp.asarray(0.1 * rng.standard_normal(p["bias"].shape), jnp.float32)
        out[name] = p
    return out


# ---- architecture -----------------------------------------------------------------------------------
def test_256_input_gives_30x30_logits():
    x = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
    full = C.PatchGAN()
    out = jax.eval_shape(lambda v, xx: full.apply(v, xx), jax.eval_shape(full.init, jax.random.PRNGKey(0), x), x)
    assert out.shape == (2, 30, 30, 1) and out.dtype == jnp.float32
    model, params = _init("layer")  # and really computed, by the narrow critic
    y = jax.jit(model.apply)({"params": params}, jax.random.normal(jax.random.PRNGKey(1), (1, 256, 256, 3)))
    assert y.shape == (1, 30, 30, 1) and y.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(y)))


# taming NLayerDiscriminator (BatchNorm), trainable parameters as torch shapes (out, in, kh, kw).
TAMING_PARAMS = {
    "main.0.weight": (64, 3, 4, 4), "main.0.bias": (64,),
    "main.2.weight": (128, 64, 4, 4), "main.3.weight": (128,), "main.3.bias": (128,),
    "main.5.weight": (256, 128, 4, 4), "main.6.weight": (256,), "main.6.bias": (256,),
    "main.8.weight": (512, 256, 4, 4), "main.9.weight": (512,), "main.9.bias": (512,),
    "main.11.weight": (1, 512, 4, 4), "main.11.bias": (1,),
}


def _flax_to_taming_shapes(params):
    out = {}
    for mod, p in params.items():
        idx = mod.split("_")[1]
        for k, v in p.items():
            tk = {"kernel": "weight", "scale": "weight", "bias": "bias"}[k]
            shape = tuple(v.shape)
            if k == "kernel":
                shape = (shape[3], shape[2], shape[0], shape[1])  # HWIO -> OIHW
            out[f"main.{idx}.{tk}"] = shape
    return out


@pytest.mark.parametrize("norm", ["batch", "layer", "group"])
def test_param_shapes_match_taming(norm):
    params = _default_param_shapes(norm)
    assert _flax_to_taming_shapes(params) == TAMING_PARAMS
    assert sum(int(np.prod(s)) for s in TAMING_PARAMS.values()) == sum(x.size for x in jax.tree.leaves(params))


def test_param_shapes_no_norm_have_biases():
    params = _default_param_shapes("none")
    shapes = _flax_to_taming_shapes(params)
    expected = {k: v for k, v in TAMING_PARAMS.items() if k.split(".")[1] in {"0", "2", "5", "8", "11"}}
    expected.update({"main.2.bias": (128,), "main.5.bias": (256,), "main.8.bias": (512,)})
    assert shapes == expected


def test_init_statistics():
    _, params = _init("layer", ndf=64, groups=32)
    k = np.asarray(params["main_8"]["kernel"])  # 2M weights
    assert abs(k.mean()) < 1e-3 and abs(k.std() - 0.02) < 5e-4
    assert np.all(np.asarray(params["main_0"]["bias"]) == 0)
    assert np.all(np.asarray(params["main_3"]["scale"]) == 1) and np.all(np.asarray(params["main_3"]["bias"]) == 0)


def _torch_patchgan(params, norm, ndf=SMALL["ndf"], groups=SMALL["groups"]):
    """The taming layer list (n_layers 3) as a plain torch nn.Sequential, loaded from the flax params."""
    import torch

    seq = torch_patchgan(ndf, norm, groups).train()  # train mode: BatchNorm uses batch statistics
    state = {k: torch.from_numpy(v) for k, v in patchgan_state_from_flax(params).items()}
    missing, unexpected = seq.load_state_dict(state, strict=False)
    assert not unexpected and all(("running" in m or "num_batches" in m) for m in missing), (missing, unexpected)
    return seq


@pytest.mark.parametrize("norm", ["none", "layer", "group", "batch"])
def test_torch_parity(norm):
    import torch

    model, params = _init(norm)
    params = _randomize_norms(params)
    x = np.random.default_rng(0).standard_normal((3, 64, 64, 3)).astype(np.float32)
    y = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(x)))
    seq = _torch_patchgan(params, norm)
    with torch.no_grad():
        yt = seq(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    assert y.shape == yt.shape == (3, 6, 6, 1)
    np.testing.assert_allclose(y, yt, atol=2e-5, rtol=1e-4)


def test_bf16_compute_keeps_fp32_params_and_output():
    model, params = _init("layer")
    m16 = C.PatchGAN(norm="layer", dtype=jnp.bfloat16, **SMALL)
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 64, 64, 3))
    p16 = jax.eval_shape(m16.init, jax.random.PRNGKey(0), x)["params"]
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(p16))
    y32 = jax.jit(model.apply)({"params": params}, x)
    y16 = jax.jit(m16.apply)({"params": params}, x)
    assert y16.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(y16 - y32))) < 0.05 * float(jnp.max(jnp.abs(y32))) + 1e-3


def test_bad_norm_and_channels_refused():
    with pytest.raises(ValueError, match="unknown critic norm"):
        C.PatchGAN(norm="instance").init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match="3 channels"):
        C.PatchGAN().init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 4)))


@pytest.mark.parametrize("norm", NORMS_PER_SAMPLE + ("batch",))
def test_norm_is_per_sample_except_batch(norm):
    model, params = _init(norm)
    x = jax.random.normal(jax.random.PRNGKey(3), (3, 32, 32, 3))
    x2 = x.at[1].set(5.0 * x[1] + 2.0)
    apply = jax.jit(model.apply)
    y, y2 = apply({"params": params}, x), apply({"params": params}, x2)
    unchanged = bool(jnp.allclose(y[0], y2[0], atol=1e-6) and jnp.allclose(y[2], y2[2], atol=1e-6))
    assert unchanged == (norm != "batch")


# ---- input space ------------------------------------------------------------------------------------
def test_critic_input_srgb_is_identity_and_unknown_refused():
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 4, 4, 3), minval=-1, maxval=1)
    assert C.critic_input(x, "srgb") is x
    with pytest.raises(ValueError, match="critic input space"):
        C.critic_input(x, "lab")


def test_critic_input_oklab():
    try:
        from fvae_core.color import oklab_from_srgb
    except ImportError:
        pytest.skip("fvae_core.color.oklab_from_srgb not available yet")
    x = jnp.stack([jnp.ones((2, 2, 3)), -jnp.ones((2, 2, 3))])  # white, black in model range
    lab = np.asarray(C.critic_input(x, "oklab"))
    np.testing.assert_allclose(lab[0], np.broadcast_to([1.0, 0.0, 0.0], (2, 2, 3)), atol=1e-4)
    np.testing.assert_allclose(lab[1], 0.0, atol=1e-4)
    y = jax.random.uniform(jax.random.PRNGKey(0), (2, 4, 4, 3), minval=-1, maxval=1)
    np.testing.assert_allclose(C.critic_input(y, "oklab"), oklab_from_srgb((y + 1) / 2), rtol=1e-6)


# ---- penalties: analytic linear critics ---------------------------------------------------------------
def _linear_critic(w):
    """D(x) = w . x for every sample, emitted as a single patch logit (B, 1, 1, 1)."""
    return lambda x: jnp.einsum("bhwc,hwc->b", x, w)[:, None, None, None]


@jax.jit
def _linear_penalties(w, real, fake, rng):
    return C.gradient_penalty(_linear_critic(w), real, fake, rng), C.r1_penalty(_linear_critic(w), real)


@pytest.mark.parametrize("wnorm", [0.0, 0.3, 1.0, 2.5, 17.0])
def test_gp_and_r1_on_linear_critic(wnorm):
    w = jax.random.normal(jax.random.PRNGKey(4), (8, 8, 3))
    w = w / jnp.linalg.norm(w) * wnorm
    kr, kf, ke = jax.random.split(jax.random.PRNGKey(5), 3)
    real, fake = jax.random.normal(kr, (4, 8, 8, 3)), jax.random.normal(kf, (4, 8, 8, 3))
    gp, r1 = _linear_penalties(w, real, fake, ke)
    assert gp.shape == r1.shape == (4,)
    np.testing.assert_allclose(gp, (wnorm - 1.0) ** 2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r1, wnorm ** 2, rtol=1e-5, atol=1e-6)


def test_gp_differentiates_the_patch_mean():
    """A critic emitting patches d_p = w_p . x has D = mean_p d_p, so GP = (||mean_p w_p|| - 1)^2."""
    ws = jax.random.normal(jax.random.PRNGKey(6), (2, 3, 8, 8, 3)) * 0.2
    critic_fn = lambda x: jnp.einsum("bhwc,pqhwc->bpq", x, ws)[..., None]  # (B, 2, 3, 1)
    real, fake = jnp.ones((2, 8, 8, 3)), jnp.zeros((2, 8, 8, 3))
    gp = jax.jit(C.gradient_penalty, static_argnums=0)(critic_fn, real, fake, jax.random.PRNGKey(0))
    expected = (np.linalg.norm(np.asarray(ws).mean(axis=(0, 1))) - 1.0) ** 2
    np.testing.assert_allclose(gp, expected, rtol=1e-4)


def test_gp_gradient_is_finite_when_input_gradient_vanishes():
    real, fake = jnp.ones((2, 4, 4, 3)), jnp.zeros((2, 4, 4, 3))
    f = lambda w: C.gradient_penalty(_linear_critic(w), real, fake, jax.random.PRNGKey(0)).mean()
    value, g = jax.jit(jax.value_and_grad(f))(jnp.zeros((4, 4, 3)))
    assert float(value) == 1.0 and bool(jnp.all(jnp.isfinite(g)))


def test_interpolate_one_eps_per_sample_in_unit_interval():
    real, fake = jnp.ones((5, 4, 4, 3)), jnp.zeros((5, 4, 4, 3))
    x = np.asarray(C.interpolate(real, fake, jax.random.PRNGKey(7)))
    eps = x[:, 0, 0, 0]
    assert np.all((eps >= 0) & (eps <= 1)) and len(set(eps.tolist())) == 5
    np.testing.assert_array_equal(x, np.broadcast_to(eps[:, None, None, None], x.shape))


# ---- patch_conv: the critic's conv as one matmul, vs lax.conv_general_dilated (the oracle) --------------
@pytest.mark.parametrize("hw,cin,cout,stride,pad", [(16, 3, 8, 2, 1), (9, 5, 4, 1, 1), (12, 4, 6, 2, 0),
                                                    (7, 2, 3, 1, 2)])
def test_patch_conv_matches_lax_conv_to_second_order(hw, cin, cout, stride, pad):
    from jax import lax

    rng = np.random.default_rng(hw * 7 + cin)
    x = jnp.asarray(rng.standard_normal((2, hw, hw + 1, cin)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((4, 4, cin, cout)) * 0.3, jnp.float32)

    def ref(x, k):
        return lax.conv_general_dilated(x, k, (stride, stride), [(pad, pad)] * 2,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def ours(x, k):
        return C.patch_conv(x, k, stride, pad)

    y, yr = ours(x, k), ref(x, k)
    assert y.shape == yr.shape
    np.testing.assert_allclose(y, yr, rtol=1e-5, atol=1e-5)

    # the gradient penalty's structure: a param gradient of a function of the input gradient
    def penalty(conv):
        def f(k):
            g = jax.grad(lambda z: jnp.sum(jnp.tanh(conv(z, k))))(x)
            return jnp.sum(jnp.square(g) * jnp.cos(x))
        return f

    for a, b in ((jax.grad(lambda z: jnp.sum(jnp.sin(ours(z, k))))(x),
                  jax.grad(lambda z: jnp.sum(jnp.sin(ref(z, k))))(x)),
                 (jax.grad(penalty(ours))(k), jax.grad(penalty(ref))(k))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))


def test_patch_conv_refuses_channel_mismatch():
    with pytest.raises(ValueError, match="channels"):
        C.patch_conv(jnp.zeros((1, 8, 8, 3)), jnp.zeros((4, 4, 2, 5)), 2, 1)


# ---- penalties: PyTorch double-backprop oracle on the real network ------------------------------------
def test_gp_value_and_param_gradient_match_torch():
    import torch

    model, params = _init("layer")
    params = _randomize_norms(params)
    rng = np.random.default_rng(8)
    real = jnp.asarray(rng.standard_normal((3, 32, 32, 3)), jnp.float32)
    fake = jnp.asarray(rng.standard_normal((3, 32, 32, 3)), jnp.float32)
    key = jax.random.PRNGKey(9)

    def gp_mean(p):
        gp = C.gradient_penalty(lambda x: model.apply({"params": p}, x), real, fake, key)
        return gp.mean(), gp

    (_, gp), grads = jax.jit(jax.value_and_grad(gp_mean, has_aux=True))(params)

    seq = _torch_patchgan(params, "layer").double()
    xt = torch.from_numpy(np.asarray(C.interpolate(real, fake, key), np.float64)).permute(0, 3, 1, 2)
    xt.requires_grad_(True)
    score = seq(xt).flatten(1).mean(1)  # D = mean of patch logits
    (gx,) = torch.autograd.grad(score.sum(), xt, create_graph=True)
    gpt = (gx.flatten(1).norm(dim=1) - 1.0) ** 2
    gpt.mean().backward()
    np.testing.assert_allclose(gp, gpt.detach().numpy(), rtol=1e-4, atol=1e-7)
    for name, p in seq.named_parameters():
        idx, kind = name.split(".")
        g = np.asarray(grads[f"main_{idx}"]["bias" if kind == "bias" else
                                            ("kernel" if p.ndim == 4 else "scale")])
        if p.ndim == 4:
            g = g.transpose(3, 2, 0, 1)
        gt = np.zeros(p.shape) if p.grad is None else p.grad.numpy()  # last bias: no path into grad_x D
        np.testing.assert_allclose(g, gt, rtol=2e-3, atol=2e-3 * np.abs(gt).max() + 1e-9, err_msg=name)


# ---- objectives vs NumPy references ------------------------------------------------------------------
def _logits(seed=10, shape=(4, 5, 5, 1)):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape).astype(np.float32) * 2, rng.standard_normal(shape).astype(np.float32) * 2)


def _softplus(x):
    return np.logaddexp(0.0, x)


def test_objectives_match_numpy():
    dr, df = _logits()
    mr, mf = dr.reshape(4, -1).mean(1), df.reshape(4, -1).mean(1)
    cases = {
        "wgan_critic": (C.wgan_critic_loss(dr, df), mf - mr),
        "wgan_gen": (C.wgan_generator_loss(df), -mf),
        "drift": (C.drift_penalty(dr), mr ** 2),
        "hinge_critic": (C.hinge_critic_loss(dr, df),
                         0.5 * (np.maximum(0, 1 - dr).reshape(4, -1).mean(1)
                                + np.maximum(0, 1 + df).reshape(4, -1).mean(1))),
        "hinge_gen": (C.hinge_generator_loss(df), -mf),
        "ns_critic": (C.ns_critic_loss(dr, df),
                      (_softplus(-dr) + _softplus(df)).reshape(4, -1).mean(1)),
        "ns_gen": (C.ns_generator_loss(df), _softplus(-df).reshape(4, -1).mean(1)),
    }
    for name, (got, want) in cases.items():
        assert got.shape == (4,), name
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)


def test_hinge_batch_mean_is_ldm_formula():
    dr, df = _logits(11, (3, 30, 30, 1))
    ldm = 0.5 * (np.mean(np.maximum(0, 1 - dr)) + np.mean(np.maximum(0, 1 + df)))  # taming hinge_d_loss
    np.testing.assert_allclose(jnp.mean(C.hinge_critic_loss(dr, df)), ldm, rtol=1e-6)
    np.testing.assert_allclose(jnp.mean(C.hinge_generator_loss(df)), -np.mean(df), rtol=1e-5)


def test_objectives_are_jittable():
    dr, df = _logits()
    for f in (C.wgan_critic_loss, C.hinge_critic_loss, C.ns_critic_loss):
        np.testing.assert_allclose(jax.jit(f)(dr, df), f(dr, df), rtol=1e-6)
    for f in (C.wgan_generator_loss, C.hinge_generator_loss, C.ns_generator_loss, C.drift_penalty):
        np.testing.assert_allclose(jax.jit(f)(df), f(df), rtol=1e-6)


# ---- registry and validation ---------------------------------------------------------------------------
def test_registry_defaults():
    obj = C.critic_objective()
    assert obj.name == "wgan-gp" and obj.penalty == "gp" and obj.penalty_weight == 10.0 and obj.drift_weight == 0
    assert obj.critic_loss is C.wgan_critic_loss and obj.generator_loss is C.wgan_generator_loss
    assert C.critic_objective("hinge").penalty is None
    ns = C.critic_objective("ns-r1")
    assert ns.penalty == "r1" and ns.penalty_weight == 10.0 and ns.generator_loss is C.ns_generator_loss
    assert C.critic_objective("hinge", norm="batch").name == "hinge"  # no penalty: batch norm allowed


@pytest.mark.parametrize("name", ["wgan-gp", "ns-r1"])
def test_batch_norm_with_per_sample_penalty_refused(name):
    with pytest.raises(ValueError) as e:
        C.critic_objective(name, norm="batch")
    assert "\n" not in str(e.value) and "batch" in str(e.value) and "per-sample" in str(e.value)


def test_unknown_objective_and_bad_weights_refused():
    with pytest.raises(ValueError, match="unknown critic objective"):
        C.critic_objective("lsgan")
    with pytest.raises(ValueError, match="no penalty"):
        C.critic_objective("hinge", penalty_weight=10.0)
    with pytest.raises(ValueError, match=">= 0"):
        C.critic_objective("wgan-gp", drift_weight=-1.0)


# ---- combiner: jit, finite grads, weights -------------------------------------------------------------
@pytest.mark.parametrize("name", ["wgan-gp", "hinge", "ns-r1"])
def test_critic_loss_terms_jit_and_finite_grads(name):
    # n_layers=1 keeps XLA:CPU compile time down; the full network's double backprop is checked vs torch above.
    model, params = _init("layer", n_layers=1)
    obj = C.critic_objective(name, drift_weight=1e-3)
    kr, kf = jax.random.split(jax.random.PRNGKey(12))
    real = jax.random.uniform(kr, (2, 32, 32, 3), minval=-1, maxval=1)
    fake = jax.random.uniform(kf, (2, 32, 32, 3), minval=-1, maxval=1)

    def loss(p, rng):
        terms = C.critic_loss_terms(obj, lambda x: model.apply({"params": p}, x), real, fake, rng)
        # the generator side of the same objective, through the same critic
        g_fake = jax.grad(lambda f: obj.generator_loss(model.apply({"params": p}, f)).mean())(fake)
        return terms["total"].mean(), (terms, g_fake)

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (value, (terms, g)), grads = step(params, jax.random.PRNGKey(13))
    assert set(terms) == {"total", "critic_loss", "penalty", "drift", "d_real", "d_fake"}
    assert all(v.shape == (2,) for v in terms.values())
    np.testing.assert_allclose(terms["total"], terms["critic_loss"] + obj.penalty_weight * terms["penalty"]
                               + 1e-3 * terms["drift"], rtol=1e-6)
    assert bool(jnp.isfinite(value)) and all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert float(sum(jnp.sum(jnp.abs(g)) for g in jax.tree.leaves(grads))) > 0
    if name == "hinge":
        assert np.all(np.asarray(terms["penalty"]) == 0)
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0
