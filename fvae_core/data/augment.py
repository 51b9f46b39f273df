"""The card's augmentation, as pure functions of (image, parameters): multi-scale Lanczos crops,
rotations by k*90 degrees and horizontal flips of the pixels.

Train sample (:func:`sample_crop` then :func:`apply_crop`):

1. draw a scale ``s`` log-uniformly from ``[lo, hi]`` where ``hi = max_scale`` and
   ``lo = max(min_scale, crop / short_side)``, so the resized short side never drops below the crop;
2. resize the image to ``(round(h*s), round(w*s))`` with Lanczos-3 *with antialiasing* (Pillow's
   ``LANCZOS`` widens the kernel by the downscale factor, which is what antialiasing means);
3. take a uniformly placed ``crop x crop`` square inside the resized image;
4. rotate by ``k * 90`` degrees, ``k`` uniform in {0, 1, 2, 3};
5. flip left-right with probability 1/2 (the width axis, never the colour axis).

Steps 2 and 3 are done in one Pillow call that resamples only the crop's source box. That is the
same arithmetic as resizing the whole image and then cropping (the filter still reads pixels outside
the box), and it is what makes large photos cheap; ``tests/test_augment.py`` checks the equality.
It is exact up to Pillow's 8-bit rounding between its two separable passes, whose order Pillow picks
by cost and so may differ between the two calls: within one level on photographs, but on pixel noise,
whose Lanczos overshoot is clipped to 0..255 between the passes, tens of levels.

Validation (:func:`val_crops`) is deterministic: for each scale in ``val_scales`` whose resized short
side is at least the crop, one centre crop; no rotation, no flip.

The card authors' public loader flipped the colour axis instead of the image and drew rotations from
{0, 90, 180} only; both are tested against here (``../shared/reference/recipe.md``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import numpy as np
from PIL import Image

__all__ = ["AugmentConfig", "CropParams", "TooSmall", "apply_crop", "flip_lr", "rot90", "sample_crop",
           "scale_range", "train_sample", "val_crops", "val_params"]


class TooSmall(ValueError):
    """The image's short side is below the crop and upsampling was not asked for."""


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    crop: int = 256  # output side (pixels)
    min_scale: float = 0.25  # smallest downscale factor drawn (resized size / stored size)
    max_scale: float = 1.0  # largest; > 1 would upsample every image
    upsample_small: bool = False  # images whose short side < crop: upsample (True) or refuse (False)
    rotate: bool = True  # random k*90 degree rotations, k in {0, 1, 2, 3}
    flip: bool = True  # random left-right flips
    val_scales: tuple[float, ...] = (1.0, 0.5)  # validation: one centre crop per usable scale

    def __post_init__(self):
        if not (isinstance(self.crop, int) and self.crop >= 8):
            raise ValueError(f"crop must be an int >= 8, got {self.crop!r}")
        if not (0 < self.min_scale <= self.max_scale):
            raise ValueError(f"need 0 < min_scale <= max_scale, got {self.min_scale}, {self.max_scale}")
        if not self.val_scales or any(not (s > 0) for s in self.val_scales):
            raise ValueError(f"val_scales must be positive, got {self.val_scales!r}")
        object.__setattr__(self, "val_scales", tuple(float(s) for s in self.val_scales))

    def usable(self, height: int, width: int) -> bool:
        """Can a training crop be taken from an image of this size?"""
        return self.upsample_small or min(height, width) >= self.crop


class CropParams(NamedTuple):
    """Everything random about one training sample; :func:`apply_crop` is a pure function of it."""

    out_h: int  # resized image height
    out_w: int  # resized image width
    top: int  # crop offset in the resized image
    left: int
    k: int  # rotation, counter-clockwise quarter turns (np.rot90 convention)
    flip: bool  # left-right mirror after the rotation


def scale_range(height: int, width: int, cfg: AugmentConfig) -> tuple[float, float]:
    """``(lo, hi)`` of the scale draw for an image of this size; raises :class:`TooSmall`."""
    need = cfg.crop / min(height, width)
    if need > 1.0 and not cfg.upsample_small:
        raise TooSmall(f"{width}x{height} is smaller than the {cfg.crop}px crop")
    lo = max(cfg.min_scale, need)
    hi = max(cfg.max_scale, need)  # a small image upsampled just enough
    return lo, hi


