"""``fvae eval``: reconstruct a fixed image set with one or more VAEs and measure everything the card claims.

The instruments live in their own homes and are validated there against oracles:
:mod:`fvae_core.metrics` (PSNR/SSIM vs skimage, GMSD, CIEDE2000 vs Sharma 2005, Oklab colour errors),
:mod:`fvae_core.spectra` (radial power spectra, ΔHF, error spectra, slope, grid peaks),
:mod:`fvae_core.edges` (ringing overshoot, sharpness, flat-region noise), :mod:`fvae_core.lpips`
and :mod:`fvae_core.stats` (bootstrap CIs, paired differences). This module only orchestrates:

1. **Images.** Each source image is viewed at every requested resolution r as a centre r×r square
   of the image Lanczos-resized so that its short side is r (:func:`fvae_core.data.augment.centre_square`).
   Images smaller than r are skipped at r and reported, never upsampled: an upsampled image has an
   empty high band and would bias every spectral number. Subsets are the sources: ``openmoji`` is
   flat art, ``photos`` are photographs, ``painterly`` paintings, a folder is its own subset.
2. **Reconstruction.** Every VAE sees exactly the same images (so A−B differences are paired). The
   latent is the posterior mean; the decoder output is clipped to [0, 1] (what any saved image
   would hold) but not quantised to 8 bits, so that the numbers describe the model and not the
   file format.
3. **Metrics** per image, computed in float64 on the Oklab channels (L, a, b) where a channel matters.
4. **Aggregation**: bootstrap 95% CIs per (VAE, resolution, subset), and paired differences of every
   VAE against the first one (the baseline) on the same images.

Model time and metric time are measured separately (``timing`` in the summary), so the speed of
the instruments can be judged without the model.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np

from fvae_core import edges as edges_mod
from fvae_core import metrics, spectra, stats

#: The per-image metrics shown in summary tables, in order, with a short description.
HEADLINE = (
    ("psnr", "PSNR (dB)"),
    ("ssim", "SSIM"),
    ("lpips", "LPIPS"),
    ("gmsd", "GMSD"),
    ("delta_e_ok_mean", "ΔE_OK"),
    ("ciede2000_mean", "ΔE2000"),
    ("dhf_db@0.25_L", "ΔHF L @1/4 (dB)"),
    ("err_hf_share@0.25_L", "error HF share L"),
    ("grid_peak_db_rec_L", "grid peak L (dB)"),
    ("overshoot_mean", "ringing overshoot"),
    ("sharpness_ratio", "sharpness ratio"),
    ("flat_noise", "flat-region noise"),
)
CHANNELS = ("L", "a", "b")
SUBSET_NAMES = {"openmoji": "flat art", "photos": "photos", "painterly": "painterly"}


class EvalError(ValueError):
    """Bad evaluation input (no images, bad resolution, VAE that cannot be loaded); one line."""


class Reconstructor(Protocol):
    """Anything that maps a batch of float [0, 1] images (N, H, W, 3) to reconstructions of the same shape."""

    name: str

    def __call__(self, batch01: np.ndarray) -> np.ndarray: ...


@dataclasses.dataclass
class VAEReconstructor:
    """A real VAE: encode to the posterior mean, decode, clip to [0, 1]. Jitted once per image size.

    With :attr:`encodings` (an :class:`EncodeMemo` shared by several reconstructors), encoding and decoding
    are two calls and equal encoders encode equal images once: a decoder finetune keeps its base's encoder,
    so the suite's base and six finetunes encode each image set once instead of seven times (one small-cpu
    encode of 24 images at 128² takes 1.1 s, a decode 2.9 s, both in one call 3.5 s). The reconstructions
    are bit-identical either way (measured on the suite's seven VAEs)."""

    name: str
    config: object
    params: object
    batch_size: int = 8
    encodings: "EncodeMemo | None" = dataclasses.field(default=None, repr=False, compare=False)

    @classmethod
    def load(cls, src: str, name: str | None = None, batch_size: int = 8,
             encodings: "EncodeMemo | None" = None) -> "VAEReconstructor":
        from fvae_core.weights import WeightError, load_vae

        try:
            vae = load_vae(src)
        except (WeightError, OSError) as e:
            raise EvalError(f"--vae {src}: {e}") from e
        return cls(name or _short_name(src), vae.config, vae.params, batch_size, encodings)

    def encode(self, batch01: np.ndarray, encodings: "EncodeMemo | None" = None) -> np.ndarray:
        """The posterior means of ``batch01``, from ``encodings`` (default: :attr:`encodings`) when an equal
        encoder has encoded equal images before."""
        from fvae_core.reconstruct import encode_latents

        memo = self.encodings if encodings is None else encodings
        run = lambda: encode_latents(self.config, self.params, batch01, batch=self.batch_size)  # noqa: E731
        return run() if memo is None else memo.get(self.config, self.params, batch01, run)

    def __call__(self, batch01: np.ndarray) -> np.ndarray:
        from fvae_core.conventions import from_model_range, to_model_range
        from fvae_core.reconstruct import _reconstruct_fn

        import jax

        f = self.config.downsample_factor
        if batch01.shape[1] % f or batch01.shape[2] % f:
            raise EvalError(f"{self.name}: image size {batch01.shape[1:3]} is not a multiple of {f}")
        from fvae_core.reconstruct import tile_band_bytes

        band = tile_band_bytes(self.config, *batch01.shape[1:3], None)
        if band is not None:  # large images: exact tiles (fvae_core.tiling), one image at a time
            from fvae_core.tiling import tiled_reconstruct

            out = [tiled_reconstruct(self.config, self.params, to_model_range(x[None].astype(np.float32)),
                                     band_bytes=band) for x in batch01]
            return np.clip(np.asarray(from_model_range(np.concatenate(out)), np.float32), 0.0, 1.0)
        if self.encodings is not None:
            from fvae_core.reconstruct import decode_latents

            return decode_latents(self.config, self.params, self.encode(batch01), batch=self.batch_size, uint8=False)
        run = _reconstruct_fn(self.config, "mean", "float32")
        out = []
        for i in range(0, len(batch01), self.batch_size):
            x = to_model_range(batch01[i:i + self.batch_size].astype(np.float32))
            y = run(self.params, x, jax.random.PRNGKey(0))
            out.append(np.asarray(from_model_range(y), np.float32))
        return np.clip(np.concatenate(out), 0.0, 1.0)


@dataclasses.dataclass
class PerturbedReconstructor:
    """A VAE decoding *perturbed* latents (issue 28): encode to the posterior mean, add Gaussian noise of std
    ``sigma * latent_std``, decode, clip. The bridge between encoded latents (on the encoder's manifold) and
    generated ones (near it, off it) that still has a reference image.

    The noise is drawn from ``(seed, batch shape)`` alone, so every VAE evaluated on the same images gets the
    same noise (paired comparisons), and each ``sigma`` scales the same draw (common random numbers). Pass
    the whole image set in one call, as :func:`evaluate` does: two equal-sized chunks would get equal noise."""

    vae: VAEReconstructor
    sigma: float
    latent_std: float
    seed: int = 0
    name: str = ""
    #: An :class:`EncodeMemo` shared by several reconstructors. A decoder finetune keeps its base's encoder,
    #: so the base and every finetune, at every ``sigma``, then encode each image set once (notebook 07:
    #: 2 encodes instead of 12).
    encodings: "EncodeMemo | None" = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if not self.name:
            self.name = f"{self.vae.name}@σ{self.sigma:g}"
        if not (self.sigma >= 0 and self.latent_std > 0):
            raise EvalError(f"{self.name}: need sigma >= 0 and latent_std > 0, got {self.sigma}, {self.latent_std}")

    def encode(self, batch01: np.ndarray) -> np.ndarray:
        """The posterior means of ``batch01``, from :attr:`encodings` when an equal encoder has encoded
        equal images before (:meth:`VAEReconstructor.encode`)."""
        return self.vae.encode(batch01, self.encodings)

    def __call__(self, batch01: np.ndarray) -> np.ndarray:
        from fvae_core.reconstruct import decode_latents

        v = self.vae
        z = self.encode(batch01)
        noise = np.random.default_rng([self.seed, *z.shape]).standard_normal(z.shape, dtype=np.float32)
        return decode_latents(v.config, v.params, z + np.float32(self.sigma * self.latent_std) * noise,
                              batch=v.batch_size, uint8=False)


class EncodeMemo:
    """Latents by content: ``(encoder digest, images digest) -> latents``, never by a VAE's name. Thread-safe
    (:func:`evaluate` runs two reconstructors at once): a second caller of the same key waits for the
    first's encode instead of repeating it."""

    def __init__(self):
        import threading

        self._items: dict = {}
        self._locks: dict = {}
        self._digests: dict = {}  # id(params) -> (params, digest): the params are held, so ids are not reused
        self._lock = threading.Lock()
        self.encodes = 0

    def get(self, config, params, batch01: np.ndarray, encode: Callable[[], np.ndarray]) -> np.ndarray:
        import threading

        with self._lock:
            hit = self._digests.get(id(params))
        if hit is None or hit[0] is not params:
            hit = (params, encoder_digest(config, params))
            with self._lock:
                self._digests[id(params)] = hit
        key = (hit[1], _array_digest(batch01))
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self._items:
                self._items[key] = encode()
                self.encodes += 1
            return self._items[key]


def _array_digest(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    return hashlib.sha256(f"{a.dtype.str}{a.shape}".encode() + a.tobytes()).hexdigest()


def encoder_digest(config, params) -> str:
    """A content hash of what an encode computes: the config and every parameter outside the decoder
    (``encoder``, ``quant_conv``)."""
    import jax

    h = hashlib.sha256(repr(config).encode())
    enc = {k: v for k, v in params.items() if k not in ("decoder", "post_quant_conv")}
    for path, leaf in jax.tree_util.tree_leaves_with_path(enc):
        h.update(jax.tree_util.keystr(path).encode() + _array_digest(np.asarray(leaf)).encode())
    return h.hexdigest()


@dataclasses.dataclass
class ResizeReconstructor:
    """The no-learning reference: ``--vae bicubic:F`` downsizes by ``F`` (Pillow's Lanczos-3, antialiased)
    and upsizes back with Pillow's bicubic (Keys, a = -0.5), in float32 per channel (Pillow's "F" mode,
    so nothing is quantised to 8 bits). The small image is clipped to [0, 1], as any stored low-resolution
    image is, and so is the result, like a decoder's output.

    ``bicubic:8`` keeps 3 numbers per 8×8 pixels, fewer than an f = 8, 4-channel latent's 4: a VAE that
    does not beat it has learnt less than a resize. ``bicubic:4`` (48 numbers per 8×8) is a harder bar.
    Pillow computes this; we only wrap it."""

    name: str
    factor: int

    PREFIX = "bicubic:"

    @classmethod
    def parse(cls, src: str, name: str | None = None) -> "ResizeReconstructor":
        text = str(src)[len(cls.PREFIX):]
        try:
            factor = int(text)
        except ValueError:
            factor = 0
        if factor < 2 or factor > 64:
            raise EvalError(f"--vae {src}: expected bicubic:F with an integer factor F from 2 to 64, e.g. bicubic:8")
        return cls(name or f"bicubic×{factor}", factor)

    def __call__(self, batch01: np.ndarray) -> np.ndarray:
        from PIL import Image

        n, h, w, c = batch01.shape
        f = self.factor
        if h % f or w % f:
            raise EvalError(f"{self.name}: image size {(h, w)} is not a multiple of {f}")
        out = np.empty((n, h, w, c), np.float32)
        for i in range(n):
            for ch in range(c):
                im = Image.fromarray(np.ascontiguousarray(batch01[i, :, :, ch], np.float32), mode="F")
                small = np.clip(np.asarray(im.resize((w // f, h // f), Image.Resampling.LANCZOS)), 0.0, 1.0)
                small = Image.fromarray(np.ascontiguousarray(small, np.float32), mode="F")
                out[i, :, :, ch] = np.asarray(small.resize((w, h), Image.Resampling.BICUBIC), np.float32)
        return np.clip(out, 0.0, 1.0)


def load_reconstructor(src: str, name: str | None = None, batch_size: int = 8, encodings=None):
    """``--vae`` values: ``bicubic:F`` (:class:`ResizeReconstructor`), else a VAE (:meth:`VAEReconstructor.load`,
    sharing ``encodings``, an :class:`EncodeMemo`, when given)."""
    if str(src).startswith(ResizeReconstructor.PREFIX):
        return ResizeReconstructor.parse(src, name)
    return VAEReconstructor.load(src, name, batch_size, encodings)


def _short_name(src: str) -> str:
    """A readable VAE name: the run folder for ``runs/NAME/export/diffusers``, else the last path part or the hub id."""
    if str(src).startswith(ResizeReconstructor.PREFIX):
        return ResizeReconstructor.parse(src).name
    p = Path(str(src).rstrip("/"))
    if p.exists():
        parts = [q for q in p.resolve().parts if q not in ("diffusers", "export", "vae", "")]
        return parts[-1] if parts else str(src)
    return str(src)


# ---- images ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EvalImage:
    name: str  # unique within the evaluation, e.g. "photos/astronaut"
    subset: str  # "flat art", "photos", or a folder name
    rgb: np.ndarray  # uint8 HxWx3 at its native (prepared / rendered) size


def gather_images(sources: Sequence[str], *, limit: int | None = None, split: str = "val",
                  render_size: int = 512, log: Callable = print) -> tuple[list[EvalImage], list[dict]]:
    """The evaluation images and the skipped ones (``[{"item", "reason"}]``).

    ``sources`` are built-in names (``openmoji``, ``photos``), folders or files, or prepared
    datasets (a folder holding ``dataset.json``; its ``split`` is used). With ``limit``, each source
    contributes its first ``limit`` images in content-hash order: a stable, unbiased subset that
    does not depend on file names. Exact duplicates are evaluated once.
    """
    from fvae_core.data.sources import SourceError, decode_item, item_bytes, resolve_sources, sha256
    from fvae_core.images import ImageError

    images, skipped, seen = [], [], set()
    for spec in sources:
        if (Path(spec) / "dataset.json").is_file():
            got, skip = _prepared_images(Path(spec), split, limit)
            for im in got:
                if im.name not in seen:
                    seen.add(im.name)
                    images.append(im)
            skipped += skip
            continue
        try:
            items, _ = resolve_sources([spec], log=log)  # photos/painterly: which packages, one line
        except SourceError as e:
            raise EvalError(str(e)) from e
        hashed = []
        for item in items:
            try:
                data = item_bytes(item)
            except OSError as e:
                skipped.append({"item": item.label, "reason": f"unreadable: {e.strerror or e}"})
                continue
            hashed.append((sha256(data), item, data))
        hashed.sort(key=lambda t: t[0])
        subset = SUBSET_NAMES.get(spec, Path(spec).name or spec)
        taken = 0
        for digest, item, data in hashed:
            if limit is not None and taken >= limit:
                break
            if digest in seen:
                skipped.append({"item": item.label, "reason": "duplicate of an earlier image"})
                continue
            try:
                rgb = decode_item(item, data, render_size=render_size).rgb
            except ImageError as e:
                skipped.append({"item": item.label, "reason": str(e)})
                continue
            seen.add(digest)
            images.append(EvalImage(f"{spec}/{item.name}" if spec in SUBSET_NAMES else item.label, subset, rgb))
            taken += 1
    if not images:
        raise EvalError(f"no usable images in {', '.join(map(str, sources))}")
    log(f"eval: {len(images)} images from {', '.join(map(str, sources))}"
        + (f" ({len(skipped)} skipped)" if skipped else ""))
    return images, skipped


def _prepared_images(root: Path, split: str, limit: int | None) -> tuple[list[EvalImage], list[dict]]:
    from fvae_core.data.loader import DatasetError, PreparedDataset, _Records

    try:
        data = PreparedDataset.open(root)
    except DatasetError as e:
        raise EvalError(str(e)) from e
    if split not in data.rows or not data.rows[split]:
        raise EvalError(f"{root}: prepared set has no {split!r} images (splits: {', '.join(data.rows)})")
    rows = data.rows[split]
    order = sorted(range(len(rows)), key=lambda i: rows[i].get("sha256", ""))[:limit]
    records = _Records(data.shard_paths(split), rows)
    images, skipped = [], []
    for i in order:
        r = rows[i]
        try:
            rgb = records.decode(i)
        except DatasetError as e:
            skipped.append({"item": r["item"], "reason": str(e)})
            continue
        src = r.get("source", root.name)
        images.append(EvalImage(f"{src}/{r.get('name', r['item'])}", SUBSET_NAMES.get(src, Path(src).name or src), rgb))
    return images, skipped


def views_at(images: Sequence[EvalImage], resolution: int) -> tuple[list[EvalImage], list[dict]]:
    """Each image as a centre ``resolution``² square (short side Lanczos-resized to it); never upsampled."""
    from fvae_core.data.augment import centre_square

    out, skipped = [], []
    for im in images:
        if min(im.rgb.shape[:2]) < resolution:
            skipped.append({"item": im.name, "reason": f"smaller than {resolution}px at r={resolution} "
                                                       f"({im.rgb.shape[1]}x{im.rgb.shape[0]}; not upsampled)"})
            continue
        out.append(EvalImage(im.name, im.subset, centre_square(im.rgb, resolution)))
    return out, skipped


# ---- per-image metrics --------------------------------------------------------------------------------
def _flatten(prefix_values: dict[str, np.ndarray]) -> dict[str, float]:
    out = {}
    for k, v in prefix_values.items():
        v = np.asarray(v)
        if v.ndim == 0:
            out[k] = float(v)
        else:
            for c, x in zip(CHANNELS, v):
                out[f"{k}_{c}"] = float(x)
    return out


@dataclasses.dataclass
class _Reference:
    """What depends on the original only: computed once per image and resolution, shared by all VAEs."""

    x: np.ndarray  # float64 HxWx3 in [0, 1]
    lab: np.ndarray  # Oklab (3, H, W)
    masks: object


def _reference(x01: np.ndarray) -> _Reference:
    """``x01``: the float [0, 1] image exactly as the VAE received it (so an identity VAE measures as exact)."""
    x = np.asarray(x01, np.float64)
    lab = np.moveaxis(metrics.oklab_np(x), -1, 0)
    return _Reference(x, lab, edges_mod.edge_masks(lab[0]))


def image_metrics(ref: _Reference, rec01: np.ndarray) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """All per-image metrics of one reconstruction (LPIPS excepted: batched separately) and its spectra."""
    y = np.asarray(rec01, np.float64)
    lab_y = np.moveaxis(metrics.oklab_np(y), -1, 0)
    row = {"psnr": metrics.psnr(ref.x, y, data_range=1.0), "ssim": metrics.ssim(ref.x, y, data_range=1.0),
           "gmsd": metrics.gmsd(ref.x, y)}
    row.update(metrics.colour_errors(ref.x, y))
    row.update(_flatten(spectra.spectral_metrics(ref.lab, lab_y)))
    row.update(edges_mod.edge_metrics(ref.lab[0], lab_y[0], ref.masks))
    freqs, p_orig, p_rec, p_err = spectra.radial_spectra(ref.lab, lab_y)
    return row, {"freqs": freqs, "orig": p_orig, "rec": p_rec, "err": p_err}


# ---- the evaluation -----------------------------------------------------------------------------------
@dataclasses.dataclass
class EvalResult:
    rows: list[dict]  # one per (vae, resolution, image): vae, resolution, subset, image, metrics...
    spectra: dict  # (vae, resolution) -> {"freqs", "orig", "rec", "err": (n, C, nbins) log10 power, "subset"}
    vaes: list[str]
    resolutions: list[int]
    skipped: list[dict]
    timing: dict
    views: dict  # resolution -> list[EvalImage] (for figures)
    recs: dict  # (vae, resolution) -> float32 (n, r, r, 3) reconstructions (for figures)

    @property
    def metric_keys(self) -> list[str]:
        skip = {"vae", "resolution", "subset", "image"}
        return [k for k in self.rows[0] if k not in skip] if self.rows else []

    def select(self, vae=None, resolution=None, subset=None) -> list[dict]:
        return [r for r in self.rows if (vae is None or r["vae"] == vae)
                and (resolution is None or r["resolution"] == resolution)
                and (subset is None or r["subset"] == subset)]

    def subsets(self) -> list[str]:
        return sorted({r["subset"] for r in self.rows})

    def summary(self, keys: Sequence[str] | None = None, *, n_boot: int = 2000, seed: int = 0) -> dict:
        """Bootstrap 95% CIs: {vae: {resolution: {subset | "all": {metric: Estimate}}}}."""
        keys = list(keys or self.metric_keys)
        out = {}
        for vae in self.vaes:
            for res in self.resolutions:
                groups = {"all": self.select(vae, res)}
                groups.update({s: self.select(vae, res, s) for s in self.subsets()})
                for g, rows in groups.items():
                    if not rows:
                        continue
                    values = np.array([[r[k] for k in keys] for r in rows], np.float64)
                    est = stats.bootstrap_ci(values, n_boot=n_boot, seed=seed)
                    out.setdefault(vae, {}).setdefault(res, {})[g] = {
                        k: stats.Estimate(float(est.value[j]), float(est.lo[j]), float(est.hi[j]),
                                          int(np.asarray(est.n)[j]) if np.ndim(est.n) else int(est.n))
                        for j, k in enumerate(keys)}
        return out

    def paired(self, a: str, b: str, keys: Sequence[str] | None = None, *, n_boot: int = 2000,
               seed: int = 0) -> dict:
        """Paired differences b − a on the same images: {resolution: {subset | "all": {metric: Estimate}}}."""
        keys = list(keys or self.metric_keys)
        out = {}
        for res in self.resolutions:
            for g in ["all"] + self.subsets():
                sub = None if g == "all" else g
                ra = {r["image"]: r for r in self.select(a, res, sub)}
                rb = {r["image"]: r for r in self.select(b, res, sub)}
                common = [i for i in ra if i in rb]
                if not common:
                    continue
                va = np.array([[ra[i][k] for k in keys] for i in common], np.float64)
                vb = np.array([[rb[i][k] for k in keys] for i in common], np.float64)
                est = stats.paired_difference(vb, va, n_boot=n_boot, seed=seed)
                out.setdefault(res, {})[g] = {
                    k: stats.Estimate(float(est.value[j]), float(est.lo[j]), float(est.hi[j]),
                                      int(np.asarray(est.n)[j]) if np.ndim(est.n) else int(est.n))
                    for j, k in enumerate(keys)}
        return out

    def spectrum_estimates(self, vae: str, resolution: int, which: str = "rec", channel: int = 0,
                           subset: str | None = None, *, n_boot: int = 1000, seed: int = 0):
        """(freqs, Estimate over images of the log10 radial power) for one channel; ``which`` is
        "orig", "rec", "err" or "ratio" (10·log10 P_rec/P_orig, in dB)."""
        s = self.spectra[(vae, resolution)]
        pick = np.ones(len(s["subset"]), bool) if subset is None else np.asarray(s["subset"]) == subset
        if which == "ratio":
            curves = 10.0 * (s["rec"] - s["orig"])
        else:
            curves = s[which]
        return s["freqs"], stats.bootstrap_ci(curves[pick, channel], n_boot=n_boot, seed=seed)


def evaluate(vaes: Sequence[Reconstructor], images: Sequence[EvalImage], resolutions: Sequence[int], *,
             lpips_net: str | None = "vgg16", batch_size: int = 4, keep_recs: bool = True,
             progress: bool = False, log: Callable = print, threads: int | None = None) -> EvalResult:
    """Reconstruct every image at every resolution with every VAE and measure it (see module docstring).

    ``threads`` VAEs reconstruct (and get their LPIPS) at once, in threads of this process: XLA:CPU keeps
    about one core busy per call, and a jitted call releases the GIL, so two threads on 2 cores measured
    1.7x the throughput of one (two small-cpu VAEs on 48 images at 128²: 8.8 instead of 14.8 s); the
    per-image metrics of ``threads`` VAEs are computed at once too (1.7x as well). The results do not
    depend on it (each VAE's computation is the same). ``None``: 2 on the CPU backend, 1
    elsewhere (an accelerator runs one call at a time at full width, and two would double peak memory)."""
    threads = default_threads() if threads is None else threads
    names = [v.name for v in vaes]
    if not vaes:
        raise EvalError("no VAE to evaluate")
    if len(set(names)) != len(names):
        raise EvalError(f"VAE names must be unique, got {names}")
    for r in resolutions:
        if not isinstance(r, int) or r < 16 or r % 8:
            raise EvalError(f"resolution {r!r}: must be a multiple of 8, at least 16")
    lp = None
    if lpips_net:
        from fvae_core.lpips import load_lpips
        lp = load_lpips(lpips_net)
    timing = {"model_s": 0.0, "metrics_s": 0.0, "lpips_s": 0.0, "images": 0, "lpips_net": lpips_net}
    rows, spec, skipped, views_all, recs_all = [], {}, [], {}, {}
    bar = _progress(len(vaes) * sum(1 for _ in resolutions), progress)
    for res in resolutions:
        views, skip = views_at(images, res)
        skipped += skip
        if not views:
            log(f"eval: no image is at least {res}px; resolution {res} skipped")
            continue
        views_all[res] = views
        t0 = time.perf_counter()
        x01 = np.stack([v.rgb for v in views]).astype(np.float32) / np.float32(255.0)
        refs = [_reference(x) for x in x01]
        timing["metrics_s"] += time.perf_counter() - t0
        recs = {}
        t0 = time.perf_counter()
        outs = map_threads(lambda vae: np.clip(np.asarray(vae(x01), np.float32), 0.0, 1.0), vaes, threads)
        timing["model_s"] += time.perf_counter() - t0
        for vae, rec in zip(vaes, outs):
            if rec.shape != x01.shape:
                raise EvalError(f"{vae.name}: reconstruction shape {rec.shape} != input {x01.shape}")
            if not np.all(np.isfinite(rec)):
                raise EvalError(f"{vae.name}: non-finite reconstruction at resolution {res}")
            recs[vae.name] = rec
        t0 = time.perf_counter()
        lp_vals = _lpips_batched(lp, x01, recs, batch_size, threads) if lp else {n: np.full(len(views), np.nan) for n in recs}
        timing["lpips_s"] += time.perf_counter() - t0

        def measure(vae):
            vrows, curves = [], {"orig": [], "rec": [], "err": []}
            for view, ref, y, lpv in zip(views, refs, recs[vae.name], lp_vals[vae.name]):
                row, sp = image_metrics(ref, y)
                vrows.append({"vae": vae.name, "resolution": res, "subset": view.subset, "image": view.name,
                              **row, "lpips": float(lpv)})
                for k in curves:
                    curves[k].append(np.log10(np.maximum(sp[k], 1e-30)))
            return vrows, {"freqs": sp["freqs"], "subset": [v.subset for v in views],
                           **{k: np.stack(v) for k, v in curves.items()}}

        # numpy and scipy release the GIL in these metrics: two threads measured 1.7x one (48 images at 128²)
        t0 = time.perf_counter()
        measured = map_threads(measure, vaes, threads)
        timing["metrics_s"] += time.perf_counter() - t0
        for vae, (vrows, vspec) in zip(vaes, measured):
            rows += vrows
            spec[(vae.name, res)] = vspec
            timing["images"] += len(views)
            if keep_recs:
                recs_all[(vae.name, res)] = recs[vae.name]
            bar.update(1)
    bar.close()
    if not rows:
        raise EvalError(f"no image is large enough for any of the resolutions {list(resolutions)}")
    # Put LPIPS next to the other fidelity metrics in the column order.
    order = ["vae", "resolution", "subset", "image", "psnr", "ssim", "lpips"]
    rows = [{k: r[k] for k in order} | {k: v for k, v in r.items() if k not in order} for r in rows]
    return EvalResult(rows, spec, names, [r for r in resolutions if r in views_all], skipped, timing,
                      views_all, recs_all)


def default_threads() -> int:
    """VAE calls to run at once in threads (:func:`evaluate`, :func:`map_threads`): 2 on the CPU backend,
    1 elsewhere."""
    import jax

    return 2 if jax.default_backend() == "cpu" else 1


def map_threads(fn, items, threads: int | None = None) -> list:
    """``[fn(x) for x in items]``, ``threads`` at a time (None: :func:`default_threads`; in order; an
    exception is raised as is). For jitted VAE calls, which release the GIL (see :func:`evaluate`)."""
    threads = default_threads() if threads is None else threads
    items = list(items)
    if threads <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(threads, len(items))) as ex:
        return list(ex.map(fn, items))


def _lpips_batched(lp, x01: np.ndarray, recs: dict[str, np.ndarray], batch_size: int,
                   threads: int = 1) -> dict[str, np.ndarray]:
    """LPIPS of every reconstruction against the original; the original's features are computed once
    per batch and shared by all VAEs (so a second VAE costs half as much); ``threads`` VAEs at a time."""
    from fvae_core.lpips import lpips_features, lpips_from_features

    out = {name: [] for name in recs}
    for i in range(0, len(x01), batch_size):
        fx = lpips_features(lp.params, x01[i:i + batch_size] * 2.0 - 1.0, net=lp.net,
                            winograd_kernels=lp.winograd_kernels)

        def one(rec):
            fy = lpips_features(lp.params, rec[i:i + batch_size] * 2.0 - 1.0, net=lp.net,
                                winograd_kernels=lp.winograd_kernels)
            return np.asarray(lpips_from_features(lp.params, fy, fx, net=lp.net), np.float64)

        for name, v in zip(recs, map_threads(one, recs.values(), threads)):
            out[name].append(v)
    return {name: np.concatenate(v) for name, v in out.items()}


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, desc="eval (vae x resolution)", unit="set")


# ---- writing ------------------------------------------------------------------------------------------
def _est_json(e) -> dict:
    f = lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else v  # noqa: E731
    return {"value": f(e.value), "lo": f(e.lo), "hi": f(e.hi), "n": e.n}


def summary_markdown(result: EvalResult, keys=HEADLINE, summ: dict | None = None) -> str:
    """Markdown tables: each VAE per resolution and subset, then the paired differences to the first VAE.
    ``summ``: an already computed :meth:`EvalResult.summary` over (at least) these keys."""
    from fvae_core.plotting import metric_table_markdown

    present = [(k, t) for k, t in keys if k in result.metric_keys]
    summ = summ if summ is not None else result.summary([k for k, _ in present])
    parts = ["## Metrics (mean [95% bootstrap CI] over images)\n"]
    table = []
    for vae in result.vaes:
        for res, groups in summ.get(vae, {}).items():
            for g, ests in groups.items():
                table.append({"vae": vae, "res": res, "subset": g, "n": next(iter(ests.values())).n, **ests})
    cols = [("vae", "VAE"), ("res", "res"), ("subset", "subset"), ("n", "n")] + present
    parts.append(metric_table_markdown(table, cols))
    base = result.vaes[0]
    for other in result.vaes[1:]:
        pairs = result.paired(base, other, [k for k, _ in present])
        table = [{"res": res, "subset": g, **ests} for res, groups in pairs.items() for g, ests in groups.items()]
        parts.append(f"\n## Paired difference {other} − {base} (same images; CI excluding 0 is a real effect)\n")
        parts.append(metric_table_markdown(table, [("res", "res"), ("subset", "subset")] + present))
    return "\n".join(parts) + "\n"


def write_results(result: EvalResult, out: Path, *, figures: bool = True, log: Callable = print) -> Path:
    """Write per-image CSV/JSONL, summary.json/.md, spectra.npz, skipped.json and figures into ``out``.

    Written into a temporary sibling folder and renamed at the end, so ``out`` is either complete or absent.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise EvalError(f"--out {out} exists and is not empty (choose a new folder)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        keys = result.metric_keys
        with open(tmp / "per_image.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["vae", "resolution", "subset", "image"] + keys)
            w.writeheader()
            w.writerows(result.rows)
        with open(tmp / "per_image.jsonl", "w") as fh:
            for r in result.rows:
                fh.write(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v)
                                     for k, v in r.items()}) + "\n")
        summ = result.summary()
        doc = {"vaes": result.vaes, "lpips_net": result.timing.get("lpips_net"), "resolutions": result.resolutions, "subsets": result.subsets(),
               "timing": result.timing, "skipped": len(result.skipped),
               "summary": {v: {str(r): {g: {k: _est_json(e) for k, e in m.items()} for g, m in gs.items()}
                               for r, gs in rs.items()} for v, rs in summ.items()},
               "paired": {f"{b} - {result.vaes[0]}": {str(r): {g: {k: _est_json(e) for k, e in m.items()}
                                                               for g, m in gs.items()}
                                                       for r, gs in result.paired(result.vaes[0], b).items()}
                          for b in result.vaes[1:]}}
        (tmp / "summary.json").write_text(json.dumps(doc, indent=1))
        (tmp / "summary.md").write_text(summary_markdown(result, summ=summ))
        (tmp / "skipped.json").write_text(json.dumps(result.skipped, indent=1))
        np.savez_compressed(tmp / "spectra.npz", **{
            f"{vae}|{res}|{k}": np.asarray(v) for (vae, res), s in result.spectra.items()
            for k, v in s.items() if k != "subset"})
        if figures:
            write_figures(result, tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"eval: wrote {out}")
    return out


def write_figures(result: EvalResult, fig_dir: Path) -> list[Path]:
    """Spectra, spectral ratios and error spectra (Oklab L, CI bands) per resolution, and edge crops."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fvae_core import plotting

    written = []
    for i, res in enumerate(result.resolutions):
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
        for which, ax, plot in (("rec", axes[0], plotting.plot_spectra), ("ratio", axes[1], plotting.plot_spectral_ratio),
                                ("err", axes[2], plotting.plot_error_spectra)):
            curves = {}
            if which == "rec":
                f, e = result.spectrum_estimates(result.vaes[0], res, "orig")
                curves["original"] = e
            for vae in result.vaes:
                f, e = result.spectrum_estimates(vae, res, which)
                curves[vae] = e
            plot(f, curves, ax=ax, title=f"Oklab L, {res}² ({which})")
        written.append(plotting.save_figure(fig, f"{i:02d}_spectra_r{res}", fig_dir))
        views = result.views[res]
        if (result.vaes[0], res) in result.recs:
            pick = _strongest_edge_images(views, k=2)
            for j in pick:
                recs = {vae: result.recs[(vae, res)][j] for vae in result.vaes}
                fig = plotting.crop_grid(views[j].rgb.astype(np.float32) / 255.0, recs, size=min(64, res))
                written.append(plotting.save_figure(fig, f"{i:02d}_crops_r{res}_{j}", fig_dir))
    return written


def _strongest_edge_images(views: Sequence[EvalImage], k: int) -> list[int]:
    """One image per subset first (the most edge-dense), then the next most edge-dense ones, up to ``k``."""
    def density(v):
        g = np.abs(np.diff(v.rgb.astype(np.float32).mean(-1), axis=1)).mean()
        return float(g)
    order = sorted(range(len(views)), key=lambda i: -density(views[i]))
    picked, subsets = [], set()
    for i in order:
        if views[i].subset not in subsets:
            picked.append(i)
            subsets.add(views[i].subset)
    picked += [i for i in order if i not in picked]
    return picked[:k]


def parse_resolutions(text: str) -> list[int]:
    try:
        out = [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise EvalError(f"--resolutions {text!r}: expected comma-separated integers like 128,256") from None
    if not out:
        raise EvalError("--resolutions: none given")
    return out


def run_eval(vae_srcs: Iterable[str], sources: Sequence[str], out: Path, *, resolutions=(256,),
             limit: int | None = None, split: str = "val", lpips_net: str | None = "vgg16",
             batch_size: int = 4, figures: bool = True, progress: bool = True, log: Callable = print) -> EvalResult:
    """The ``fvae eval`` command: load the VAEs, gather images, evaluate, write everything into ``out``."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise EvalError(f"--out {out} exists and is not empty (choose a new folder)")
    vae_srcs = list(vae_srcs)
    names = [_short_name(s) for s in vae_srcs]
    names = [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]
    memo = EncodeMemo()
    vaes = [load_reconstructor(s, n, batch_size, memo) for s, n in zip(vae_srcs, names)]
    images, skipped = gather_images(sources, limit=limit, split=split, render_size=max(max(resolutions), 512), log=log)
    result = evaluate(vaes, images, list(resolutions), lpips_net=lpips_net, batch_size=batch_size,
                      progress=progress, log=log)
    result.skipped = skipped + result.skipped
    write_results(result, out, figures=figures, log=log)
    t = result.timing
    log(f"eval: {t['images']} reconstructions; model {t['model_s']:.1f} s, metrics {t['metrics_s']:.1f} s, "
        f"LPIPS {t['lpips_s']:.1f} s")
    return result


# ---- cached evaluations (the notebooks) ----------------------------------------------------------------
EVAL_CACHE_VERSION = 1


def cached_evaluation(vaes: dict[str, str], sources: Sequence[str], resolutions: Sequence[int], root, *,
                      limit: int | None = None, lpips_net: str | None = "vgg16", batch_size: int = 4,
                      progress: bool = True, log: Callable = print) -> EvalResult:
    """:func:`evaluate` of named VAE folders (or ``bicubic:F`` references), stored under ``root`` by a key over
    the weights' content, the images asked for (with the packages and versions the packaged sources resolve
    to here), the resolutions and the LPIPS net; a second call with the same inputs loads it."""
    import pickle

    from fvae_core.data.packaged import packages_fingerprint
    from fvae_core.data.sources import SourceError
    from fvae_core.runs.cache import _weights_fingerprint

    try:
        packages = packages_fingerprint(sources)
    except SourceError as e:
        raise EvalError(str(e)) from e
    key = hashlib.sha256(json.dumps({
        "v": EVAL_CACHE_VERSION, "packages": packages, "vaes": {n: str(p) if str(p).startswith(ResizeReconstructor.PREFIX) else _weights_fingerprint(str(p))
                 for n, p in vaes.items()},
        "sources": list(map(str, sources)), "res": list(resolutions), "limit": limit, "lpips": lpips_net,
    }, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(root) / f"eval-{key}.pkl"
    if path.is_file():
        log(f"eval: reusing {path}")
        with open(path, "rb") as fh:  # our own file, written below
            return pickle.load(fh)
    memo = EncodeMemo()
    recons = [load_reconstructor(str(p), name, batch_size, memo) for name, p in vaes.items()]
    images, skipped = gather_images(sources, limit=limit, log=log)
    result = evaluate(recons, images, list(resolutions), lpips_net=lpips_net, batch_size=batch_size,
                      progress=progress, log=log)
    result.skipped = skipped + result.skipped
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            pickle.dump(result, fh, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return result
