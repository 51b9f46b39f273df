"""The card's augmentation (fvae_core.data.augment) against independent oracles.

* flips and rotations: explicit index formulas, not the functions under test;
* the resize: Pillow's full-image Lanczos resize, and ``jax.image.resize(..., "lanczos3",
  antialias=True)`` as a second, independent antialiased Lanczos;
* the random parameters: their distributions over many seeded draws (chi-square, KS, bounds).

The card authors' loader had two bugs (``../shared/reference/recipe.md``): it flipped the colour axis
(``np.flip(img, 2)`` on HWC) and drew rotations with ``randint(0, 3)``, so 270 degrees never happened.
Each has an "anchor" test showing that the checker used here rejects the buggy behaviour.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
from PIL import Image

from fvae_core.data.augment import (AugmentConfig, CropParams, TooSmall, apply_crop, flip_lr, rot90, sample_crop,
                               scale_range, train_sample, val_crops, val_params)

N_DRAWS = 4000  # parameter draws for the distribution tests (cheap: no pixels are touched)


def distinct_channel_image(h: int, w: int) -> np.ndarray:
    """R = x gradient, G = y gradient, B = a diagonal pattern, in disjoint ranges (R < 64 <= G < 128
    < 160 <= B), so no two channels are equal anywhere and any channel permutation is visible."""
    assert h <= 64 and w <= 64
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x, 64 + y, 160 + (x + 2 * y) % 64], axis=-1).astype(np.uint8)


def smooth_image(h: int, w: int) -> np.ndarray:
    """Gradients plus a mild sinusoid: photo-like, no pixel noise."""
    y, x = np.mgrid[0:h, 0:w]
    tex = (np.sin(x / 7.0) * np.cos(y / 5.0) + 1) * 127.5
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), tex], axis=-1).astype(np.uint8)


def photos() -> list[np.ndarray]:
    import skimage.data

    return [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), smooth_image(300, 400)]


def same_colours(a: np.ndarray, b: np.ndarray) -> bool:
    """Do a and b hold the same multiset of RGB triples?"""
    def triples(x):
        t = x.reshape(-1, 3)
        return t[np.lexsort(t.T[::-1])]

    return a.size == b.size and np.array_equal(triples(a), triples(b))


def assert_lr_mirror(img: np.ndarray, out: np.ndarray) -> None:
    """out[y, x] == img[y, W-1-x] for every channel, and the colours (RGB triples) are unchanged."""
    h, w, _ = img.shape
    assert out.shape == img.shape, (out.shape, img.shape)
    assert same_colours(img, out), "the mirror changed the colours (a colour-axis flip?)"
    mirrored_x = w - 1 - np.arange(w)
    np.testing.assert_array_equal(out, img[:, mirrored_x, :])


# --------------------------------------------------------------------------------- flips


def test_flip_lr_mirrors_pixels_and_keeps_colours():
    img = distinct_channel_image(37, 53)
    assert_lr_mirror(img, flip_lr(img))
    assert not np.array_equal(flip_lr(img), img)


def test_anchor_colour_axis_flip_is_caught():
    """The authors' bug, ``np.flip(img, 2)`` on HWC, swaps R and B; the checker must reject it."""
    img = distinct_channel_image(37, 53)
    for buggy in (img[..., ::-1], np.flip(img, 2)):
        assert not same_colours(img, buggy)
        with pytest.raises(AssertionError):
            assert_lr_mirror(img, buggy)
    # and the checker also rejects a spatial flip followed by a colour flip
    with pytest.raises(AssertionError):
        assert_lr_mirror(img, img[:, ::-1, ::-1])


@pytest.mark.parametrize("resample", [False, True])
def test_apply_crop_flip_is_spatial(resample):
    img = distinct_channel_image(48, 40) if resample else distinct_channel_image(32, 32)
    if resample:  # through Pillow: the flipped output mirrors the unflipped one
        p = CropParams(out_h=38, out_w=32, top=3, left=0, k=0, flip=False)
        plain = apply_crop(img, p, 32)
        assert_lr_mirror(plain, apply_crop(img, p._replace(flip=True), 32))
    else:  # no resampling at all: an exact mirror of the input
        p = CropParams(out_h=32, out_w=32, top=0, left=0, k=0, flip=True)
        assert_lr_mirror(img, apply_crop(img, p, 32))


