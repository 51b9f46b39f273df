"""Rectified flow (fvae_core.latents.flow) against analytic oracles: the exact velocity field of a Gaussian
and of a Gaussian mixture, whose ODE solutions are known; then the loss trains a small network that
recovers a 2-D mixture's means and weights."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fvae_core.latents import flow

MEANS = np.array([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]])
WEIGHTS = np.array([0.5, 0.3, 0.2])
SPREAD = 0.3  # each component's isotropic std


def mixture_velocity(means, weights, s):
    """E[eps - x_0 | x_t = x] for data ~ sum_k w_k N(mu_k, s^2 I): per component x_t is Gaussian with mean
    (1-t) mu_k and variance (1-t)^2 s^2 + t^2, and the Gaussian posterior means of eps and x_0 are linear in x."""
    mu, logw = jnp.asarray(means), jnp.log(jnp.asarray(weights))

    def v(x, t):
        t = t[:, None, None]                                      # (B, 1, 1)
        var = (1 - t) ** 2 * s**2 + t**2
        r = x[:, None, :] - (1 - t) * mu[None]                    # (B, K, D)
        logp = logw[None] - 0.5 * jnp.sum(r**2, -1) / var[..., 0] - x.shape[-1] / 2 * jnp.log(var[..., 0])
        resp = jax.nn.softmax(logp, axis=1)[..., None]            # (B, K, 1)
        e_eps = t / var * r
        e_x0 = mu[None] + (1 - t) * s**2 / var * r
        return jnp.sum(resp * (e_eps - e_x0), axis=1)

    return v


def assign(x, means=MEANS):
    return np.argmin(((np.asarray(x)[:, None, :] - means[None]) ** 2).sum(-1), axis=1)


def mixture_fit(x):
    """Weights and means recovered from samples by nearest-mean assignment."""
    k = assign(x)
    w = np.bincount(k, minlength=len(MEANS)) / len(k)
    mu = np.stack([np.asarray(x)[k == j].mean(0) for j in range(len(MEANS))])
    return w, mu


def test_interpolant_and_target_are_the_straight_path():
    key = jax.random.PRNGKey(0)
    x0, eps = jax.random.normal(key, (3, 4, 4, 2)), jax.random.normal(jax.random.PRNGKey(1), (3, 4, 4, 2))
    t = jnp.array([0.0, 0.25, 1.0])
    xt = flow.interpolate(x0, eps, t)
    np.testing.assert_allclose(xt[0], x0[0]); np.testing.assert_allclose(xt[2], eps[2])
    np.testing.assert_allclose(xt[1], 0.75 * x0[1] + 0.25 * eps[1], rtol=1e-6)
    # the target is the time derivative of the path: a finite difference along t recovers it
    h = 1e-3
    fd = (flow.interpolate(x0, eps, t + h) - flow.interpolate(x0, eps, t)) / h
    np.testing.assert_allclose(fd, flow.velocity_target(x0, eps), atol=2e-3)
    loss = flow.flow_matching_loss(flow.velocity_target(x0, eps), x0, eps)
    assert loss.shape == (3,) and float(jnp.max(loss)) == 0.0
    np.testing.assert_allclose(flow.flow_matching_loss(jnp.zeros_like(x0), x0, eps),
                               np.mean(np.asarray(eps - x0).reshape(3, -1) ** 2, axis=1), rtol=1e-6)


def test_sampler_on_a_gaussian_is_exact_and_heun_is_second_order():
    """For data N(0, s^2 I) the exact flow maps the noise eps to s * eps; Euler's error falls ~1/steps, Heun's
    ~1/steps^2 (measured: 0.129 and 0.0137 at 16 steps)."""
    s = 0.4
    v = mixture_velocity(np.zeros((1, 2)), np.ones(1), s)
    noise = jax.random.normal(jax.random.PRNGKey(0), (256, 2))
    err = {(m, n): float(jnp.max(jnp.abs(flow.sample(v, noise, n, m) - s * noise)))
           for m in flow.METHODS for n in (8, 16)}
    assert err[("heun", 16)] < 0.2 * err[("euler", 16)]                 # same steps, 5x closer
    assert 1.7 < err[("euler", 8)] / err[("euler", 16)] < 2.3            # first order
    assert err[("heun", 8)] / err[("heun", 16)] > 3.0                     # (at least) second order


def test_sampler_with_the_exact_field_recovers_the_mixture():
    """Tolerance: weights within 0.03 (about 4 standard errors at n = 4000), means within 0.05."""
    v = mixture_velocity(MEANS, WEIGHTS, SPREAD)
    x = flow.sample(v, jax.random.normal(jax.random.PRNGKey(3), (4000, 2)), 50, "heun")
    w, mu = mixture_fit(x)
    np.testing.assert_allclose(w, WEIGHTS, atol=0.03)
    np.testing.assert_allclose(mu, MEANS, atol=0.05)
    assert float(np.median(np.min(np.linalg.norm(np.asarray(x)[:, None] - MEANS[None], axis=-1), 1))) < 2 * SPREAD


def test_sampling_is_deterministic_for_the_noise_and_rejects_bad_options():
    v = mixture_velocity(MEANS, WEIGHTS, SPREAD)
    noise = jax.random.normal(jax.random.PRNGKey(5), (16, 2))
    a, b = flow.sample(v, noise, 10, "heun"), flow.sample(v, noise, 10, "heun")
    assert np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="unknown sampler"):
        flow.sample(v, noise, 10, "rk45")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        flow.sample(v, noise, 0)
    with pytest.raises(ValueError, match="unknown time sampling"):
        flow.sample_times(jax.random.PRNGKey(0), 4, "beta")


def test_time_sampling_ranges_and_shapes():
    for kind in ("uniform", "logit-normal"):
        t = np.asarray(flow.sample_times(jax.random.PRNGKey(0), 10000, kind))
        assert t.shape == (10000,) and 0 < t.min() and t.max() < 1
    t = np.asarray(flow.sample_times(jax.random.PRNGKey(0), 10000, "logit-normal"))
    assert abs(np.median(t) - 0.5) < 0.02 and np.mean(np.abs(t - 0.5) < 0.25) > 0.6  # mass in the middle


def test_scaling_factor_is_one_over_the_std_it_was_measured_on():
    z = np.random.default_rng(0).normal(0.3, 5.5, size=(64, 8, 8, 4)).astype(np.float32)
    f = flow.scaling_factor(z)
    assert f == pytest.approx(1 / np.float64(z).std(), rel=1e-12)
    assert np.float64(z * f).std() == pytest.approx(1.0, rel=1e-6)
    for bad in (np.zeros((4, 4)), np.ones(1), np.array([1.0, np.nan])):
        with pytest.raises(ValueError, match="scaling factor"):
            flow.scaling_factor(bad)


def test_the_loss_trains_a_network_that_recovers_the_mixture():
    """A 2-layer MLP on (x, t) trained with the flow-matching loss for 1,500 Adam steps; its samples recover
    the mixture's weights within 0.06 and means within 0.2 (the exact field gets 0.03 / 0.05 above: the
    network's error is the rest)."""
    rng = np.random.default_rng(0)

    def data(n):
        k = rng.choice(len(WEIGHTS), size=n, p=WEIGHTS)
        return (MEANS[k] + SPREAD * rng.normal(size=(n, 2))).astype(np.float32)

    def init(key, width=128):
        k1, k2, k3 = jax.random.split(key, 3)
        g = lambda k, a, b: jax.random.normal(k, (a, b)) / np.sqrt(a)
        return {"w1": g(k1, 2 + 16, width), "b1": jnp.zeros(width), "w2": g(k2, width, width),
                "b2": jnp.zeros(width), "w3": g(k3, width, 2) * 0.1, "b3": jnp.zeros(2)}

    def net(p, x, t):
        freqs = jnp.arange(1, 9, dtype=jnp.float32) * np.pi
        h = jnp.concatenate([x, jnp.sin(t[:, None] * freqs), jnp.cos(t[:, None] * freqs)], -1)
        h = jax.nn.silu(h @ p["w1"] + p["b1"])
        h = jax.nn.silu(h @ p["w2"] + p["b2"])
        return h @ p["w3"] + p["b3"]

    opt = optax.adam(2e-3)

    @jax.jit
    def step(p, o, x0, key):
        k1, k2 = jax.random.split(key)
        eps, t = jax.random.normal(k1, x0.shape), flow.sample_times(k2, x0.shape[0], "uniform")
        loss, g = jax.value_and_grad(lambda q: flow.flow_matching_loss(net(q, flow.interpolate(x0, eps, t), t),
                                                                      x0, eps).mean())(p)
        u, o = opt.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    p = init(jax.random.PRNGKey(0))
    o = opt.init(p)
    key = jax.random.PRNGKey(1)
    losses = []
    for i in range(1500):
        p, o, loss = step(p, o, jnp.asarray(data(256)), jax.random.fold_in(key, i))
        losses.append(float(loss))
    assert np.mean(losses[-100:]) < 0.8 * np.mean(losses[:100])
    x = flow.sample(lambda x, t: net(p, x, t), jax.random.normal(jax.random.PRNGKey(2), (4000, 2)), 40, "heun")
    w, mu = mixture_fit(x)
    np.testing.assert_allclose(w, WEIGHTS, atol=0.06)
    np.testing.assert_allclose(mu, MEANS, atol=0.2)
