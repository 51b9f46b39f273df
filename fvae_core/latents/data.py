"""The latent generative model's training data: a VAE's posteriors of augmented training crops (issue 28).

Each crop is encoded once and its posterior kept as (mean, std), so that every epoch can draw fresh posterior
samples ``z = mean + std * eps`` without running the encoder again (LDM trains its diffusion model on
posterior samples too). The latents are *unscaled* (as ``decode`` takes them); the generative model sees
``z * scaling_factor``, with the factor measured as 1 / std of posterior samples of this very set
(:func:`fvae_core.latents.flow.scaling_factor`), as SD's 0.18215 was.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fvae_core.latents.flow import scaling_factor


@dataclasses.dataclass(frozen=True)
class Posteriors:
    """Diagonal Gaussian posteriors of N crops: ``mean`` and ``std`` float32 (N, h, w, c), and where they
    came from (``meta``: the VAE, the data, the crop, passes and seed)."""

    mean: np.ndarray
    std: np.ndarray
    meta: dict

    def __post_init__(self):
        if self.mean.shape != self.std.shape or self.mean.ndim != 4 or not len(self.mean):
            raise ValueError(f"posteriors need equal (N, h, w, c) mean and std, got {self.mean.shape} and "
                             f"{self.std.shape}")

    def __len__(self) -> int:
        return len(self.mean)

    def sample(self, key: jax.Array, index=None) -> jax.Array:
        """Posterior samples ``mean + std * eps`` of the crops ``index`` (default all)."""
        m = jnp.asarray(self.mean if index is None else self.mean[index])
        s = jnp.asarray(self.std if index is None else self.std[index])
        return m + s * jax.random.normal(key, m.shape, m.dtype)

    def scaling_factor(self, seed: int = 0) -> float:
        """1 / std of one posterior sample of every crop."""
        return scaling_factor(self.sample(jax.random.PRNGKey(seed)))

    def save(self, path) -> Path:
        """An ``.npz`` written to a temporary name and renamed, so a killed write leaves no half file."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, mean=self.mean, std=self.std, meta=np.array(json.dumps(self.meta)))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path) -> "Posteriors":
        try:
            with np.load(path, allow_pickle=False) as f:
                return cls(f["mean"], f["std"], json.loads(str(f["meta"])))
        except (OSError, KeyError, ValueError) as e:
            raise ValueError(f"{path}: not a latent posterior file ({type(e).__name__}: {e})") from e


def encode_posteriors(vae_config, params, data, augment, *, passes: int = 1, seed: int = 0, batch: int = 32,
                      meta: dict | None = None, log=print) -> Posteriors:
    """Encode ``passes`` epochs of augmented training crops of the prepared dataset ``data`` (each pass a new
    shuffle and new augmentations, from ``seed``) with the VAE's encoder; returns their posteriors.
    The last incomplete batch of the last pass is dropped."""
    from fvae_core.autoencoder import AutoencoderKL
    from fvae_core.conventions import to_model_range, unit_from_uint8
    from fvae_core.data.loader import make_iterator, train_dataset

    model = AutoencoderKL(vae_config)

    @jax.jit
    def encode(x):
        post = model.apply({"params": params}, x, method=AutoencoderKL.encode)
        return post.mean, post.std

    ds = train_dataset(data, augment, batch, seed=seed, num_epochs=passes, log=log)
    means, stds = [], []
    with make_iterator(ds) as it:
        for b in it:
            m, s = encode(jnp.asarray(to_model_range(unit_from_uint8(b["image"]))))
            means.append(np.asarray(m))
            stds.append(np.asarray(s))
    meta = dict(meta or {}, crop=augment.crop, passes=passes, seed=seed, n=batch * len(means))
    post = Posteriors(np.concatenate(means), np.concatenate(stds), meta)
    log(f"latents: encoded {len(post)} crops of {augment.crop}² into {post.mean.shape[1:]} posteriors")
    return post