# --------------------------------------------------------------------------------- rotations


def rot_ccw_reference(img: np.ndarray, k: int) -> np.ndarray:
    """k counter-clockwise quarter turns by index formula (out[i, j] from img), independent of np.rot90."""
    h, w = img.shape[:2]
    k %= 4
    i, j = np.mgrid[0:(w if k % 2 else h), 0:(h if k % 2 else w)]
    src = {0: (i, j), 1: (j, w - 1 - i), 2: (h - 1 - i, w - 1 - j), 3: (h - 1 - j, i)}[k]
    return img[src[0], src[1]]


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_rot90_is_counter_clockwise_and_spatial(k):
    img = distinct_channel_image(23, 41)
    out = rot90(img, k)
    np.testing.assert_array_equal(out, rot_ccw_reference(img, k))
    np.testing.assert_array_equal(out, np.rot90(img, k, axes=(0, 1)))
    assert same_colours(img, out)
    if k == 1:  # the top-right corner comes to the top-left: counter-clockwise
        np.testing.assert_array_equal(out[0, 0], img[0, -1])


def test_apply_crop_really_rotates_by_270():
    img = distinct_channel_image(40, 50)
    c = 24
    base = CropParams(out_h=40, out_w=50, top=5, left=17, k=0, flip=False)  # no resampling: exact
    crop = img[5:5 + c, 17:17 + c]
    outs = {k: apply_crop(img, base._replace(k=k), c) for k in range(4)}
    np.testing.assert_array_equal(outs[3], np.rot90(crop, 3))
    np.testing.assert_array_equal(outs[3], rot_ccw_reference(crop, 3))
    for k in range(3):
        assert not np.array_equal(outs[3], outs[k]), k
    # the flip comes after the rotation
    np.testing.assert_array_equal(apply_crop(img, base._replace(k=3, flip=True), c),
                                  np.rot90(crop, 3)[:, ::-1])


def check_rotation_coverage(ks) -> None:
    """Every k in {0, 1, 2, 3} occurs, with frequencies consistent with uniform (chi-square)."""
    ks = np.asarray(ks)
    counts = np.bincount(ks, minlength=4)
    assert len(counts) == 4 and set(np.unique(ks)) == {0, 1, 2, 3}, f"rotation counts {counts}"
    p = scipy.stats.chisquare(counts).pvalue
    assert p > 1e-3, f"rotation counts {counts} are not uniform (p={p:.2g})"


def test_all_four_rotations_are_drawn_uniformly():
    rng = np.random.default_rng(0)
    cfg = AugmentConfig(crop=64)
    ks = [sample_crop(rng, 300, 200, cfg).k for _ in range(N_DRAWS)]
    check_rotation_coverage(ks)


def test_anchor_rotation_sampler_without_270_is_caught():
    """The authors drew k with ``randint(0, 3)``: 0, 1, 2 only."""
    rng = np.random.default_rng(0)
    with pytest.raises(AssertionError):
        check_rotation_coverage(rng.integers(0, 3, N_DRAWS))


def test_flips_happen_about_half_the_time_and_switches_work():
    rng = np.random.default_rng(1)
    cfg = AugmentConfig(crop=64)
    flips = np.array([sample_crop(rng, 300, 200, cfg).flip for _ in range(N_DRAWS)])
    assert 0.45 < flips.mean() < 0.55  # sd 0.008
    off = AugmentConfig(crop=64, rotate=False, flip=False)
    draws = [sample_crop(rng, 300, 200, off) for _ in range(200)]
    assert all(p.k == 0 and p.flip is False for p in draws)


# --------------------------------------------------------------------------------- crop and scale


