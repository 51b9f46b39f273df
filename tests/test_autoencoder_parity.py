"""Our Flax AutoencoderKL against diffusers' PyTorch AutoencoderKL (the oracle), random weights, fp32."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fvae_core.autoencoder import AutoencoderKL, DiagonalGaussian, VAEConfig, ConfigError, PRESET_CONFIGS, abstract_params
from fvae_core.weights import params_from_diffusers_state_dict
from conftest import torch_state_numpy

TOL = 1e-4


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _fvae(cfg, model):
    params = params_from_diffusers_state_dict(torch_state_numpy(model), cfg)
    m = AutoencoderKL(cfg)
    enc = jax.jit(lambda p, x: m.apply({"params": p}, x, method=m.encode))
    dec = jax.jit(lambda p, z: m.apply({"params": p}, z, method=m.decode))
    return params, enc, dec


def test_encode_decode_match_diffusers(parity_case):
    name, cfg, model = parity_case
    params, enc, dec = _fvae(cfg, model)
    f = cfg.downsample_factor
    # Non-square, batch 2, values over the full model range.
    x = np.random.default_rng(1).uniform(-1, 1, (2, 6 * f, 10 * f, cfg.in_channels)).astype(np.float32)
    with torch.no_grad():
        post_t = model.encode(nchw(x)).latent_dist
        z = torch.randn(post_t.mean.shape, generator=torch.Generator().manual_seed(3))
        dec_t = model.decode(z).sample
    post = enc(params, x)
    assert post.mean.shape == (2, 6, 10, cfg.latent_channels)
    np.testing.assert_allclose(post.mean, nhwc(post_t.mean), atol=TOL, rtol=0)
    np.testing.assert_allclose(post.logvar, nhwc(post_t.logvar), atol=TOL, rtol=0)
    y = dec(params, jnp.asarray(nhwc(z)))
    assert y.dtype == jnp.float32 and y.shape == x.shape
    np.testing.assert_allclose(y, nhwc(dec_t), atol=TOL, rtol=0)
    # The decoded image is not trivially small: the tolerance is meaningful.
    assert float(np.abs(nhwc(dec_t)).std()) > 0.05


def test_full_reconstruction_matches_diffusers(parity_case):
    name, cfg, model = parity_case
    params, enc, dec = _fvae(cfg, model)
    x = np.random.default_rng(2).uniform(-1, 1, (1, 32, 24, 3)).astype(np.float32)
    with torch.no_grad():
        ref = nhwc(model(nchw(x)).sample)  # diffusers: decode(posterior.mode())
    y, post = AutoencoderKL(cfg).apply({"params": params}, x)
    np.testing.assert_allclose(y, ref, atol=TOL, rtol=0)


def test_posterior_clamp_and_sample_match_diffusers_distribution():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    rng = np.random.default_rng(0)
    moments = rng.normal(0, 30, (2, 3, 5, 8)).astype(np.float32)  # logvars far outside [-30, 20]
    ours = DiagonalGaussian.from_moments(jnp.asarray(moments))
    ref = DiagonalGaussianDistribution(nchw(moments))
    np.testing.assert_allclose(ours.logvar, nhwc(ref.logvar), rtol=1e-6)
    assert float(ours.logvar.max()) == 20.0 and float(ours.logvar.min()) == -30.0
    np.testing.assert_allclose(ours.std, nhwc(ref.std), rtol=1e-5)
    np.testing.assert_allclose(ours.kl(), ref.kl().numpy(), rtol=1e-4)
    assert np.array_equal(ours.mode(), ours.mean)
    key = jax.random.PRNGKey(5)
    s = ours.sample(key)
    eps = jax.random.normal(key, ours.mean.shape)
    np.testing.assert_allclose(s, ours.mean + ours.std * eps, rtol=1e-6)
    assert not np.array_equal(ours.sample(jax.random.PRNGKey(6)), s)


def test_bf16_compute_with_fp32_params():
    cfg = PRESET_CONFIGS["tiny-sd"]
    from conftest import make_torch_vae

    params, _, dec32 = _fvae(cfg, make_torch_vae(cfg))
    m16 = AutoencoderKL(cfg, dtype=jnp.bfloat16)
    z = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 6, 4))
    y16 = jax.jit(lambda p, z: m16.apply({"params": p}, z, method=m16.decode))(params, z)
    y32 = dec32(params, z)
    assert y16.dtype == jnp.float32  # decode returns float32 whatever the compute dtype
    assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(params))
    rel = float(jnp.linalg.norm(y16 - y32) / jnp.linalg.norm(y32))
    assert 1e-4 < rel < 5e-2, rel  # really computed in bf16 (not silently fp32), and still close
    # Gradients flow to fp32 params in bf16 compute.
    g = jax.grad(lambda p: jnp.mean(m16.apply({"params": p}, z, method=m16.decode) ** 2))(params)
    assert all(l.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(l))) for l in jax.tree_util.tree_leaves(g))


@pytest.mark.parametrize("name", ["sd-vae-ft-mse", "sdxl-vae", "flux-vae"])
def test_public_architectures_have_diffusers_param_counts(name):
    from diffusers import AutoencoderKL as TorchVAE

    cfg = PRESET_CONFIGS[name]
    with torch.device("meta"):
        tm = TorchVAE.from_config(cfg.to_dict())
    n_torch = sum(p.numel() for p in tm.parameters())
    n_ours = sum(int(np.prod(l.shape)) for l in jax.tree_util.tree_leaves(abstract_params(cfg)))
    assert n_ours == n_torch
    if name == "sd-vae-ft-mse":  # 34.16M encoder + 49.49M decoder incl. post_quant_conv (+ quant_conv)
        assert abs(n_ours - 83.65e6) < 0.01e6


def test_config_from_diffusers_json_and_errors():
    d = PRESET_CONFIGS["flux-vae"].to_dict()
    assert VAEConfig.from_dict(d) == PRESET_CONFIGS["flux-vae"]
    with pytest.raises(ConfigError, match="unknown AutoencoderKL config keys"):
        VAEConfig.from_dict({**d, "temporal_layers": 2})
    with pytest.raises(ConfigError, match="AutoencoderKLTemporalDecoder"):
        VAEConfig.from_dict({**d, "_class_name": "AutoencoderKLTemporalDecoder"})
    with pytest.raises(ConfigError, match="does not divide"):
        VAEConfig.from_dict({**d, "norm_num_groups": 48})
    with pytest.raises(ConfigError, match="same length"):
        VAEConfig.from_dict({**d, "block_out_channels": [128, 256]})
    with pytest.raises(ConfigError, match="act_fn"):
        VAEConfig.from_dict({**d, "act_fn": "tanh"})
    with pytest.raises(ConfigError, match="block types"):
        VAEConfig.from_dict({**d, "down_block_types": ["CrossAttnDownBlock2D"] * 4})


@pytest.mark.parametrize("shape,groups", [((2, 16, 12, 32), 16), ((1, 8, 8, 64), 32), ((3, 5, 7, 12), 3)])
def test_group_norm_matches_torch_with_gradients(shape, groups):
    """The GroupNorm (+SiLU) kernel, whose statistics are per-channel sums then group sums, against torch's
    ``group_norm`` and its autograd, on data with a large common offset (where a one-pass E[x^2] - E[x]^2
    variance would lose digits)."""
    from fvae_core.autoencoder import _group_norm_act

    r = np.random.default_rng(3)
    x = (r.standard_normal(shape) * 0.5 + 20.0).astype(np.float32)
    scale = r.uniform(0.5, 1.5, shape[-1]).astype(np.float32)
    bias = r.standard_normal(shape[-1]).astype(np.float32)
    dy = r.standard_normal(shape).astype(np.float32)
    fn = lambda x, s, b: _group_norm_act(x, s, b, groups, 1e-6, "silu", jnp.float32)  # noqa: E731
    y, vjp = jax.vjp(fn, jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias))
    gx, gs, gb = vjp(jnp.asarray(dy))
    xt, st, bt = (torch.tensor(v, dtype=torch.float64, requires_grad=True)
                  for v in (x.transpose(0, 3, 1, 2), scale, bias))
    yt = torch.nn.functional.silu(torch.nn.functional.group_norm(xt, groups, st, bt, eps=1e-6))
    yt.backward(torch.from_numpy(dy.transpose(0, 3, 1, 2)).double())
    pairs = {"y": (y, yt.detach().numpy().transpose(0, 2, 3, 1)), "dx": (gx, xt.grad.numpy().transpose(0, 2, 3, 1)),
             "dscale": (gs, st.grad.numpy()), "dbias": (gb, bt.grad.numpy())}
    for name, (got, ref) in pairs.items():  # float32 against float64: about 1e-6 of the largest value
        assert np.abs(np.asarray(got) - ref).max() / np.abs(ref).max() < 1e-5, name


def _wide_model():
    """A two-block model with 128 channels throughout (but conv_in's input and conv_out's output): its config,
    diffusers' model in float64 (the oracle), our params in float32, and our module."""
    from conftest import make_torch_vae

    E, D = "DownEncoderBlock2D", "UpDecoderBlock2D"
    cfg = VAEConfig(block_out_channels=(128, 128), down_block_types=(E,) * 2, up_block_types=(D,) * 2,
                    layers_per_block=1, norm_num_groups=32)
    model = make_torch_vae(cfg).double()
    params = params_from_diffusers_state_dict(torch_state_numpy(model), cfg)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)
    return cfg, model, params, AutoencoderKL(cfg)