def _resized_size(height: int, width: int, scale: float, crop: int) -> tuple[int, int]:
    return max(crop, round(height * scale)), max(crop, round(width * scale))


def sample_crop(rng: np.random.Generator, height: int, width: int, cfg: AugmentConfig) -> CropParams:
    """Draw the parameters of one training sample (see the module docstring for the distribution)."""
    lo, hi = scale_range(height, width, cfg)
    scale = math.exp(rng.uniform(math.log(lo), math.log(hi))) if hi > lo else lo
    out_h, out_w = _resized_size(height, width, scale, cfg.crop)
    top = int(rng.integers(0, out_h - cfg.crop + 1))
    left = int(rng.integers(0, out_w - cfg.crop + 1))
    k = int(rng.integers(0, 4)) if cfg.rotate else 0
    flip = bool(rng.integers(0, 2)) if cfg.flip else False
    return CropParams(out_h, out_w, top, left, k, flip)


def val_params(height: int, width: int, cfg: AugmentConfig) -> list[CropParams]:
    """The deterministic validation crops of an image: one centre crop per usable scale."""
    out = []
    for scale in cfg.val_scales:
        out_h, out_w = round(height * scale), round(width * scale)
        if min(out_h, out_w) < cfg.crop:
            continue
        out.append(CropParams(out_h, out_w, (out_h - cfg.crop) // 2, (out_w - cfg.crop) // 2, 0, False))
    return out


def rot90(img: np.ndarray, k: int) -> np.ndarray:
    """Rotate an HxWxC image by ``k`` counter-clockwise quarter turns (spatial axes only)."""
    return np.rot90(img, k=k, axes=(0, 1))


def flip_lr(img: np.ndarray) -> np.ndarray:
    """Mirror an HxWxC image left-right: the width axis, never the colour axis."""
    return img[:, ::-1, :]


def apply_crop(img: np.ndarray, p: CropParams, crop: int) -> np.ndarray:
    """Resize (Lanczos, antialiased), crop, rotate, flip: uint8 HxWx3 -> uint8 crop x crop x 3."""
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"apply_crop wants uint8 HxWx3, got {img.dtype} {img.shape}")
    h, w = img.shape[:2]
    if not (0 <= p.top <= p.out_h - crop and 0 <= p.left <= p.out_w - crop):
        raise ValueError(f"crop {crop} at ({p.top}, {p.left}) does not fit in {p.out_h}x{p.out_w}")
    if (p.out_h, p.out_w) == (h, w):
        out = img[p.top:p.top + crop, p.left:p.left + crop]
    else:
        sy, sx = h / p.out_h, w / p.out_w  # source pixels per output pixel, per axis
        box = (p.left * sx, p.top * sy, (p.left + crop) * sx, (p.top + crop) * sy)
        out = np.asarray(Image.fromarray(img).resize((crop, crop), Image.Resampling.LANCZOS, box=box))
    if p.k:
        out = rot90(out, p.k)
    if p.flip:
        out = flip_lr(out)
    return np.ascontiguousarray(out)


def train_sample(img: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """One augmented training crop of ``img`` (uint8 HxWx3)."""
    return apply_crop(img, sample_crop(rng, img.shape[0], img.shape[1], cfg), cfg.crop)


def val_crops(img: np.ndarray, cfg: AugmentConfig) -> list[np.ndarray]:
    """The deterministic validation crops of ``img`` (may be empty for a small image)."""
    return [apply_crop(img, p, cfg.crop) for p in val_params(img.shape[0], img.shape[1], cfg)]


def centre_square(img: np.ndarray, size: int) -> np.ndarray:
    """The evaluation view of an image at resolution ``size``: Lanczos-resized (antialiased) so that its
    short side is ``size``, then the centre ``size``² square. Never upsamples (raises :class:`TooSmall`)."""
    h, w = img.shape[:2]
    if min(h, w) < size:
        raise TooSmall(f"{w}x{h} is smaller than {size}px (not upsampled)")
    s = size / min(h, w)
    out_h, out_w = max(size, round(h * s)), max(size, round(w * s))
    return apply_crop(img, CropParams(out_h, out_w, (out_h - size) // 2, (out_w - size) // 2, 0, False), size)