def test_crop_is_square_inside_and_scale_in_range():
    rng = np.random.default_rng(2)
    for _ in range(1500):
        crop = int(rng.choice([8, 32, 256]))
        lo_cfg = float(rng.uniform(0.05, 1.0))
        cfg = AugmentConfig(crop=crop, min_scale=lo_cfg, max_scale=float(rng.uniform(lo_cfg, 1.5)))
        h, w = (int(v) for v in rng.integers(crop, 4000, 2))
        p = sample_crop(rng, h, w, cfg)
        assert 0 <= p.top <= p.out_h - crop and 0 <= p.left <= p.out_w - crop, (p, h, w, cfg)
        assert min(p.out_h, p.out_w) >= crop
        # the scale: at least the configured minimum and enough for the crop, at most the maximum
        lo, hi = max(cfg.min_scale, crop / min(h, w)), max(cfg.max_scale, crop / min(h, w))
        assert scale_range(h, w, cfg) == pytest.approx((lo, hi))
        for out, size in ((p.out_h, h), (p.out_w, w)):
            tol = 0.5 / size + 1e-9  # rounding to whole pixels
            assert lo - tol <= out / size <= hi + tol, (p, h, w, cfg)
        assert abs(p.out_h / h - p.out_w / w) <= 0.5 / h + 0.5 / w + 1e-9  # aspect kept


def check_log_uniform(scales, lo, hi) -> None:
    """The mean of log(scale) is the midpoint of [log lo, log hi], and the logs pass a KS test."""
    logs = np.log(np.asarray(scales))
    a, b = math.log(lo), math.log(hi)
    se = (b - a) / math.sqrt(12 * len(logs))
    assert abs(logs.mean() - (a + b) / 2) < 5 * se, (logs.mean(), (a + b) / 2)
    assert scipy.stats.kstest(logs, scipy.stats.uniform(a, b - a).cdf).pvalue > 1e-3


def test_scale_is_log_uniform():
    rng = np.random.default_rng(3)
    cfg = AugmentConfig(crop=256, min_scale=0.1, max_scale=1.0)
    h, w = 4000, 3000  # large, so that rounding to pixels barely moves the scale
    scales = [sample_crop(rng, h, w, cfg).out_h / h for _ in range(N_DRAWS)]
    check_log_uniform(scales, 0.1, 1.0)
    with pytest.raises(AssertionError):  # a linear-uniform scale would fail the same check
        check_log_uniform(rng.uniform(0.1, 1.0, N_DRAWS), 0.1, 1.0)


# --------------------------------------------------------------------------------- the resize


def test_box_resize_equals_pillow_full_resize_then_crop():
    """apply_crop resamples only the crop's box; that equals resizing the whole image (Pillow Lanczos)
    and cropping, up to the 8-bit rounding between Pillow's two passes. (On pixel noise the two can
    differ by tens of levels; see the augment module docstring. Photos are what matters.)"""
    rng = np.random.default_rng(4)
    cfg = AugmentConfig(crop=64, min_scale=0.1)
    n_pixels = n_off = 0
    for img in photos():
        h, w = img.shape[:2]
        for _ in range(8):
            p = sample_crop(rng, h, w, cfg)
            got = apply_crop(img, p, cfg.crop).astype(int)
            full = np.asarray(Image.fromarray(img).resize((p.out_w, p.out_h), Image.Resampling.LANCZOS))
            want = np.rot90(full[p.top:p.top + cfg.crop, p.left:p.left + cfg.crop], p.k)
            want = (want[:, ::-1] if p.flip else want).astype(int)
            diff = np.abs(got - want)
            assert diff.max() <= 1, (img.shape, p, diff.max())
            n_pixels, n_off = n_pixels + diff.size, n_off + int((diff > 0).sum())
    assert n_off / n_pixels < 0.01, n_off / n_pixels


def full_resize(img: np.ndarray, n: int) -> np.ndarray:
    """apply_crop with the crop covering the whole (square) resized image."""
    return apply_crop(img, CropParams(n, n, 0, 0, 0, False), n)


def jax_lanczos(img: np.ndarray, n: int, antialias: bool) -> np.ndarray:
    import jax
    import jax.numpy as jnp

    out = jax.image.resize(jnp.asarray(img, jnp.float32), (n, n, img.shape[2]), "lanczos3", antialias=antialias)
    return np.asarray(out, np.float64)


