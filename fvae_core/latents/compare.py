"""How close generated latents are to real ones (issue 28): per-channel moments of the latents, and the
power spectrum of their decodes against the real images'.

* :func:`channel_moments`: mean and std per latent channel, of generated and of real latents (VAE posterior
  samples of the training crops), and the gaps: ``std_ratio`` (generated / real) and the mean difference in
  units of the real std.
* :func:`decode_spectrum_gap`: the power of the decodes' Oklab lightness per frequency band, in dB against
  the mean of real images of the same size (:func:`fvae_core.reference_free.band_power_db`), averaged over
  the decodes. Put the decodes of *real* latents beside it: that is what the VAE itself does to the
  spectrum, so the generated-minus-real-latent gap is the generator's own.
"""
from __future__ import annotations

import numpy as np

from fvae_core.reference_free import BANDS, band_power_db, lightness


def channel_moments(generated, real) -> dict:
    """Per-channel moments of ``generated`` and ``real`` latents (``(..., C)``, unscaled) and their gaps."""
    g = np.asarray(generated, np.float64).reshape(-1, np.shape(generated)[-1])
    r = np.asarray(real, np.float64).reshape(-1, np.shape(real)[-1])
    if g.shape[1] != r.shape[1] or not len(g) or not len(r):
        raise ValueError(f"channel_moments: need latents with the same channels, got {np.shape(generated)} "
                         f"and {np.shape(real)}")
    gm, gs, rm, rs = g.mean(0), g.std(0), r.mean(0), r.std(0)
    return {"mean_generated": gm.tolist(), "mean_real": rm.tolist(), "std_generated": gs.tolist(),
            "std_real": rs.tolist(), "std_ratio": (gs / rs).tolist(),
            "mean_gap_in_real_std": ((gm - rm) / rs).tolist()}


def decode_spectrum_gap(decodes01, images01, bands=BANDS) -> dict:
    """Mean band power (dB) of ``decodes01`` against the mean of ``images01`` (RGB, [0, 1], same size), per
    band of :data:`fvae_core.reference_free.BANDS`, with the spread (std) over the decodes."""
    db = band_power_db(lightness(decodes01), lightness(images01), bands)
    names = [f"{lo:.4g}-{hi:.4g}" for lo, hi in bands]
    return {"bands_cycles_per_px": names, "mean_db": db.mean(0).tolist(), "std_db": db.std(0).tolist(),
            "n": len(db)}
