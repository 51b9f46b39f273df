"""Image files in and out: the one place that decodes image files into 8-bit sRGB RGB and writes PNGs.

Everything that reads a picture from disk goes through :func:`load_rgb`, so that colour management,
EXIF orientation, alpha, bit depth and error reporting are decided exactly once. The result is a
``uint8`` HxWx3 array, sRGB-encoded: the on-disk convention of :mod:`fvae_core.conventions`, where
the layout and value ranges (and the only sanctioned range conversions) are stated. Use
:func:`fvae_core.conventions.unit_from_uint8` to go on to the pipeline's float [0, 1] range.

What :func:`load_rgb` does, in order:

1. Opens and fully decodes the first frame (animated GIF/WebP/APNG give their first frame), so a
   truncated or corrupt file fails here rather than later, and turns Pillow's decompression-bomb
   *warning* into an error.
2. Applies the EXIF orientation, so pixels are in display order.
3. Separates alpha (an alpha band, a palette alpha, or a ``transparency`` colour key) from colour.
4. Brings colour to 8 bits: 16-bit greyscale is *scaled* (v / 257, rounded) rather than clipped as
   Pillow's ``convert("L")`` would; float images must already be in [0, 1].
5. Converts colour to sRGB through the embedded ICC profile (RGB, greyscale, CMYK), or through
   Pillow's plain conversions where there is none.
6. Composites alpha over ``background`` in float, then rounds.

Every failure is an :class:`ImageError` with a one-line message naming the file.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import io
import os
import secrets
import stat
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from fvae_core.conventions import uint8_from_unit, unit_from_uint8

__all__ = ["IMAGE_SUFFIXES", "Decoded", "ImageError", "decode_image", "find_images", "load_rgb", "open_regular",
           "save_png", "scan_folder"]

#: File suffixes (lower case) that :func:`find_images` treats as images.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")

# Float ("F") images are accepted when they are in [0, 1] up to this much rounding noise, then clipped.
_FLOAT_TOLERANCE = 1e-3

# Modes whose last band is alpha, and whether their colour bands are premultiplied by it.
_ALPHA_MODES = {"RGBA": ("RGB", False), "LA": ("L", False), "RGBa": ("RGB", True), "La": ("L", True)}


class ImageError(ValueError):
    """An image file could not be turned into sRGB pixels. ``str()`` is one line: ``"<path>: <reason>"``."""

    def __init__(self, path, reason: str):
        self.path = Path(path)
        self.reason = _one_line(reason)
        super().__init__(_one_line(f"{path}: {self.reason}"))

    def __reduce__(self):
        # The default pickling re-calls __init__ with the message only; data-loader worker
        # processes must be able to send this error back to the parent.
        return (type(self), (self.path, self.reason))


class _Unsupported(Exception):
    """Raised by the pure helpers below; :func:`load_rgb` adds the file name."""


# --------------------------------------------------------------------------------------- reading


def load_rgb(path, background=(255, 255, 255), max_pixels: int | None = None) -> np.ndarray:
    """Decode an image file into a ``uint8`` HxWx3 sRGB array.

    ``background`` (an RGB triple of 0..255 ints, sRGB) is what transparent pixels are composited
    over. ``max_pixels`` (default: Pillow's limit, about 89 MP) refuses larger images as possible
    decompression bombs before their pixels are decoded. Raises :class:`ImageError` for any file
    that cannot be decoded.
    """
    return decode_image(path, background=background, max_pixels=max_pixels).rgb


class Decoded(NamedTuple):
    """What :func:`decode_image` returns: the sRGB pixels and what was done to get them."""

    rgb: np.ndarray  # uint8 HxWx3 sRGB
    mode: str  # the file's Pillow mode, e.g. "RGB", "I;16", "CMYK", "P"
    notes: tuple[str, ...]  # conversions applied: orientation, profile, alpha, bit depth, frames


def decode_image(source, *, name=None, background=(255, 255, 255), max_pixels: int | None = None) -> Decoded:
    """:func:`load_rgb`, for a path or for encoded bytes, also telling what conversions were made.

    ``name`` labels bytes in error messages (default ``"<bytes>"``). ``max_pixels`` replaces
    Pillow's process-wide decompression-bomb limit for the duration of the call (so this is not
    thread-safe when ``max_pixels`` is given; the data pipeline decodes in processes).
    """
    is_bytes = isinstance(source, (bytes, bytearray, memoryview))
    label = Path(name if name is not None else "<bytes>") if is_bytes else Path(source)
    bg = _check_background(background)
    if max_pixels is not None and (not isinstance(max_pixels, int) or max_pixels < 1):
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")
    notes = []
    try:
        with contextlib.ExitStack() as files:
            fh = io.BytesIO(source) if is_bytes else files.enter_context(open_regular(label))
            if (len(source) if is_bytes else os.fstat(fh.fileno()).st_size) == 0:
                raise _Unsupported("empty file (0 bytes)")
            with warnings.catch_warnings(), _pixel_limit(max_pixels):
                # Pillow only *warns* between MAX_IMAGE_PIXELS and twice that; we refuse both.
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = files.enter_context(Image.open(fh))
                frames = getattr(img, "n_frames", 1)
                img.load()  # decode now, inside the try: truncation surfaces here
                if img.width == 0 or img.height == 0:
                    raise _Unsupported(f"zero-size image ({img.width}x{img.height})")
                mode = img.mode
                if frames > 1:
                    notes.append(f"animated: used frame 1 of {frames}")
                icc = img.info.get("icc_profile") or None
                orientation = img.getexif().get(0x0112, 1)
                ImageOps.exif_transpose(img, in_place=True)
                if orientation not in (1, None):
                    notes.append(f"EXIF orientation {orientation} applied")
                colour, alpha, premultiplied = _split_alpha(img)
                rgb = _colour_to_srgb(colour, icc, notes)
    except MemoryError:
        raise
    except Exception as exc:  # Pillow's decoders raise many types; none may escape raw.
        raise ImageError(label, _reason(exc)) from exc
    if mode not in ("RGB", "RGBA", "RGBX"):
        notes.append(f"converted from mode {mode}")
    if alpha is not None and alpha.min() < 255:
        notes.append(f"transparency composited over {tuple(int(v) for v in bg)}")
    return Decoded(_composite(rgb, alpha, bg, premultiplied), mode, tuple(notes))


def open_regular(path):
    """``path`` opened for binary reading; an OSError (one line: "not a regular file (a FIFO)") for anything
    but a regular file, decided before a byte is read and without blocking. A FIFO named ``pipe.png`` in a
    source folder made ``fvae data prepare`` wait forever at "hashing". The path is checked with ``stat``
    before it is opened (opening some devices has side effects), then opened non-blocking (which never
    waits on a FIFO) and checked again with ``fstat`` on the open descriptor (no race with a swap of the
    path). Every image read of fvae goes through this."""
    _require_regular(os.stat(path).st_mode, path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        _require_regular(os.fstat(fd).st_mode, path)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _require_regular(mode: int, path) -> None:
    if not stat.S_ISREG(mode):
        raise OSError(errno.EINVAL, f"not a regular file ({_file_kind(mode)})", str(path))


def _file_kind(mode: int) -> str:
    return ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else
            "a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode) else
            "a folder" if stat.S_ISDIR(mode) else "a special file")


@contextlib.contextmanager
def _pixel_limit(max_pixels: int | None):
    if max_pixels is None:
        yield
        return
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _check_background(background) -> np.ndarray:
    bg = np.asarray(background)
    if bg.shape != (3,) or not np.issubdtype(bg.dtype, np.integer) or bg.min() < 0 or bg.max() > 255:
        raise ValueError(f"background must be three ints in 0..255 (sRGB), got {background!r}")
    return bg.astype(np.uint8)


def _reason(exc: BaseException) -> str:
    """A short human reason for a decoding failure."""
    if isinstance(exc, _Unsupported):
        return str(exc)
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"refused as a possible decompression bomb: {exc}"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image, or a format Pillow cannot decode"
    if isinstance(exc, OSError) and exc.errno is not None:  # file-system errors, not decoder ones
        return f"unreadable: {exc.strerror or exc}"
    if isinstance(exc, OSError) and "truncated" in str(exc):
        return f"truncated image data ({exc})"
    return f"corrupt or undecodable image data ({type(exc).__name__}: {exc})"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _split_alpha(img: Image.Image) -> tuple[Image.Image, np.ndarray | None, bool]:
    """-> (colour image in an 8-bit colour mode, uint8 alpha or None, colour is premultiplied)."""
    if img.mode in ("P", "PA"):
        # Palette entries may carry alpha (tRNS / RGBA palette); Pillow expands both correctly.
        img = img.convert("RGBA" if img.has_transparency_data else "RGB")
    if img.mode in _ALPHA_MODES:
        colour_mode, premultiplied = _ALPHA_MODES[img.mode]
        bands = img.split()
        return Image.merge(colour_mode, bands[:-1]), np.asarray(bands[-1]), premultiplied

    key = img.info.get("transparency")
    raw = np.asarray(img) if img.mode in ("I", "F") or img.mode.startswith("I;16") else None
    if raw is not None:
        alpha = _key_alpha(raw, key)
        img = Image.fromarray(_deep_to_uint8(raw, img.mode))  # 2-D uint8 -> mode "L"
        return img, alpha, False
    if img.mode == "1":
        img = img.convert("L")
    alpha = _key_alpha(np.asarray(img), key) if img.mode in ("L", "RGB") else None
    return img, alpha, False


def _key_alpha(pixels: np.ndarray, key) -> np.ndarray | None:
    """Alpha from a PNG/GIF colour key: 0 where a pixel equals ``key`` exactly, else 255."""
    if key is None or isinstance(key, (bytes, bytearray)):
        return None  # bytes keys only occur for palette images, which Pillow expands itself
    key = np.asarray(key)
    if pixels.ndim == 3:
        if key.shape != (pixels.shape[-1],):
            return None
        hit = np.all(pixels == key, axis=-1)
    else:
        if key.ndim != 0:
            return None
        hit = pixels == key
    return np.where(hit, 0, 255).astype(np.uint8)


def _deep_to_uint8(raw: np.ndarray, mode: str) -> np.ndarray:
    """16-bit, 32-bit-int or float greyscale -> uint8, scaling the full range instead of clipping."""
    if mode == "F":
        lo, hi = float(np.min(raw)), float(np.max(raw))
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -_FLOAT_TOLERANCE or hi > 1 + _FLOAT_TOLERANCE:
            raise _Unsupported(f"float image values must be in [0, 1], found [{lo:g}, {hi:g}]")
        return uint8_from_unit(np.clip(raw, 0.0, 1.0))
    # "I;16*" are 16-bit; "I" (32-bit) is what Pillow also uses for 16-bit data, so accept that range.
    lo, hi = int(np.min(raw)), int(np.max(raw))
    if lo < 0 or hi > 65535:
        raise _Unsupported(f"mode {mode} values outside the 16-bit range, found [{lo}, {hi}]")
    # x / 65535 * 255 == x / 257: maps 0 -> 0, 65535 -> 255, 32768 -> 128 (never a tie).
    return uint8_from_unit(raw.astype(np.float64) / 65535.0)


def _colour_to_srgb(colour: Image.Image, icc: bytes | None, notes: list | None = None) -> np.ndarray:
    """8-bit colour image (+ optional embedded ICC profile) -> uint8 HxWx3 sRGB."""
    if colour.mode in ("RGBX", "YCbCr", "HSV"):
        colour = colour.convert("RGB")  # RGB-family encodings: the profile (if any) describes RGB
    transform = _icc_transform(bytes(icc), colour.mode) if icc else None
    if transform is None and colour.mode == "LAB":
        transform = _lab_transform()  # Lab is device-independent: no profile needed
    if transform is not None:
        colour = ImageCms.applyTransform(colour, transform)
        if notes is not None:
            notes.append("converted to sRGB through the embedded ICC profile" if icc else "converted from Lab")
    if colour.mode not in ("RGB", "L", "CMYK"):
        raise _Unsupported(f"unsupported image mode {colour.mode!r}")
    # Without a profile, Pillow's conversions: L is replicated, CMYK is the naive (1-C)(1-K) model.
    return np.asarray(colour.convert("RGB"))


@functools.cache
def _srgb_profile() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


@functools.cache
def _lab_transform() -> ImageCms.ImageCmsTransform:
    return ImageCms.buildTransform(ImageCms.createProfile("LAB"), _srgb_profile(), "LAB", "RGB")


@functools.lru_cache(maxsize=32)
def _icc_transform(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """The embedded-profile -> sRGB transform, or None when there is nothing (usable) to do.

    A profile that cannot be parsed, or does not fit the pixel data (e.g. an RGB profile on a
    greyscale image), is ignored as browsers do: one bad tag should not drop a training image.
    A profile that describes itself as sRGB is taken at its word, which makes it an exact no-op
    (different sRGB profile builds otherwise disagree by a level here and there). Transforms are
    cached because datasets reuse a handful of profiles and building one costs milliseconds.
    """
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if mode == "RGB" and profile.profile.xcolor_space.strip() == "RGB" and _is_srgb(profile):
            return None
        return ImageCms.buildTransform(
            profile, _srgb_profile(), mode, "RGB", renderingIntent=ImageCms.Intent.PERCEPTUAL
        )
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None


def _is_srgb(profile: ImageCms.ImageCmsProfile) -> bool:
    return ImageCms.getProfileDescription(profile).strip().lower().startswith("srgb")


def _composite(rgb: np.ndarray, alpha: np.ndarray | None, bg: np.ndarray, premultiplied: bool) -> np.ndarray:
    """Blend over ``bg`` in float and round once; exact for opaque pixels.

    Straight alpha: out = a*c + (1-a)*bg. Premultiplied: out = c + (1-a)*bg. Blending is done on the
    sRGB-encoded values, the same convention every browser and Pillow's ``alpha_composite`` use.
    """
    if alpha is None or alpha.min() == 255:
        return rgb
    a = unit_from_uint8(alpha)[..., None]
    c = unit_from_uint8(rgb)
    out = (c if premultiplied else a * c) + (1.0 - a) * unit_from_uint8(bg)
    return uint8_from_unit(out)


# ------------------------------------------------------------------------------------- listing


def find_images(root) -> list[Path]:
    """All image files under ``root`` (recursive), sorted, matched by suffix case-insensitively.

    Hidden files and folders (name starting with ".") are skipped: they are editor/OS debris
    (``.ipynb_checkpoints``, macOS ``._x.jpg``) or :func:`save_png` files still being written.
    Symlinked files are listed; symlinked folders are not followed (no cycles).
    """
    return scan_folder(root)[0]


def scan_folder(root) -> tuple[list[Path], list[Path]]:
    """``(images, others)`` under ``root``: :func:`find_images`'s list, and the sorted non-hidden
    files it passed over because of their suffix (so that a report can say what was ignored)."""
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a directory")
    found, others = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith("."):
                (found if name.lower().endswith(IMAGE_SUFFIXES) else others).append(Path(dirpath, name))
    return sorted(found), sorted(others)


# ------------------------------------------------------------------------------------- writing


def save_png(path, rgb_uint8) -> Path:
    """Write a uint8 HxWx3 sRGB array as a PNG, atomically; creates parent folders. Returns the path.

    The PNG is written to a hidden temporary file in the destination folder and then renamed over
    ``path`` (``os.replace`` is atomic within one file system), so readers never see a partial file
    and an existing file survives a failed write.
    """
    path = Path(path)
    rgb = np.asarray(rgb_uint8)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
        raise ValueError(f"save_png wants a non-empty uint8 HxWx3 array, got {rgb.dtype} {rgb.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    # os.open with 0o666 honours the umask; tempfile.mkstemp would leave the final file 0600.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with open(fd, "wb") as f:
            Image.fromarray(np.ascontiguousarray(rgb)).save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
