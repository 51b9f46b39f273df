"""A folder of bad and odd image files, each with what ``fvae data prepare`` must make of it.

:func:`write_corpus` writes the files and returns, for each file name (relative to the folder, POSIX
form), an :class:`Expect`. The expected pixels are computed by construction, never by running the
code under test: a pattern saved with EXIF orientation 6 must come out as ``np.rot90(pattern, -1)``,
a linear-light ICC profile as the sRGB transfer function of v/255, alpha as an integer blend over
the background, and so on (the maths is in ``test_images``).

The expectations assume ``PrepareConfig(min_side=crop, max_pixels=bomb_pixels, background=background)``
and no ``max_side``. Every image is small (at most 96 px a side, the bomb excepted) so a run is fast.
"""
from __future__ import annotations

import dataclasses
import io
import math
from pathlib import Path

import numpy as np
from PIL import Image
from test_images import CYAN_LAB, blend, cmyk_icc, lab_from_encoding, lab_to_srgb8, linear_rgb_icc, raw_png, \
    srgb_encode

__all__ = ["Expect", "write_corpus"]


@dataclasses.dataclass(frozen=True)
class Expect:
    """What prepare must do with one file.

    ``status``: ``"used"`` (stored, with ``pixels`` up to ``tol`` levels), ``"skipped"`` (in
    ``report.skipped`` with a reason matching the regex ``reason``), ``"ignored"`` (no image suffix:
    listed in ``report.ignored``) or ``"hidden"`` (a dot name: not listed anywhere).
    ``warning``: a regex that one of the report's warnings for this file must match.
    ``small``: below the crop; used (upsampled) only with ``upsample_small``. ``pixels`` is then
    the decoded image before upsampling.
    """

    status: str
    pixels: np.ndarray | None = None
    tol: int = 0
    reason: str | None = None
    warning: str | None = None
    small: bool = False


def _used(pixels, tol=0, warning=None):
    pixels = np.asarray(pixels)
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
    return Expect("used", pixels=pixels, tol=tol, warning=warning)


def _skipped(reason):
    return Expect("skipped", reason=reason)


def _blocks(rng, h, w, colours, block=16):
    """An h x w image of flat ``block``-pixel squares drawn from ``colours`` (JPEG keeps these close)."""
    idx = rng.integers(0, len(colours), (math.ceil(h / block), math.ceil(w / block)))
    return np.asarray(colours, np.uint8)[np.kron(idx, np.ones((block, block), int))][:h, :w]


def _save(img: Image.Image, path: Path, **kw) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path.read_bytes()


