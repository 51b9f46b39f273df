"""Rectified flow for latents: the straight-path interpolant, its velocity loss, the ODE sampler, and the
latent scaling factor (issue 28).

Convention (Liu et al. 2022, "Flow straight and fast"; Lipman et al. 2022, "Flow matching"; the form SD3
uses, Esser et al. 2024):

    x_t = (1 - t) x_0 + t eps,    t in [0, 1],  x_0 ~ data,  eps ~ N(0, I)
    v   = dx_t/dt = eps - x_0                  (the regression target of the model v_theta(x_t, t))

and sampling integrates dx/dt = v_theta(x, t) from t = 1 (pure noise) down to t = 0 (data).

Why rectified flow and not DDPM: the sampler is a deterministic ODE, so a seed fixes the noise and the
noise fixes the latent, and every decoder can be given the *same* generated latents as a paired comparison;
there is no noise schedule or variance choice to tune (DDPM's beta schedule, epsilon vs v parameterisation,
ancestral vs DDIM sampling), and straight paths give usable samples in tens of Euler or Heun steps, which
matters on 2 CPU cores.

Everything here is a pure function of arrays and a velocity function ``velocity(x, t) -> v`` with ``t`` of
shape ``(batch,)``; the network (``fvae_core.latents.unet``) and the run machinery live elsewhere.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

Velocity = Callable[[jax.Array, jax.Array], jax.Array]

#: The samplers :func:`sample` knows: ``euler`` (one velocity evaluation per step) and ``heun`` (two;
#: second order, the last step Euler so that the velocity is never needed at t = 0).
METHODS = ("euler", "heun")


def _bcast(t: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.reshape(t, t.shape + (1,) * (x.ndim - t.ndim))


def interpolate(x0: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = (1 - t) x_0 + t eps, with ``t`` of shape (batch,) broadcast over the other axes."""
    tb = _bcast(t, x0)
    return (1.0 - tb) * x0 + tb * eps


def velocity_target(x0: jax.Array, eps: jax.Array) -> jax.Array:
    """The straight path's velocity dx_t/dt = eps - x_0, the model's regression target."""
    return eps - x0


def flow_matching_loss(v_pred: jax.Array, x0: jax.Array, eps: jax.Array) -> jax.Array:
    """Per-example conditional flow-matching loss, mean over all but the batch axis:

        L = || v_theta(x_t, t) - (eps - x_0) ||^2 / D

    (Lipman et al. 2022, eq. 23 with the straight "optimal transport" path). Unreduced over the batch."""
    err = jnp.square(v_pred - velocity_target(x0, eps))
    return jnp.mean(err.reshape(err.shape[0], -1), axis=1)


def sample_times(key: jax.Array, n: int, kind: str = "logit-normal") -> jax.Array:
    """Training times t in (0, 1): ``uniform``, or ``logit-normal`` (t = sigmoid(N(0, 1)), SD3's choice,
    which spends more of the training on the middle of the path, where the velocity is hardest to predict)."""
    if kind == "uniform":
        return jax.random.uniform(key, (n,))
    if kind == "logit-normal":
        return jax.nn.sigmoid(jax.random.normal(key, (n,)))
    raise ValueError(f"unknown time sampling {kind!r}: expected 'uniform' or 'logit-normal'")


def sample(velocity: Velocity, noise: jax.Array, steps: int, method: str = "euler") -> jax.Array:
    """Integrate dx/dt = velocity(x, t) from t = 1 (``noise``) to t = 0 on a uniform grid of ``steps``
    steps; returns x at t = 0. Deterministic: the same noise gives the same sample.

    ``heun`` is Heun's second-order method on every step but the last, which is an Euler step (as in
    Karras et al. 2022), so the velocity is evaluated only at t in (0, 1]."""
    if method not in METHODS:
        raise ValueError(f"unknown sampler {method!r}: expected one of {', '.join(METHODS)}")
    if steps < 1:
        raise ValueError(f"sampler steps must be >= 1, got {steps}")
    ts = jnp.linspace(1.0, 0.0, steps + 1)
    batch = noise.shape[0]

    def step(i, x):
        t, t_next = ts[i], ts[i + 1]
        dt = t_next - t
        v = velocity(x, jnp.full((batch,), t))
        x_euler = x + dt * v
        if method == "euler":
            return x_euler
        v_next = velocity(x_euler, jnp.full((batch,), t_next))
        x_heun = x + dt * 0.5 * (v + v_next)
        return jnp.where(i == steps - 1, x_euler, x_heun)

    return jax.lax.fori_loop(0, steps, step, noise)


def scaling_factor(latents) -> float:
    """SD's ``scaling_factor``: 1 / std of the latents (all elements, population std), so that the scaled
    latents the generative model sees have unit variance (Rombach et al. 2022, sec. G: 0.18215 for SD 1.x
    was measured this way on a batch of posterior samples). Raises on an empty or constant set."""
    z = np.asarray(latents, dtype=np.float64)
    if z.size < 2:
        raise ValueError(f"need at least 2 latent values to measure a scaling factor, got {z.size}")
    std = float(z.std())
    if not np.isfinite(std) or std == 0.0:
        raise ValueError(f"latent std is {std}: cannot measure a scaling factor")
    return 1.0 / std
