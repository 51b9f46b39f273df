"""Exact tiled decode and encode (fvae_core.tiling): equal to the untiled network for every architecture we
port, at odd sizes, in bands down to one row, with activations in memory or in files; and the anchors'
per-tile GroupNorm shown to be what it is not."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import PARITY_CONFIGS
from fvae_core.autoencoder import AutoencoderKL, init_params
from fvae_core.tiling import Store, TileError, tiled_decode, tiled_encode


def _decode(cfg, params, z):
    m = AutoencoderKL(cfg)
    return np.asarray(m.apply({"params": params}, z, method=m.decode))


def _moments(cfg, params, x):
    m = AutoencoderKL(cfg)

    def enc(mod, x):
        h = mod.encoder(x)
        return mod.quant_conv(h) if cfg.use_quant_conv else h

    return np.asarray(m.apply({"params": params}, x, method=enc))


@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
def test_tiled_decode_and_encode_equal_the_untiled_network(name):
    """Latents of odd size (9 x 13), shifted and scaled so that every GroupNorm's mean matters; bands of
    one row and of several, in memory and in files: within 1e-5 of the untiled decode (float32 summation
    order is the only difference)."""
    cfg = PARITY_CONFIGS[name]
    params = init_params(cfg, 1)
    rng = np.random.default_rng(0)
    z = (rng.standard_normal((2, 9, 13, cfg.latent_channels)) * 3 + 1).astype(np.float32)
    want = _decode(cfg, params, z)
    scale = float(np.abs(want).max())
    for band_bytes, ram_limit in ((1, 0), (5000, 1 << 30)):
        got = tiled_decode(cfg, params, z, band_bytes=band_bytes, ram_limit=ram_limit, attn_chunk=5)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-5 * max(scale, 1.0), (band_bytes, np.abs(got - want).max())
    f = cfg.downsample_factor
    x = np.clip(want[:, : 3 * f, : 5 * f], -1, 1)
    mom = _moments(cfg, params, x)
    got = tiled_encode(cfg, params, x, band_bytes=1, ram_limit=0, attn_chunk=3)
    assert got.shape == mom.shape and np.abs(got - mom).max() <= 1e-5 * max(float(np.abs(mom).max()), 1.0)


def test_per_band_statistics_would_not_be_exact(monkeypatch):
    """The anchor's flaw, as a control: GroupNorm statistics from each band alone (diffusers'
    ``enable_tiling`` normalises each tile by itself) change the decode by far more than the tolerance
    above, so the test above would catch it."""
    import fvae_core.tiling as T

    cfg = PARITY_CONFIGS["tiny-sd"]
    params = init_params(cfg, 1)
    z = (np.random.default_rng(0).standard_normal((1, 9, 13, cfg.latent_channels)) * 3 + 1).astype(np.float32)
    want = _decode(cfg, params, z)
    real_write = T.Store.write

    def per_band(self, r0, rows):  # forget the statistics of earlier bands: per-band normalisation
        if self.groups:
            self._shift = None
        real_write(self, r0, rows)

    monkeypatch.setattr(T.Store, "write", per_band)
    got = tiled_decode(cfg, params, z, band_bytes=5000)
    assert np.abs(got - want).max() > 1e-2


def test_store_statistics_match_numpy_and_survive_a_large_mean():
    """Whole-image group statistics from banded writes equal NumPy's over the whole array, also where the
    mean is 1e4 times the spread (a plain E[x²] - E[x]² in float32 would lose the variance)."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((7, 5, 8)) * 1e-2 + 100.0).astype(np.float32)
    s = Store(7, 5, 8, ram_limit=0, stats_groups=2)
    for r0 in range(0, 7, 3):
        s.write(r0, x[r0:r0 + 3])
    np.testing.assert_array_equal(s.read(0, 7), x)
    mean, var = s.group_stats()
    g = x.astype(np.float64).reshape(7, 5, 2, 4)
    np.testing.assert_allclose(mean, np.repeat(g.mean(axis=(0, 1, 3)), 4), rtol=1e-7)
    np.testing.assert_allclose(var, np.repeat(g.var(axis=(0, 1, 3)), 4), rtol=1e-3)
    assert s.on_disk
    s.close()


def test_bad_inputs_are_one_line_errors():
    cfg = PARITY_CONFIGS["tiny-sd"]
    params = init_params(cfg, 0)
    with pytest.raises(TileError, match="latents with 4 channels"):
        tiled_decode(cfg, params, np.zeros((1, 4, 4, 3), np.float32))
    with pytest.raises(TileError, match="multiple of"):
        tiled_encode(cfg, params, np.zeros((1, 10, 16, 3), np.float32))
    with pytest.raises(TileError, match="band_bytes"):
        tiled_decode(cfg, params, np.zeros((1, 4, 4, 4), np.float32), band_bytes=0)