@pytest.mark.parametrize("n", [64, 121])
def test_resize_is_antialiased_lanczos_like_jax(n):
    """jax.image.resize(lanczos3, antialias=True) is an independent antialiased Lanczos-3: the
    interior agrees within a few levels, while the non-antialiased resize is far off."""
    import skimage.data

    img = skimage.data.astronaut()[:450, :450]
    got = full_resize(img, n).astype(np.float64)
    m = 8  # away from the borders, where the two normalise the clipped kernel alike but not exactly
    aa = np.abs(got - np.clip(np.round(jax_lanczos(img, n, True)), 0, 255))[m:-m, m:-m]
    no_aa = np.abs(got - np.clip(np.round(jax_lanczos(img, n, False)), 0, 255))[m:-m, m:-m]
    assert aa.max() <= 8 and aa.mean() < 0.5 and np.percentile(aa, 99) <= 2, (aa.max(), aa.mean())
    assert no_aa.mean() > 2.0 and no_aa.mean() > 10 * aa.mean(), (no_aa.mean(), aa.mean())


def test_checkerboard_downscale_is_flat_grey():
    """A 1-px checkerboard downscaled 3.7x has no representable detail: an antialiased resize gives
    flat grey, a non-antialiased one aliases into strong patterns."""
    y, x = np.mgrid[0:111, 0:111]
    board = np.repeat((((x + y) % 2) * 255).astype(np.uint8)[..., None], 3, axis=-1)
    got = full_resize(board, 30).astype(np.float64)[3:-3, 3:-3]
    assert got.std() < 2 and abs(got.mean() - 127.5) < 3, (got.mean(), got.std())
    jax_aa = jax_lanczos(board, 30, True)[3:-3, 3:-3]
    assert jax_aa.std() < 2 and abs(jax_aa.mean() - 127.5) < 3
    jax_no_aa = jax_lanczos(board, 30, False)[3:-3, 3:-3]
    assert jax_no_aa.std() > 20, jax_no_aa.std()  # what the check rejects


# --------------------------------------------------------------------------------- small images


def test_small_image_is_refused_unless_upsampling():
    cfg = AugmentConfig(crop=128)
    assert not cfg.usable(100, 200) and cfg.usable(128, 128)
    for h, w in ((100, 200), (300, 127)):  # one pixel short is too small as well
        with pytest.raises(TooSmall):
            scale_range(h, w, cfg)
    with pytest.raises(TooSmall):
        sample_crop(np.random.default_rng(0), 200, 100, cfg)
    with pytest.raises(TooSmall):
        train_sample(np.zeros((100, 200, 3), np.uint8), np.random.default_rng(0), cfg)
    assert scale_range(128, 300, cfg) == (pytest.approx(1.0), pytest.approx(1.0))  # exactly the crop: fine


def test_small_image_is_upsampled_to_the_crop():
    cfg = AugmentConfig(crop=128, upsample_small=True)
    assert cfg.usable(100, 200)
    assert scale_range(100, 200, cfg) == (pytest.approx(1.28), pytest.approx(1.28))
    rng = np.random.default_rng(5)
    img = smooth_image(100, 200)
    for _ in range(50):
        p = sample_crop(rng, 100, 200, cfg)
        assert (p.out_h, p.out_w) == (128, 256)  # scale = crop / short side
        assert 0 <= p.left <= 128 and p.top == 0
    out = train_sample(img, rng, cfg)
    assert out.shape == (128, 128, 3) and out.dtype == np.uint8


# --------------------------------------------------------------------------------- validation


def test_val_params_are_centre_crops_at_usable_scales():
    cfg = AugmentConfig(crop=128, val_scales=(1.0, 0.5, 0.25))
    ps = val_params(300, 500, cfg)
    # 0.25 gives 75x125, smaller than the crop: skipped
    assert ps == [CropParams(300, 500, 86, 186, 0, False), CropParams(150, 250, 11, 61, 0, False)]
    assert val_params(300, 500, cfg) == ps  # deterministic
    assert val_params(100, 500, cfg) == []
    # default 256 crop at (1.0, 0.5): one crop for a 300 px short side, two from 512 up
    d = AugmentConfig()
    assert len(val_params(300, 400, d)) == 1 and len(val_params(512, 700, d)) == 2


