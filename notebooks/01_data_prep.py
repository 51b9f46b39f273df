# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · Data: flat art vs photos, the card's augmentation, and what `prepare` skips
#
# The Furception card says its effects are "far more apparent on flat-colored images than they are on
# realistic or painterly images". This notebook looks at the two kinds of images fvae ships with and
# at how they reach the trainer:
#
# 1. **Sources**: the bundled OpenMoji flat art (`openmoji`) and scikit-image photographs (`photos`),
#    plus a folder of your own (`DATA`).
# 2. **Statistics**: sizes, and how *flat* each kind is: distinct colours, Oklab chroma and lightness,
#    and the share of flat-region pixels (`fvae_core.edges.edge_masks` on Oklab L).
# 3. **Augmentation**: the card's "random square crops at various levels of downscales (Lanczos with
#    antialiasing), randomly rotated and flipped", made visible with `fvae_core.data.augment`, with
#    checks against the two augmentation bugs of the authors' public loader.
# 4. **`prepare`'s report** on a folder with broken files, and (full mode) on the real bundled set.
#
# Flat art: *All emojis designed by OpenMoji – the open-source emoji and icon project.
# License: CC BY-SA 4.0* (https://creativecommons.org/licenses/by-sa/4.0/). The photographs are the
# colour images bundled with scikit-image.

# %% tags=["parameters"]
SMOKE = None     # None: from FVAE_SMOKE (1 = the tiny smoke mode the tests run)
SEED = 0
RUN_ROOT = None  # None: runs/suite (FVAE_RUN_ROOT overrides)
FIG_DIR = None   # None: figures/ (FVAE_FIG_DIR overrides)
DATA = None  # a folder of your own images to include, or None

# %%
from fvae_core import suite; S = suite.settings(SMOKE, SEED, RUN_ROOT, FIG_DIR)

# %%
# %matplotlib inline
import collections
import re
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Image, Markdown, display

from fvae_core import data, images, metrics, teaching
from fvae_core.data import augment
from fvae_core.data.prepare import PrepareConfig, prepare
from fvae_core.edges import edge_masks
from fvae_core.plotting import metric_table_markdown


def show(fig, name):
    """Save through the one figure helper and show the saved PNG inline."""
    display(Image(filename=str(S.fig(fig, name))))


N_FLAT = 6 if S.smoke else 48          # OpenMoji images drawn for the statistics
N_PHOTO = 4 if S.smoke else len(data.SKIMAGE_PHOTOS)
SIZE = 128 if S.smoke else 256         # every image is compared at this resolution
rng = np.random.default_rng(S.seed)
print(f"smoke={S.smoke}: {N_FLAT} OpenMoji, {N_PHOTO} photos at {SIZE}², figures -> {S.fig_dir}")

# %% [markdown]
# ## 1. The sources
#
# `openmoji` is 4,495 SVGs (flat colour, dark outlines: the card's domain), rendered with resvg at any
# size over white. `photos` are scikit-image's colour photographs, of various sizes. To compare the
# kinds fairly, every image is viewed the way `fvae eval` views it: its short side Lanczos-resized to
# `SIZE`, then the centre square (`augment.centre_square`; never upsampled).

# %%
svgs = data.openmoji_svgs()
picked = sorted(rng.choice(len(svgs), N_FLAT, replace=False))
flat = {svgs[i].stem: data.render_svg(svgs[i].read_bytes(), SIZE).rgb for i in picked}
photo_src = {n: data.skimage_photo(n) for n in data.SKIMAGE_PHOTOS[:N_PHOTO]}
photos = {n: augment.centre_square(img, SIZE) for n, img in photo_src.items()}
own_src = {p.stem: images.load_rgb(p) for p in images.find_images(DATA)[:16]} if DATA else {}
own = {n: augment.centre_square(img, SIZE) for n, img in own_src.items() if min(img.shape[:2]) >= SIZE}
kinds = {"flat art (OpenMoji)": flat, "photos (skimage)": photos} | ({"your images": own} if own else {})
print({k: len(v) for k, v in kinds.items()}, f"of {len(svgs)} SVGs")

# %%
for k, v in kinds.items():
    for name, img in v.items():
        assert img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8, (k, name, img.shape)
assert len(flat) == N_FLAT and len(photos) == N_PHOTO

