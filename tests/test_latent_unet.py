"""The latent UNet (fvae_core.latents.unet): shapes, its zero start, its time conditioning, the config checks,
and a few flow-matching steps that lower the loss."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fvae_core.latents import flow, unet

SMALL = unet.UNetConfig(widths=(16, 32), blocks=1, groups=8, heads=2, time_dim=32)  # attention at level 1 and mid


def test_shapes_zero_start_and_default_size():
    p = unet.init_params(SMALL, 0, 8)
    v = jax.jit(unet.velocity_fn(p, SMALL))
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 16, 4))
    out = v(x, jnp.array([0.1, 0.5, 0.9]))
    assert out.shape == x.shape and float(jnp.max(jnp.abs(out))) == 0.0   # zero output conv: v = 0 at init
    # the default model stays within the 10 MB at fp16
    assert unet.param_count(jax.eval_shape(lambda: unet.init_params(unet.UNetConfig(), 0, 8))) * 2 <= 10e6


def test_output_depends_on_t_and_on_x_once_the_zero_layers_move():
    p = unet.init_params(SMALL, 0, 8)
    p = jax.tree_util.tree_map(lambda a: a + 0.05 * jax.random.normal(jax.random.PRNGKey(a.size), a.shape), p)
    v = jax.jit(unet.velocity_fn(p, SMALL))
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 4))
    a, b = v(x, jnp.array([0.2, 0.2])), v(x, jnp.array([0.8, 0.8]))
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3
    assert float(jnp.max(jnp.abs(a - v(x + 0.5, jnp.array([0.2, 0.2]))))) > 1e-3
    e = unet.timestep_embedding(jnp.array([0.0, 1.0]), 32)
    assert e.shape == (2, 32) and np.allclose(e[0, :16], 1.0) and np.allclose(e[0, 16:], 0.0)


def test_config_and_size_errors_are_one_line():
    with pytest.raises(ValueError, match="multiples of groups"):
        unet.UNetConfig(widths=(20, 32), groups=8)
    with pytest.raises(ValueError, match="one flag per level"):
        unet.UNetConfig(widths=(16, 32, 64), attention=(False, True), groups=8)
    with pytest.raises(ValueError, match="heads"):
        unet.UNetConfig(widths=(16, 32), groups=8, heads=3)
    p = unet.init_params(SMALL, 0, 8)
    with pytest.raises(ValueError, match="not a multiple of 2"):
        unet.velocity_fn(p, SMALL)(jnp.zeros((1, 7, 8, 4)), jnp.zeros((1,)))


def test_flow_matching_steps_lower_the_loss_on_fixed_latents():
    x0 = jnp.asarray(np.random.default_rng(0).normal(size=(8, 8, 8, 4)).astype(np.float32)) * 0.5 + 0.3
    p = unet.init_params(SMALL, 0, 8)
    model, opt = unet.LatentUNet(SMALL), optax.adam(1e-3)
    o = opt.init(p)

    def loss_fn(q, key):
        k1, k2 = jax.random.split(key)
        eps, t = jax.random.normal(k1, x0.shape), flow.sample_times(k2, x0.shape[0])
        return flow.flow_matching_loss(model.apply({"params": q}, flow.interpolate(x0, eps, t), t), x0, eps).mean()

    @jax.jit
    def step(q, o, key):
        loss, g = jax.value_and_grad(loss_fn)(q, key)
        u, o = opt.update(g, o, q)
        return optax.apply_updates(q, u), o, loss

    mean_loss = jax.jit(lambda q: jnp.mean(jnp.stack([loss_fn(q, jax.random.PRNGKey(i)) for i in range(8)])))
    before = float(mean_loss(p))
    for i in range(60):
        p, o, _ = step(p, o, jax.random.PRNGKey(100 + i))
    after = float(mean_loss(p))
    assert after < 0.8 * before, (before, after)