def test_val_crops_are_centre_crops_without_rotation_or_flip():
    import skimage.data

    img = skimage.data.astronaut()[:300, :500]
    cfg = AugmentConfig(crop=128, val_scales=(1.0, 0.5, 0.25))
    crops = val_crops(img, cfg)
    assert len(crops) == 2 and all(c.shape == (128, 128, 3) and c.dtype == np.uint8 for c in crops)
    np.testing.assert_array_equal(crops[0], img[86:214, 186:314])  # scale 1: an exact slice
    half = np.asarray(Image.fromarray(img).resize((250, 150), Image.Resampling.LANCZOS)).astype(int)
    assert np.abs(crops[1].astype(int) - half[11:139, 61:189]).max() <= 1
    again = val_crops(img, cfg)
    assert all(np.array_equal(a, b) for a, b in zip(crops, again))
    assert val_crops(img[:100], cfg) == []


# --------------------------------------------------------------------------------- validation of inputs


@pytest.mark.parametrize("kwargs", [
    dict(crop=4), dict(crop=7), dict(crop=64.0), dict(min_scale=0.8, max_scale=0.5), dict(min_scale=0.0),
    dict(min_scale=-0.1), dict(val_scales=()), dict(val_scales=(1.0, 0.0)), dict(val_scales=(-0.5,)),
    dict(val_scales=(float("nan"),)),
])
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        AugmentConfig(**kwargs)


def test_config_accepts_edge_values():
    AugmentConfig(crop=8, min_scale=0.5, max_scale=0.5, val_scales=[1])


@pytest.mark.parametrize("img", [
    np.zeros((32, 32, 3), np.float32), np.zeros((32, 32, 3), np.uint16), np.zeros((32, 32), np.uint8),
    np.zeros((32, 32, 4), np.uint8), np.zeros((32, 32, 1), np.uint8), np.zeros((2, 32, 32, 3), np.uint8),
], ids=["float32", "uint16", "grey2d", "rgba", "one-channel", "batched"])
def test_apply_crop_rejects_wrong_input(img):
    with pytest.raises(ValueError):
        apply_crop(img, CropParams(32, 32, 0, 0, 0, False), 16)


@pytest.mark.parametrize("p", [
    CropParams(32, 32, 17, 0, 0, False), CropParams(32, 32, 0, 17, 0, False), CropParams(32, 32, -1, 0, 0, False),
    CropParams(32, 32, 0, -1, 0, False), CropParams(12, 40, 0, 0, 0, False), CropParams(40, 12, 0, 0, 0, False),
])
def test_apply_crop_rejects_a_crop_that_does_not_fit(p):
    with pytest.raises(ValueError, match="does not fit"):
        apply_crop(np.zeros((32, 32, 3), np.uint8), p, 16)


def test_train_sample_is_a_pure_function_of_the_rng():
    img = smooth_image(200, 300)
    cfg = AugmentConfig(crop=64)
    a = [train_sample(img, np.random.default_rng(7), cfg) for _ in range(2)]
    b = train_sample(img, np.random.default_rng(8), cfg)
    assert a[0].shape == (64, 64, 3) and a[0].dtype == np.uint8 and a[0].flags.c_contiguous
    np.testing.assert_array_equal(a[0], a[1])
    assert not np.array_equal(a[0], b)


def test_centre_square_is_the_centre_of_the_short_side_resize():
    """Evaluation views: Pillow's full-image Lanczos resize to short side r, then the centre r² crop."""
    from PIL import Image

    from fvae_core.data.augment import TooSmall, centre_square

    rng = np.random.default_rng(3)
    img = (rng.random((90, 150, 3)) * 255).astype(np.uint8)
    got = centre_square(img, 48)
    full = np.asarray(Image.fromarray(img).resize((80, 48), Image.Resampling.LANCZOS))
    want = full[:, 16:64]
    assert got.shape == (48, 48, 3)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert np.array_equal(centre_square(img, 90), img[:, 30:120])  # no resize at native short side
    with pytest.raises(TooSmall, match="not upsampled"):
        centre_square(img, 91)