# %%
cols = min(8, max(len(v) for v in kinds.values()))
fig, axes = plt.subplots(len(kinds), cols, figsize=(1.8 * cols, 2.1 * len(kinds)), squeeze=False)
for row, (kind, imgs) in zip(axes, kinds.items()):
    for ax, (name, img) in zip(row, list(imgs.items())[::max(1, len(imgs) // cols)]):  # spread over the draw
        ax.imshow(img)
        ax.set_title(name if len(name) <= 16 else name[:15] + "…", fontsize=8)
    row[0].set_ylabel(kind, fontsize=9)
    for ax in row:
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_frame_on(bool(ax.images))
fig.suptitle(f"Samples at {SIZE}² (centre view). " + data.OPENMOJI_ATTRIBUTION, fontsize=7, wrap=True)
show(fig, "01_samples")

# %% [markdown]
# Both kinds at the same resolution: the emoji are a handful of flat fills with black outlines over a
# white background; the photographs have texture, gradients and sensor noise everywhere.
#
# ## 2. Statistics
#
# **Sizes.** OpenMoji has no pixel size: it is rendered at whatever size is asked for (`prepare` uses
# `render_size=512` by default). The photographs have their own sizes; `prepare` skips anything whose
# short side is below `min_side = 256` (the training crop) rather than upsample it.

# %%
rows = [{"source": "photos", "name": n, "w": im.shape[1], "h": im.shape[0], "mp": im.shape[0] * im.shape[1] / 1e6}
        for n, im in photo_src.items()]
rows += [{"source": "yours", "name": n, "w": im.shape[1], "h": im.shape[0], "mp": im.shape[0] * im.shape[1] / 1e6}
         for n, im in own_src.items()]
rows.append({"source": "openmoji", "name": f"{len(svgs)} SVGs", "w": "any", "h": "any", "mp": None})
display(Markdown(metric_table_markdown(rows, [("source", "source"), ("name", "image"), ("w", "width"),
                                              ("h", "height"), ("mp", "megapixels")], digits=2)))

# %%
assert all(min(r["w"], r["h"]) >= PrepareConfig().min_side for r in rows if r["source"] == "photos")

# %% [markdown]
# **How flat is flat?** Per image (at `SIZE`²): the number of distinct RGB triplets, the share of
# *flat* pixels, and the Oklab chroma $C = \sqrt{a^2 + b^2}$ and lightness $L$ of every pixel.
# A pixel is flat (`edges.edge_masks` on Oklab L, the mask `fvae eval` uses for "flat-region noise")
# when it is more than 8 px from every Canny edge **and** the standard deviation of L over its 7×7
# neighbourhood is below 0.01. On flat pixels any reconstruction noise is visible at once; that is where
# the card claims its VAE helps.

# %%
stats = {k: [teaching.colour_stats(img) for img in v.values()] for k, v in kinds.items()}
lab = {k: metrics.oklab_np(np.stack(list(v.values()))).reshape(-1, 3) for k, v in kinds.items()}
median = {k: {m: np.median([s[m] for s in st]) for m in st[0]} for k, st in stats.items()}
for m in median.values():
    m["distinct_colours"] = int(m["distinct_colours"])
display(Markdown(metric_table_markdown(
    [{"kind": k, **m} for k, m in median.items()],
    [("kind", "kind (median per image)"), ("distinct_colours", "distinct colours"), ("flat_fraction", "flat fraction"),
     ("edge_fraction", "edge fraction"), ("mean_chroma", "mean chroma"), ("mean_lightness", "mean L")])))

# %%
F, P = median["flat art (OpenMoji)"], median["photos (skimage)"]
assert F["distinct_colours"] < 0.2 * P["distinct_colours"], (F, P)  # far fewer colours
assert F["flat_fraction"] > P["flat_fraction"] + 0.2, (F, P)        # a much larger flat share
print(f"flat art: {F['distinct_colours']:.0f} colours, {F['flat_fraction']:.0%} flat; "
      f"photos: {P['distinct_colours']:.0f} colours, {P['flat_fraction']:.0%} flat")

# %%
colours = dict(zip(kinds, ["tab:orange", "tab:blue", "tab:green"]))
fig, ax = plt.subplots(2, 2, figsize=(10, 7))
for i, (k, st) in enumerate(stats.items()):
    jitter = i + rng.uniform(-0.15, 0.15, len(st))
    ax[0, 0].scatter(jitter, [s["distinct_colours"] for s in st], color=colours[k], label=k, alpha=0.7)
    ax[0, 1].scatter(jitter, [s["flat_fraction"] for s in st], color=colours[k], label=k, alpha=0.7)
    chroma = np.hypot(lab[k][:, 1], lab[k][:, 2])
    ax[1, 0].hist(chroma, bins=np.linspace(0, 0.3, 61), density=True, histtype="step", lw=2, color=colours[k], label=k)
    ax[1, 1].hist(lab[k][:, 0], bins=np.linspace(0, 1, 101), density=True, histtype="step", lw=2, color=colours[k], label=k)
for a in ax[0]:
    a.set_xticks(range(len(kinds)), [k.split(" (")[0] for k in kinds])
ax[0, 0].set(yscale="log", ylabel="distinct RGB colours per image", title=f"Distinct colours ({SIZE}² view)")
ax[0, 1].set(ylim=(-0.02, 1.02), ylabel="share of flat pixels", title="Flat region (edges.edge_masks on Oklab L)")
ax[1, 0].set(yscale="log", xlabel="Oklab chroma C = √(a²+b²)", ylabel="density (log)", title="Chroma of all pixels")
ax[1, 1].set(yscale="log", xlabel="Oklab lightness L", ylabel="density (log)", title="Lightness of all pixels")
ax[1, 1].legend(fontsize=8)
fig.tight_layout()
show(fig, "01_stats")

# %%
fl_name, ph_name = next(iter(flat)), next(iter(photos))
fig, ax = plt.subplots(1, 4, figsize=(11, 3))
for j, (name, img) in enumerate([(fl_name, flat[fl_name]), (ph_name, photos[ph_name])]):
    m = edge_masks(metrics.oklab_np(img)[..., 0])
    ax[2 * j].imshow(img), ax[2 * j].set_title(name, fontsize=9)
    ax[2 * j + 1].imshow(m.flat, cmap="gray", vmin=0, vmax=1)
    ax[2 * j + 1].contour(m.edges, levels=[0.5], colors="red", linewidths=0.5)
    ax[2 * j + 1].set_title(f"flat (white) {m.flat.mean():.0%}, Canny edges red", fontsize=9)
for a in ax:
    a.set_xticks([]), a.set_yticks([])
show(fig, "01_flat_masks")

# %% [markdown]
# **Reading.** The flat art has one to two orders of magnitude fewer distinct colours than the photos
# (the few hundred it has are mostly antialiased outline pixels), its chroma histogram is a set of
# spikes (the palette) instead of a smooth hump, and most of its pixels are flat – partly white
# background, partly the fills. The photos' flat share is small: sky, smooth backgrounds. So a pixel
# loss on flat art is dominated by flat regions and a few strong edges, exactly where MAE vs MSE and
# ringing matter most (notebook 02).
#
# ## 3. The card's augmentation
#
# One training sample (`augment.sample_crop` then `augment.apply_crop`, config `AugmentConfig()`):
#
# 1. a scale $s$ drawn **log-uniformly** from $[\,\max(s_{\min}, \text{crop}/\text{short side}),\ s_{\max}]$
#    $= [\max(0.25,\ 256/\text{short}),\ 1]$, so the resized image is never smaller than the crop and
#    never upsampled;
# 2. a Lanczos-3 resize *with antialiasing* (Pillow widens the kernel by the downscale factor) and a
#    uniformly placed 256² crop (done in one Pillow call on the crop's source box);
# 3. a rotation by $k \cdot 90°$ with $k$ uniform in $\{0, 1, 2, 3\}$;
# 4. a left-right flip of the **pixels** with probability ½.
#
# The authors' public loader had two bugs here: `randint(0, 3)` (never 270°) and `np.flip(img, 2)` on
# an HWC image, which reverses the *colour channels* (RGB → BGR) and leaves the pixels where they are.
# The unicorn below is rendered at 1024² so the whole scale range is available.

# %%
cfg = augment.AugmentConfig()
uni = data.render_svg((svgs[0].parent / "1F984.svg").read_bytes(), 1024).rgb
lo, hi = augment.scale_range(*uni.shape[:2], cfg)


def centre_params(img, s, k=0, flip=False):
    h, w = round(img.shape[0] * s), round(img.shape[1] * s)
    return augment.CropParams(h, w, (h - cfg.crop) // 2, (w - cfg.crop) // 2, k, flip)


scales = np.geomspace(lo, hi, 4)
at_scale = [augment.apply_crop(uni, centre_params(uni, s), cfg.crop) for s in scales]
base_p = centre_params(uni, 0.4)._replace(top=60)
base = augment.apply_crop(uni, base_p, cfg.crop)
rotated = [augment.apply_crop(uni, base_p._replace(k=k), cfg.crop) for k in range(4)]
print(f"scale range for a {uni.shape[1]}x{uni.shape[0]} image: [{lo}, {hi}]; for chelsea "
      f"{photo_src['chelsea'].shape[1]}x{photo_src['chelsea'].shape[0]}: {augment.scale_range(*photo_src['chelsea'].shape[:2], cfg)}")

# %%
x = base
assert np.array_equal(augment.rot90(x, 3), np.rot90(x, 3))                  # 270° = three CCW quarter turns
assert np.array_equal(rotated[3], np.rot90(rotated[0], 3))                  # apply_crop really rotates by 270°
assert np.array_equal(augment.flip_lr(x)[..., 0], x[:, ::-1, 0])            # the pixels are mirrored ...
assert np.array_equal(augment.flip_lr(x)[:, ::-1], x)                      # ... and nothing else changes
assert not np.array_equal(np.flip(x, 2)[..., 0], x[:, ::-1, 0])             # the anchor's flip is not that:
assert np.array_equal(np.flip(x, 2)[..., 0], x[..., 2])                     # it swaps R and B
assert (lo, hi) == (0.25, 1.0) and augment.scale_range(300, 451, cfg) == (256 / 300, 1.0)
assert all(im.shape == (cfg.crop, cfg.crop, 3) for im in at_scale + rotated)

# %%
draws = [augment.sample_crop(rng, *uni.shape[:2], cfg) for _ in range(400 if S.smoke else 4000)]
drawn_s = np.array([p.out_h / uni.shape[0] for p in draws])
k_freq = np.bincount([p.k for p in draws], minlength=4) / len(draws)
flip_freq = np.mean([p.flip for p in draws])
assert drawn_s.min() >= lo - 1 / 1024 and drawn_s.max() <= hi + 1 / 1024      # within the scale range
assert set(p.k for p in draws) == {0, 1, 2, 3} and np.all(np.abs(k_freq - 0.25) < 0.07)  # 270° is drawn
assert abs(flip_freq - 0.5) < 0.08
print(f"k frequencies {np.round(k_freq, 3)}, flip frequency {flip_freq:.3f}, scale in [{drawn_s.min():.3f}, {drawn_s.max():.3f}]")

# %%
fig, ax = plt.subplots(3, 4, figsize=(11, 8.6))
for a, s, im in zip(ax[0], scales, at_scale):
    a.imshow(im), a.set_title(f"scale {s:.2f} (resized to {round(1024 * s)}²)", fontsize=9)
for a, k, im in zip(ax[1], range(4), rotated):
    a.imshow(im), a.set_title(f"rot90 k={k} ({90 * k}°)", fontsize=9)
last = [(base, "crop (k=0, no flip)"), (augment.flip_lr(base), "flip_lr: pixels mirrored"),
        (np.flip(base, 2), "anchor bug np.flip(img, 2): R↔B"),
        (augment.train_sample(uni, np.random.default_rng(S.seed + 1), cfg), "a random train sample")]
for a, (im, t) in zip(ax[2], last):
    a.imshow(im), a.set_title(t, fontsize=9)
for a in ax.flat:
    a.set_xticks([]), a.set_yticks([])
for a, t in zip(ax[:, 0], ["Lanczos downscales\n(centre crops)", "rotations", "flips"]):
    a.set_ylabel(t)
fig.suptitle(f"The card's augmentation, {cfg.crop}² crops from a 1024² render (OpenMoji 1F984, CC BY-SA 4.0)")
show(fig, "01_augment")

# %%
fig, ax = plt.subplots(1, 2, figsize=(10, 3.2))
ax[0].hist(np.log2(drawn_s), bins=20, range=(np.log2(lo), np.log2(hi)), color="tab:blue")
ax[0].set(xlabel="log₂ scale", ylabel="draws", title=f"{len(draws)} scale draws: log-uniform in [{lo}, {hi}]")
ax[1].bar(range(4), k_freq, color="tab:orange"), ax[1].axhline(0.25, color="k", ls="--", lw=1, label="1/4")
ax[1].set(xticks=range(4), xticklabels=["0°", "90°", "180°", "270°"], ylabel="frequency", title="rotation k (270° included)")
ax[1].set_ylim(0, 0.33), ax[1].legend(loc="upper right")
show(fig, "01_augment_draws")

# %% [markdown]
# **Reading.** Going down in scale trades detail for context: at $s=1$ a 256² crop is a close-up of the
# outline at full line width; at $s=0.25$ it is the whole emoji with thin, antialiased lines. Each of
# the four rotations appears, 270° included, and a flip mirrors the unicorn while its colours stay put.
# The anchor's `np.flip(img, 2)` turns the red mane blue instead: the network would have learned to
# reconstruct BGR images half of the time. `tests/test_augment.py` makes both bugs impossible
# (`test_anchor_colour_axis_flip_is_caught`, `test_anchor_rotation_sampler_without_270_is_caught`).
#
# ## 4. What `prepare` keeps and skips
#
# `fvae data prepare` (`fvae_core.data.prepare.prepare`) decodes every source once into 8-bit sRGB
# shards and writes a report. A real folder contains broken files; each must be skipped with a reason,
# never crash the run or slip into the shards. Here: three good 256² images, a PNG cut in half, a
# zero-byte file, a text file named `.png`, a 64² image (below `min_side = 256`) and a `.txt` file.

# %%
good = {n: augment.centre_square(photo_src[n], 256) for n in list(photo_src)[:3]}
with tempfile.TemporaryDirectory() as tmp:
    expected = teaching.write_bad_inputs(Path(tmp, "src"), good)
    report = prepare([Path(tmp, "src")], Path(tmp, "out"), PrepareConfig(), workers=0, progress=False)
    print("\n".join(report.lines()).replace(tmp, "<tmp>"))

# %%
reasons = {Path(s["item"]).name: s["reason"] for s in report.skipped}
assert report.used == len(good) and len(report.skipped) == len(expected) == 4
assert set(reasons) == set(expected)
for name, pattern in expected.items():
    assert re.search(pattern, reasons[name]), (name, reasons[name])
assert [Path(f).name for files in report.ignored.values() for f in files] == [teaching.IGNORED_NAME]

# %% [markdown]
# Every broken file is named with its reason, the `.txt` file is listed as ignored (not read), and the
# three good images are used. In full mode the next cell prepares the real bundled set, `openmoji photos`
# (OpenMoji rendered at 256² to keep it under a minute), into the run folder, or reuses it if it is
# already there. (`fvae train` prepares its sources once into its own cache, `$FVAE_CACHE`; a run can
# also be pointed at this folder with `data.prepared`.)

# %%
real_out = S.run_root / "data" / "openmoji-photos-r256"
if S.smoke:
    print("smoke mode: the real set (4,495 SVGs + the packaged photos, ~40 s on 2 cores) is prepared in full mode only")
elif (real_out / "dataset.json").is_file():
    print(f"reusing {real_out}:\n" + (real_out / "report.txt").read_text()[:1500])
else:
    real = prepare(["openmoji", "photos"], real_out, PrepareConfig(render_size=256), progress=False)
    print("\n".join(real.lines()[:8]) + f"\n  ... ({len(real.skipped)} skipped in all)")

# %%
if not S.smoke:
    import json
    rep = json.loads((real_out / "report.json").read_text())
    why = collections.Counter(re.sub(r" of .*| \(.*", "", s["reason"]) for s in rep["skipped"])
    for src, s in rep["per_source"].items():
        assert s["used"] + s["skipped"] == s["found"] and s["train"] + s["val"] == s["used"], (src, s)
    # every packaged photo this machine has (10 from PyPI, 34 with `make debian-data`) is used, none skipped
    assert rep["per_source"]["photos"]["used"] == len(data.resolve_sources(["photos"])[0])
    print(f"used {rep['used']} ({rep['splits']}); skipped by reason: {dict(why)}")

# %% [markdown]
# **Reading.** On the real set the only skips are exact duplicates (identical SVG bytes, e.g. flags that
# OpenMoji draws the same); the split into train and val is fixed by each file's content hash, so it does
# not move when files are added. Next: notebook 02 walks through the recipe's losses on these images.