def test_wide_decoder_on_winograd_path_matches_diffusers_with_gradients(monkeypatch):
    """A 128-channel model whose 3x3 convs on small images take fvae_core.conv's Winograd path (switched on
    here, checked below): decoding and the loss gradient of every decoder param against diffusers run in
    float64."""
    import fvae_core.conv

    monkeypatch.setattr(fvae_core.conv, "CONV2D_WINOGRAD_MIN_CHANNELS", 128)
    cfg, model, params, m = _wide_model()
    z = np.random.default_rng(4).standard_normal((2, 6, 10, cfg.latent_channels))
    w = np.random.default_rng(5).standard_normal((2, 12, 20, 3))

    def loss(p):
        return jnp.sum(m.apply({"params": p}, jnp.asarray(z, jnp.float32), method=m.decode) * w)

    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
    assert jaxpr.count("dot_general") >= 48 * 4, "the decoder's 128-channel convs did not take the Winograd path"
    val, grads = jax.value_and_grad(loss)(params)
    zt = torch.from_numpy(z.transpose(0, 3, 1, 2).copy())
    out = model.decode(zt).sample
    lt = (out * torch.from_numpy(w.transpose(0, 3, 1, 2).copy())).sum()
    lt.backward()
    assert abs(float(val) - lt.item()) < 1e-5 * abs(lt.item()) + 1e-4
    tgrads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().numpy()
              for k, p in model.named_parameters()}
    ref = params_from_diffusers_state_dict({**torch_state_numpy(model), **tgrads}, cfg)
    got, want = grads["decoder"], ref["decoder"]
    top = max(float(np.abs(np.asarray(r)).max()) for r in jax.tree_util.tree_leaves(want))
    for path, g in jax.tree_util.tree_leaves_with_path(got):
        r = np.asarray(_get_path(want, path), np.float64)
        # relative to the leaf, with a floor for leaves whose true gradient is 0 (attention's key bias)
        scale = max(float(np.abs(r).max()), 1e-4 * top)
        assert np.abs(np.asarray(g, np.float64) - r).max() / scale < 1e-4, jax.tree_util.keystr(path)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="Winograd is the default on XLA:CPU only")
