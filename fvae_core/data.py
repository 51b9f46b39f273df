"""Data sources. For now: the colour photographs that scikit-image ships offline.

The data issue extends this module with user folders, OpenMoji flat art, shards and augmentation.
"""
from __future__ import annotations

import numpy as np

#: Colour photographs bundled with scikit-image (no download needed). stereo_motorcycle is a
#: (left, right, disparity) tuple; we use the left view.
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
                  "immunohistochemistry", "retina", "stereo_motorcycle")


def skimage_photo(name: str) -> np.ndarray:
    """One bundled photograph as uint8 HxWx3 sRGB."""
    import skimage.data

    if name not in SKIMAGE_PHOTOS:
        raise ValueError(f"unknown bundled photo {name!r}; choose from {', '.join(SKIMAGE_PHOTOS)}")
    img = getattr(skimage.data, name)()
    if name == "stereo_motorcycle":
        img = img[0]
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"bundled photo {name} is not 8-bit RGB: {img.dtype} {img.shape}")
    return img