def write_corpus(folder, *, crop: int = 64, bomb_pixels: int = 100_000,
                 background=(255, 255, 255), seed: int = 0) -> dict[str, Expect]:
    """Write the corpus into ``folder`` (created) and return ``{relative name: Expect}``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    bg = np.asarray(background, np.int64)
    side = max(crop, 64)
    if side > 96 or side * 96 >= bomb_pixels:
        raise ValueError("the corpus is built for crops of 64..96 px and a bomb limit well above 96*96 px")
    out: dict[str, Expect] = {}

    def noise(h, w, c=3):
        return rng.integers(0, 256, (h, w, c), dtype=np.uint8)

    # --- good files ------------------------------------------------------------------------
    plain = noise(side, side + 8)
    _save(Image.fromarray(plain), folder / "plain.png")
    out["plain.png"] = _used(plain)

    # An exact duplicate of plain.png: used once; the copy sorts after the original.
    (folder / "plain_copy.png").write_bytes((folder / "plain.png").read_bytes())
    out["plain_copy.png"] = _skipped(r"^duplicate of .*plain\.png$")

    nested = noise(side + 4, side)
    _save(Image.fromarray(nested), folder / "sub" / "deeper" / "nested.png")
    out["sub/deeper/nested.png"] = _used(nested)

    # A JPEG of flat 16-px blocks (quality 95, no chroma subsampling) stays within a few levels.
    colours = [(200, 30, 40), (20, 120, 220), (240, 240, 240), (10, 10, 10), (90, 180, 60)]
    photo = _blocks(rng, side, side + 32, colours)
    _save(Image.fromarray(photo), folder / "photo.jpg", quality=95, subsampling=0)
    out["photo.jpg"] = _used(photo, tol=4)

    # A JPEG whose name says PNG: decoders go by content, not suffix.
    misnamed = _blocks(rng, side + 16, side, colours)
    _save(Image.fromarray(misnamed), folder / "jpeg_named.png", format="JPEG", quality=95, subsampling=0)
    out["jpeg_named.png"] = _used(misnamed, tol=4)

    # Stored landscape with EXIF orientation 6 ("rotate 90 degrees clockwise to display").
    stored = noise(side, side + 16)
    exif = Image.Exif()
    exif[0x0112] = 6
    _save(Image.fromarray(stored), folder / "exif6.png", exif=exif)
    out["exif6.png"] = _used(np.rot90(stored, k=-1))

    # RGB 16-bit PNG, written by hand. Pillow keeps the high byte (v >> 8) where v/257 rounded is
    # the exact scaling; the two differ by at most one level, so allow 1 (clipping or keeping the
    # low byte would be off by up to 255).
    v16 = rng.integers(0, 65536, (side, side, 3)).astype(">u2")
    raw_png(folder / "rgb16.png", side, side, 2, 16, v16.tobytes())
    out["rgb16.png"] = _used(np.rint(v16.astype(np.float64) / 257).astype(np.uint8), tol=1)

    # CMYK JPEG with a CMYK ICC profile: cyan goes to CYAN_LAB (not the naive (1-C)(1-K) cyan),
    # zero ink to paper white, full K to black.
    cyan8 = lab_to_srgb8(lab_from_encoding(CYAN_LAB))
    inks = {(255, 0, 0, 0): cyan8, (0, 0, 0, 0): (255, 255, 255), (0, 0, 0, 255): (0, 0, 0)}
    idx = _blocks(rng, side, side + 16, [(i, i, i) for i in range(len(inks))])[..., 0]
    cmyk = np.asarray(list(inks), np.uint8)[idx]
    _save(Image.frombytes("CMYK", (cmyk.shape[1], cmyk.shape[0]), cmyk.tobytes()), folder / "cmyk.jpg",
          quality=100, icc_profile=cmyk_icc())
    out["cmyk.jpg"] = _used(np.asarray(list(inks.values()), np.uint8)[idx], tol=5)

    # Greyscale + alpha: a straight-alpha blend over the background, per background channel.
    grey = rng.integers(0, 256, (side, side), dtype=np.uint8)
    alpha = rng.integers(0, 256, (side, side), dtype=np.uint8)
    alpha[:4] = 0  # some fully transparent rows
    alpha[-4:] = 255
    _save(Image.fromarray(np.dstack([grey, alpha])), folder / "grey_alpha.png")
    out["grey_alpha.png"] = _used(blend(grey[..., None], alpha[..., None], bg[None, None]))

    # Palette PNG whose index 1 is fully transparent (tRNS).
    pal = np.array([[250, 20, 20], [0, 0, 0], [20, 20, 250], [30, 160, 30]], np.uint8)
    index = rng.integers(0, 4, (side, side)).astype(np.uint8)
    img = Image.fromarray(index, mode="L").convert("P")
    img.putpalette(pal.ravel().tolist() + [0] * (3 * 252))
    _save(img, folder / "palette_trns.png", transparency=1)
    expected = pal[index].copy()
    expected[index == 1] = bg
    out["palette_trns.png"] = _used(expected)

    # Linear-light RGB profile: file value v means linear v/255, so sRGB out is encode(v/255).
    ramp = np.arange(side * side * 3, dtype=np.int64).reshape(side, side, 3) * 7 % 256
    lin = ramp.astype(np.uint8)
    _save(Image.fromarray(lin), folder / "linear_icc.png", icc_profile=linear_rgb_icc())
    out["linear_icc.png"] = _used(np.rint(255 * srgb_encode(lin / 255.0)).astype(np.uint8), tol=1)

    # Animated GIF: three frames of four flat colours (exact in a palette); the first is used.
    quad = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    frames = [_blocks(rng, side, side, quad) for _ in range(3)]
    first, *rest = [Image.fromarray(f) for f in frames]
    _save(first, folder / "anim.gif", save_all=True, append_images=rest, duration=100, loop=0)
    out["anim.gif"] = _used(frames[0], warning=r"animated: used frame 1 of 3")

    # Short side below the crop: skipped ("too small"), or used upsampled with upsample_small.
    small = noise(crop // 2, crop + 8)
    _save(Image.fromarray(small), folder / "small.png")
    out["small.png"] = Expect("skipped", pixels=small, reason=r"^too small: ", small=True)

    # --- bad files ---------------------------------------------------------------------------
    buf = io.BytesIO()
    Image.fromarray(noise(side, side)).save(buf, format="PNG")
    (folder / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    out["truncated.png"] = _skipped(r"truncated|corrupt")

    buf = io.BytesIO()
    Image.fromarray(noise(side, side)).save(buf, format="JPEG", quality=90)
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    out["truncated.jpg"] = _skipped(r"truncated|corrupt")

    (folder / "empty.png").write_bytes(b"")
    out["empty.png"] = _skipped(r"empty file")

    (folder / "text.png").write_text("this is not a picture\n" * 20)
    out["text.png"] = _skipped(r"not an image")

    # Just over the pixel limit; flat, so the file is tiny.
    bomb_side = math.isqrt(bomb_pixels) + 1
    _save(Image.new("RGB", (bomb_side, bomb_side), (9, 9, 9)), folder / "bomb.png")
    out["bomb.png"] = _skipped(r"decompression bomb")

    # --- not images / not listed -------------------------------------------------------------
    (folder / "notes.txt").write_text("a note next to the pictures\n")
    out["notes.txt"] = Expect("ignored")
    _save(Image.fromarray(noise(side, side)), folder / ".hidden.png")
    out[".hidden.png"] = Expect("hidden")
    _save(Image.fromarray(noise(side, side)), folder / ".cache" / "in_hidden_folder.png")
    out[".cache/in_hidden_folder.png"] = Expect("hidden")
    return out
