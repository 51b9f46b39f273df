"""Data: from image sources to augmented training batches, in four steps, one module each.

* :mod:`~fvae_core.data.sources` - what can be read: a folder or file, the bundled OpenMoji flat art
  (``openmoji``), photographs (``photos``) and paintings (``painterly``) from installed packages
  (:mod:`~fvae_core.data.packaged`, with each image's licence and origin); content hashes.
* :mod:`~fvae_core.data.prepare` - ``fvae data prepare``: decode once to 8-bit sRGB, write ArrayRecord
  shards, a manifest and a report, with a content-hash validation split.
* :mod:`~fvae_core.data.augment` - the card's augmentation as pure functions: multi-scale Lanczos
  crops, rot90 with k in {0, 1, 2, 3}, horizontal flips of the pixels; validation centre crops.
* :mod:`~fvae_core.data.loader` - grain pipelines over a prepared folder: deterministic, multi-worker,
  sharded per process, resumable at an exact batch.

The names most callers need are re-exported here.
"""
from fvae_core.data.sources import (BUILTIN_SOURCES, OPENMOJI_ATTRIBUTION, SKIMAGE_PHOTOS, SourceError,
                                    SourceItem, openmoji_svgs, render_svg, resolve_sources, skimage_photo)

__all__ = ["BUILTIN_SOURCES", "OPENMOJI_ATTRIBUTION", "SKIMAGE_PHOTOS", "SourceError", "SourceItem",
           "openmoji_svgs", "render_svg", "resolve_sources", "skimage_photo"]