def test_wide_encoder_on_default_winograd_path_matches_diffusers():
    """By default (CONV2D_WINOGRAD_MIN_CHANNELS = 128) a 128-channel encoder's 3x3 convs on small images
    run as Winograd F(2x2, 3x3) on the CPU, as the frozen encoder of the sd-vae-ft-mse step does at 64^2 and
    below: the posterior's mean and log-variance against diffusers run in float64."""
    cfg, model, params, m = _wide_model()
    x = np.random.default_rng(6).uniform(-1, 1, (2, 12, 20, 3))

    def moments(p, xx):
        post = m.apply({"params": p}, xx, method=m.encode)
        return post.mean, post.logvar

    xf = jnp.asarray(x, jnp.float32)
    # 8 of the encoder's convs are 128 -> 128 3x3 stride-1 (two per resnet block: two blocks, two in the mid
    # block); each is 16 matmuls on the Winograd path (conv_in, the downsample and conv_out stay convs).
    jaxpr = str(jax.make_jaxpr(moments)(params, xf))
    assert jaxpr.count("dot_general") >= 16 * 8, "the encoder's 128-channel convs did not take the Winograd path"
    mean, logvar = jax.jit(moments)(params, xf)
    with torch.no_grad():
        post_t = model.encode(nchw(x)).latent_dist
    for got, ref in ((mean, nhwc(post_t.mean)), (logvar, nhwc(post_t.logvar))):
        assert np.abs(np.asarray(got, np.float64) - ref).max() < 1e-5 * max(1.0, float(np.abs(ref).max()))


def _get_path(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree
