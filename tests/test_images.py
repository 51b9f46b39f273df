"""Tests for fvae_core.images: decoding to 8-bit sRGB, listing, atomic PNG writing.

Every fixture is built in tmp_path with Pillow/numpy (ICC profiles are assembled byte by byte
below), and every expectation is computed independently of the code under test: integer alpha
blends, the sRGB transfer function, the CIE Lab formulas, numpy rotations.
"""
from __future__ import annotations

import io
import os
import pickle
import stat
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageCms

from fvae_core import images
from fvae_core.images import IMAGE_SUFFIXES, ImageError, find_images, load_rgb, save_png

RNG = np.random.default_rng(1234)


# ------------------------------------------------------------------------------- independent maths


def blend(c, a, bg):
    """Straight-alpha 'over' on 0..255 ints, rounded to nearest: (c*a + bg*(255-a)) / 255."""
    n = np.asarray(c, np.int64) * a + np.asarray(bg, np.int64) * (255 - np.asarray(a, np.int64))
    return ((2 * n + 255) // 510).astype(np.uint8)  # exact round-half-up; ties cannot occur


def srgb_encode(linear):
    """The sRGB transfer function (IEC 61966-2-1), [0,1] linear -> [0,1] encoded."""
    linear = np.clip(np.asarray(linear, np.float64), 0.0, 1.0)
    return np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)


# sRGB colorants chromatically adapted to D50 (the ICC connection space), as in every sRGB profile.
D50_SRGB = np.array([[0.4360747, 0.3850649, 0.1430804],
                     [0.2225045, 0.7168786, 0.0606169],
                     [0.0139322, 0.0971045, 0.7141733]])
D50_WHITE = (0.9642, 1.0, 0.8249)


def lab_to_srgb8(lab):
    """CIE L*a*b* (D50) -> 8-bit sRGB through XYZ, with the textbook formulas."""
    L, a, b = lab
    fy = (L + 16) / 116
    f = np.array([fy + a / 500, fy, fy - b / 200])
    eps, kappa = 216 / 24389, 24389 / 27
    xyz_rel = np.where(f ** 3 > eps, f ** 3, (116 * f - 16) / kappa)
    xyz = xyz_rel * np.array(D50_WHITE)
    linear = np.linalg.solve(D50_SRGB, xyz)
    return np.rint(255 * srgb_encode(linear)).astype(int)


# ------------------------------------------------------------------------- ICC profiles, by hand


def _s15(x):
    return struct.pack(">i", int(round(x * 65536)))


def _xyz_tag(x, y, z):
    return b"XYZ " + bytes(4) + _s15(x) + _s15(y) + _s15(z)


def _desc_tag(text):
    t = text.encode("ascii") + b"\0"
    return b"desc" + bytes(4) + struct.pack(">I", len(t)) + t + bytes(8) + bytes(67)


def _icc(device_class, space, pcs, tags):
    """Assemble a version-2 ICC profile: 128-byte header, tag table, 4-byte aligned tag data."""
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for sig, body in tags:
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body + bytes(-len(body) % 4)
    header = (struct.pack(">I", offset + len(data)) + b"lcms" + struct.pack(">I", 0x02100000)
              + device_class + space + pcs + bytes(12) + b"acsp" + bytes(28)
              + _s15(D50_WHITE[0]) + _s15(D50_WHITE[1]) + _s15(D50_WHITE[2]) + bytes(48))
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + data


_LINEAR_CURVE = b"curv" + bytes(4) + struct.pack(">IH", 1, 0x0100)  # gamma 1.0


def linear_rgb_icc(name="Linear RGB with sRGB primaries"):
    """sRGB primaries and white, but a *linear* tone curve: file value v means linear light v/255."""
    r, g, b = D50_SRGB.T
    return _icc(b"mntr", b"RGB ", b"XYZ ", [
        (b"desc", _desc_tag(name)), (b"wtpt", _xyz_tag(*D50_WHITE)),
        (b"rXYZ", _xyz_tag(*r)), (b"gXYZ", _xyz_tag(*g)), (b"bXYZ", _xyz_tag(*b)),
        (b"rTRC", _LINEAR_CURVE), (b"gTRC", _LINEAR_CURVE), (b"bTRC", _LINEAR_CURVE)])


def linear_grey_icc():
    return _icc(b"mntr", b"GRAY", b"XYZ ", [
        (b"desc", _desc_tag("Linear grey")), (b"wtpt", _xyz_tag(*D50_WHITE)), (b"kTRC", _LINEAR_CURVE)])


CYAN_LAB = (128, 100, 90)  # 8-bit Lab encoding: L* = 128*100/255, a* = 100-128, b* = 90-128


def cmyk_icc():
    """A CMYK input profile whose A2B0 is a 2x2x2x2 lut8 to Lab: paper white, K = black, and pure
    cyan mapped to CYAN_LAB (deliberately not what the naive conversion gives)."""
    corners = np.zeros((2, 2, 2, 2, 3), np.uint8)  # indexed [c, m, y, k], first input slowest
    corners[...] = (255, 128, 128)  # white
    corners[:, :, :, 1] = (0, 128, 128)  # any K -> black
    corners[1, 0, 0, 0] = CYAN_LAB
    identity = np.arange(256, dtype=np.uint8).tobytes()
    matrix = b"".join(_s15(1.0 if r == c else 0.0) for r in range(3) for c in range(3))
    lut = (b"mft1" + bytes(4) + bytes([4, 3, 2, 0]) + matrix + identity * 4
           + corners.tobytes() + identity * 3)
    return _icc(b"scnr", b"CMYK", b"Lab ", [
        (b"desc", _desc_tag("Test CMYK")), (b"wtpt", _xyz_tag(*D50_WHITE)), (b"A2B0", lut)])


def lab_from_encoding(enc):
    L8, a8, b8 = enc
    return (L8 * 100 / 255, a8 - 128, b8 - 128)


# -------------------------------------------------------------------------------- file helpers


def raw_png(path, width, height, colour_type, bit_depth, rows: bytes, extra_chunks=()):
    """Write a PNG by hand (Pillow cannot write 16-bit RGB)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    stride = len(rows) // height
    filtered = b"".join(b"\0" + rows[i * stride:(i + 1) * stride] for i in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + b"".join(chunk(k, d) for k, d in extra_chunks)
    body += chunk(b"IDAT", zlib.compress(filtered)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def noise(h, w, c=3):
    return RNG.integers(0, 256, (h, w, c), dtype=np.uint8)


def save(img, path, **kw):
    img.save(path, **kw)
    return path


def exif_with_orientation(value):
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


def assert_one_line_error(excinfo, path):
    msg = str(excinfo.value)
    assert "\n" not in msg
    assert str(path) in msg
    assert isinstance(excinfo.value, ValueError)
    assert excinfo.value.path == path


# --------------------------------------------------------------------------------- basic decode


@pytest.mark.parametrize("suffix, kw, exact", [
    (".png", {}, True), (".bmp", {}, True), (".tiff", {}, True), (".tif", {}, True),
    (".webp", {"lossless": True}, True),
    (".jpg", {"quality": 95, "subsampling": 0}, False), (".jpeg", {"quality": 95, "subsampling": 0}, False),
])
def test_rgb_formats(tmp_path, suffix, kw, exact):
    rgb = np.kron(noise(2, 3), np.ones((8, 8, 1), np.uint8))  # flat 8x8 blocks, so JPEG stays close
    path = save(Image.fromarray(rgb), tmp_path / f"x{suffix}", **kw)
    out = load_rgb(path)
    assert out.dtype == np.uint8 and out.shape == (16, 24, 3)
    if exact:
        np.testing.assert_array_equal(out, rgb)
    else:
        assert np.abs(out.astype(int) - rgb).mean() < 6


def test_gif_palette_decodes_exactly(tmp_path):
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]], np.uint8)
    rgb = colours[RNG.integers(0, 4, (6, 7))]
    path = save(Image.fromarray(rgb).quantize(colors=4), tmp_path / "x.gif")
    np.testing.assert_array_equal(load_rgb(path), rgb)


def test_accepts_str_path(tmp_path):
    rgb = noise(3, 3)
    path = save(Image.fromarray(rgb), tmp_path / "x.png")
    np.testing.assert_array_equal(load_rgb(str(path)), rgb)


def test_greyscale_and_bilevel(tmp_path):
    grey = RNG.integers(0, 256, (5, 6), dtype=np.uint8)
    out = load_rgb(save(Image.fromarray(grey), tmp_path / "g.png"))
    np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, axis=2))

    bits = RNG.integers(0, 2, (5, 6)).astype(bool)
    out = load_rgb(save(Image.fromarray(bits), tmp_path / "b.png"))
    assert Image.open(tmp_path / "b.png").mode == "1"
    np.testing.assert_array_equal(out, np.repeat(np.where(bits, 255, 0)[..., None], 3, axis=2))


# --------------------------------------------------------------------------------------- alpha


def test_rgba_composited_over_white_and_custom_background(tmp_path):
    rgb = noise(8, 8)
    alpha = RNG.integers(0, 256, (8, 8), dtype=np.uint8)
    alpha[0, 0], alpha[0, 1] = 0, 255
    path = save(Image.fromarray(np.dstack([rgb, alpha])), tmp_path / "a.png")

    white = load_rgb(path)
    np.testing.assert_array_equal(white, blend(rgb, alpha[..., None], 255))
    np.testing.assert_array_equal(white[0, 0], [255, 255, 255])  # fully transparent -> background
    np.testing.assert_array_equal(white[0, 1], rgb[0, 1])  # opaque -> untouched

    bg = (12, 200, 99)
    np.testing.assert_array_equal(load_rgb(path, background=bg), blend(rgb, alpha[..., None], np.array(bg)))


def test_rgba_hand_computed_pixel(tmp_path):
    # 200 * 128/255 + 255 * 127/255 = 227.39 ; 0 * 128/255 + 255 * 127/255 = 127.0
    path = save(Image.new("RGBA", (1, 1), (200, 0, 255, 128)), tmp_path / "p.png")
    np.testing.assert_array_equal(load_rgb(path)[0, 0], [227, 127, 255])


def test_la_composited(tmp_path):
    grey = RNG.integers(0, 256, (6, 6), dtype=np.uint8)
    alpha = RNG.integers(0, 256, (6, 6), dtype=np.uint8)
    path = save(Image.fromarray(np.dstack([grey, alpha])), tmp_path / "la.png")
    assert Image.open(path).mode == "LA"
    expected = blend(grey, alpha, 0)
    np.testing.assert_array_equal(load_rgb(path, background=(0, 0, 0)), np.repeat(expected[..., None], 3, 2))


def test_premultiplied_la_tiff(tmp_path):
    # Pillow writes ExtraSamples=2 (straight); patch it to 1 (associated alpha) so it reads as "La".
    buf = io.BytesIO()
    Image.new("LA", (2, 2), (100, 128)).save(buf, "TIFF")
    pattern = b"\x52\x01\x03\x00\x01\x00\x00\x00\x02\x00"  # tag 338, SHORT, count 1, value 2 (LE)
    assert buf.getvalue().count(pattern) == 1
    path = tmp_path / "la.tif"
    path.write_bytes(buf.getvalue().replace(pattern, pattern[:-2] + b"\x01\x00"))
    assert Image.open(path).mode == "La"
    # premultiplied over: c + (1 - a) * bg = 100 + 127/255 * 255 = 227 ; with bg 0 it stays 100
    np.testing.assert_array_equal(load_rgb(path)[0, 0], [227, 227, 227])
    np.testing.assert_array_equal(load_rgb(path, background=(0, 0, 0))[0, 0], [100, 100, 100])


def test_palette_with_transparent_index(tmp_path):
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (3 * 253)
    idx = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    img = Image.fromarray(idx)
    img = img.convert("P")
    img.putpalette(palette)
    for suffix in (".png", ".gif"):
        path = save(img, tmp_path / f"p{suffix}", transparency=1)
        out = load_rgb(path, background=(7, 8, 9))
        expected = np.array([[[255, 0, 0], [7, 8, 9], [0, 0, 255]], [[0, 0, 255], [7, 8, 9], [255, 0, 0]]])
        np.testing.assert_array_equal(out, expected)


def test_palette_with_partial_alpha(tmp_path):
    img = Image.fromarray(np.array([[0, 1, 2]], np.uint8)).convert("P")
    img.putpalette([200, 100, 50, 10, 20, 30, 0, 0, 0] + [0] * (3 * 253))
    path = save(img, tmp_path / "p.png", transparency=bytes([64, 255, 0]))  # tRNS alpha per entry
    out = load_rgb(path)
    expected = [blend([200, 100, 50], 64, 255), [10, 20, 30], [255, 255, 255]]
    np.testing.assert_array_equal(out[0], expected)


def test_colour_keys_for_grey_and_rgb(tmp_path):
    grey = np.array([[10, 20, 30]], np.uint8)
    out = load_rgb(save(Image.fromarray(grey), tmp_path / "g.png", transparency=20), background=(1, 2, 3))
    np.testing.assert_array_equal(out[0], [[10, 10, 10], [1, 2, 3], [30, 30, 30]])

    rgb = np.array([[[1, 2, 3], [4, 5, 6]]], np.uint8)
    path = save(Image.fromarray(rgb), tmp_path / "c.png", transparency=(4, 5, 6))
    out = load_rgb(path, background=(9, 9, 9))
    np.testing.assert_array_equal(out[0], [[1, 2, 3], [9, 9, 9]])


# ---------------------------------------------------------------------------- deep and float


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 32768, 65535, 257 * 100, 1000]], np.uint16)
    path = save(Image.fromarray(values), tmp_path / "g16.png")
    assert Image.open(path).mode.startswith("I")
    out = load_rgb(path)
    np.testing.assert_array_equal(out[0, :, 0], [0, 128, 255, 100, 4])  # 1000/257 = 3.89
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16bit_grey_tiff(tmp_path, mode):
    values = np.array([[0, 32768, 65535]], np.uint16)
    big_endian = mode.endswith("B")
    img = Image.frombytes(mode, (3, 1), values.astype(">u2" if big_endian else "<u2").tobytes())
    path = save(img, tmp_path / "g16.tif")
    assert Image.open(path).mode == mode
    np.testing.assert_array_equal(load_rgb(path)[0, :, 1], [0, 128, 255])


def test_32bit_int_tiff(tmp_path):
    ok = save(Image.fromarray(np.array([[0, 32768, 65535]], np.int32)), tmp_path / "i.tif")
    assert Image.open(ok).mode == "I"
    np.testing.assert_array_equal(load_rgb(ok)[0, :, 0], [0, 128, 255])

    bad = save(Image.fromarray(np.array([[0, 70000]], np.int32)), tmp_path / "big.tif")
    with pytest.raises(ImageError, match="16-bit range") as excinfo:
        load_rgb(bad)
    assert_one_line_error(excinfo, bad)


def test_16bit_grey_with_colour_key(tmp_path):
    rows = np.array([[1000, 65535]], ">u2").tobytes()
    path = raw_png(tmp_path / "k.png", 2, 1, 0, 16, rows, [(b"tRNS", struct.pack(">H", 1000))])
    np.testing.assert_array_equal(load_rgb(path, background=(5, 6, 7))[0], [[5, 6, 7], [255, 255, 255]])


def test_16bit_rgb_and_rgba_png(tmp_path):
    # Pillow reduces 16-bit colour PNGs to 8 bits itself; multiples of 257 are exact either way.
    rgb16 = (257 * np.array([[[255, 128, 0], [1, 2, 3]]])).astype(">u2")
    path = raw_png(tmp_path / "c16.png", 2, 1, 2, 16, rgb16.tobytes())
    np.testing.assert_array_equal(load_rgb(path), [[[255, 128, 0], [1, 2, 3]]])

    rgba16 = (257 * np.array([[[200, 0, 255, 128]]])).astype(">u2")
    path = raw_png(tmp_path / "a16.png", 1, 1, 6, 16, rgba16.tobytes())
    np.testing.assert_array_equal(load_rgb(path)[0, 0], [227, 127, 255])


def test_float_tiff(tmp_path):
    values = np.array([[0.0, 0.5, 1.0, 0.25, 1.0004, -0.0002]], np.float32)
    path = save(Image.fromarray(values), tmp_path / "f.tif")
    assert Image.open(path).mode == "F"
    np.testing.assert_array_equal(load_rgb(path)[0, :, 0], [0, 128, 255, 64, 255, 0])

    for name, bad in [("big", 2.0), ("neg", -0.5), ("nan", np.nan)]:
        path = save(Image.fromarray(np.array([[0.1, bad]], np.float32)), tmp_path / f"{name}.tif")
        with pytest.raises(ImageError, match=r"\[0, 1\]") as excinfo:
            load_rgb(path)
        assert_one_line_error(excinfo, path)


# ------------------------------------------------------------------------------ colour management


def test_embedded_srgb_profile_is_a_noop(tmp_path):
    rgb = noise(16, 16)
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    plain = save(Image.fromarray(rgb), tmp_path / "plain.png")
    tagged = save(Image.fromarray(rgb), tmp_path / "srgb.png", icc_profile=srgb)
    assert Image.open(tagged).info["icc_profile"]
    np.testing.assert_array_equal(load_rgb(tagged), load_rgb(plain))
    np.testing.assert_array_equal(load_rgb(tagged), rgb)


@pytest.mark.parametrize("suffix", [".png", ".tiff", ".webp"])
def test_non_srgb_profile_is_converted(tmp_path, suffix):
    ramp = np.arange(0, 256, dtype=np.uint8)
    rgb = np.stack([ramp, ramp[::-1], np.roll(ramp, 77)], axis=-1)[None]  # 1x256, all levels
    kw = {"lossless": True} if suffix == ".webp" else {}
    path = save(Image.fromarray(rgb), tmp_path / f"lin{suffix}", icc_profile=linear_rgb_icc(), **kw)
    assert Image.open(path).info.get("icc_profile")
    out = load_rgb(path).astype(int)
    expected = np.rint(255 * srgb_encode(rgb / 255.0))
    assert np.abs(out - expected).max() <= 1
    assert np.abs(out - rgb).max() > 50  # really differs from ignoring the profile


def test_grey_profile_is_converted(tmp_path):
    grey = np.array([[0, 16, 64, 128, 255]], np.uint8)
    path = save(Image.fromarray(grey), tmp_path / "g.png", icc_profile=linear_grey_icc())
    out = load_rgb(path).astype(int)
    expected = np.rint(255 * srgb_encode(grey / 255.0))
    assert np.abs(out[..., 0] - expected).max() <= 1
    np.testing.assert_array_equal(out[..., 0], out[..., 1])


def test_profile_conversion_keeps_alpha_separate(tmp_path):
    rgba = np.array([[[64, 64, 64, 255], [64, 64, 64, 0]]], np.uint8)
    path = save(Image.fromarray(rgba), tmp_path / "a.png", icc_profile=linear_rgb_icc())
    out = load_rgb(path, background=(0, 0, 255)).astype(int)
    assert abs(out[0, 0, 0] - round(255 * float(srgb_encode(64 / 255)))) <= 1
    np.testing.assert_array_equal(out[0, 1], [0, 0, 255])  # background is not colour-converted


def test_profile_named_srgb_is_trusted(tmp_path):
    # Behaviour choice: a profile that calls itself sRGB is not run through lcms (exact no-op).
    rgb = noise(4, 4)
    path = save(Image.fromarray(rgb), tmp_path / "s.png", icc_profile=linear_rgb_icc("sRGB IEC61966-2.1"))
    np.testing.assert_array_equal(load_rgb(path), rgb)


def test_broken_or_mismatched_profile_is_ignored(tmp_path):
    rgb = noise(4, 4)
    junk = save(Image.fromarray(rgb), tmp_path / "junk.png", icc_profile=b"not a profile at all" * 10)
    np.testing.assert_array_equal(load_rgb(junk), rgb)
    grey = RNG.integers(0, 256, (4, 4), dtype=np.uint8)
    mismatch = save(Image.fromarray(grey), tmp_path / "mm.png", icc_profile=linear_rgb_icc())
    np.testing.assert_array_equal(load_rgb(mismatch)[..., 0], grey)


def test_cmyk_jpeg_without_profile(tmp_path):
    cmyk = np.zeros((16, 32, 4), np.uint8)
    cmyk[:, :16] = (0, 255, 255, 0)  # red
    cmyk[:, 16:] = (0, 0, 0, 128)  # 50% black -> grey 127
    path = save(Image.frombytes("CMYK", (32, 16), cmyk.tobytes()), tmp_path / "cmyk.jpg", quality=100)
    assert Image.open(path).mode == "CMYK"
    out = load_rgb(path).astype(int)
    assert np.abs(out[:, :16] - [255, 0, 0]).max() <= 4
    assert np.abs(out[:, 16:] - [127, 127, 127]).max() <= 4


@pytest.mark.parametrize("suffix, kw, tol", [(".jpg", {"quality": 100}, 4), (".tiff", {}, 2)])
def test_cmyk_with_profile(tmp_path, suffix, kw, tol):
    cmyk = np.zeros((8, 24, 4), np.uint8)
    cmyk[:, :8] = (255, 0, 0, 0)  # pure cyan -> CYAN_LAB by the profile
    cmyk[:, 8:16] = (0, 0, 0, 0)  # paper white
    cmyk[:, 16:] = (0, 0, 0, 255)  # black
    img = Image.frombytes("CMYK", (24, 8), cmyk.tobytes())
    path = save(img, tmp_path / f"cmyk{suffix}", icc_profile=cmyk_icc(), **kw)
    assert Image.open(path).info.get("icc_profile")
    out = load_rgb(path).astype(int)
    cyan = lab_to_srgb8(lab_from_encoding(CYAN_LAB))
    assert np.abs(out[:, :8] - cyan).max() <= tol, (out[0, 0], cyan)
    assert np.abs(out[:, 8:16] - 255).max() <= tol
    assert np.abs(out[:, 16:]).max() <= tol
    assert np.abs(out[0, 0] - [0, 255, 255]).max() > 50  # not the naive conversion


def test_lab_tiff(tmp_path):
    lab = (128, 100, 90)
    path = save(Image.new("LAB", (2, 2), lab), tmp_path / "lab.tif")
    assert Image.open(path).mode == "LAB"
    assert np.abs(load_rgb(path)[0, 0].astype(int) - lab_to_srgb8(lab_from_encoding(lab))).max() <= 2


# -------------------------------------------------------------------------------- orientation


@pytest.mark.parametrize("orientation, k", [(1, 0), (3, 2), (6, -1), (8, 1)])
def test_exif_orientation_png(tmp_path, orientation, k):
    stored = np.zeros((4, 6, 3), np.uint8)
    stored[0, 0] = (255, 0, 0)  # mark the stored top-left corner
    stored[3, 5] = (0, 0, 255)
    path = save(Image.fromarray(stored), tmp_path / "o.png", exif=exif_with_orientation(orientation))
    out = load_rgb(path)
    np.testing.assert_array_equal(out, np.rot90(stored, k=k))  # k<0: clockwise


def test_exif_orientation_6_jpeg(tmp_path):
    stored = np.zeros((16, 32, 3), np.uint8)
    stored[:8, :8] = (255, 0, 0)  # top-left block red
    path = save(Image.fromarray(stored), tmp_path / "o.jpg", exif=exif_with_orientation(6), quality=95)
    out = load_rgb(path).astype(int)
    assert out.shape == (32, 16, 3)  # transposed
    # Orientation 6 = rotate 90 degrees clockwise for display: top-left goes to top-right.
    assert np.abs(out[:8, -8:] - [255, 0, 0]).mean() < 10
    assert np.abs(out[:8, :8]).mean() < 10


# -------------------------------------------------------------------------------- animations


def _frames():
    return [Image.new("RGB", (6, 5), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]


@pytest.mark.parametrize("suffix, kw", [(".gif", {}), (".webp", {"lossless": True}), (".png", {})])
def test_animation_gives_first_frame(tmp_path, suffix, kw):
    first, *rest = _frames()
    path = save(first, tmp_path / f"anim{suffix}", save_all=True, append_images=rest, duration=100, **kw)
    assert getattr(Image.open(path), "n_frames", 1) == 3
    out = load_rgb(path)
    assert out.shape == (5, 6, 3)
    np.testing.assert_array_equal(out, np.broadcast_to(np.array([255, 0, 0], np.uint8), (5, 6, 3)))


# ----------------------------------------------------------------------------------- failures


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_file(tmp_path, suffix):
    full = save(Image.fromarray(noise(64, 64)), tmp_path / f"full{suffix}")
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ImageError) as excinfo:
        load_rgb(path)
    assert_one_line_error(excinfo, path)
    assert "truncated" in str(excinfo.value) or "corrupt" in str(excinfo.value)


def test_random_bytes_empty_missing_and_directory(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(RNG.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    folder = tmp_path / "folder.png"
    folder.mkdir()
    cases = [(junk, "not an image"), (empty, "empty"),
             (tmp_path / "missing.png", "unreadable"), (folder, "unreadable")]
    for path, words in cases:
        with pytest.raises(ImageError, match=words) as excinfo:
            load_rgb(path)
        assert_one_line_error(excinfo, path)


def test_corrupt_png_crc_and_zero_size(tmp_path):
    good = save(Image.fromarray(noise(8, 8)), tmp_path / "good.png").read_bytes()
    bad_idat = bytearray(good)
    start = good.index(b"IDAT") + 8
    bad_idat[start:start + 8] = b"\xff" * 8
    bad = tmp_path / "bad.png"
    bad.write_bytes(bytes(bad_idat))
    zero = raw_png(tmp_path / "zero.png", 0, 1, 2, 8, b"")
    for path in (bad, zero):
        with pytest.raises(ImageError) as excinfo:
            load_rgb(path)
        assert_one_line_error(excinfo, path)


@pytest.mark.parametrize("side", [12, 20])  # 144 px: Pillow only warns; 400 px: Pillow raises
def test_decompression_bomb(tmp_path, monkeypatch, recwarn, side):
    path = save(Image.fromarray(noise(side, side)), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageError, match="decompression bomb") as excinfo:
        load_rgb(path)
    assert_one_line_error(excinfo, path)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_unexpected_decoder_exception_is_wrapped(tmp_path, monkeypatch):
    path = save(Image.fromarray(noise(4, 4)), tmp_path / "x.png")

    def boom(self, *a, **k):
        raise struct.error("unpack requires a buffer of 4 bytes\nsecond line")

    monkeypatch.setattr(Image.Image, "load", boom)
    with pytest.raises(ImageError, match="error: unpack requires") as excinfo:
        load_rgb(path)
    assert_one_line_error(excinfo, path)


def test_image_error_pickles_and_is_value_error(tmp_path):
    err = ImageError(tmp_path / "a.png", "truncated\nimage")
    assert isinstance(err, ValueError)
    assert str(err) == f"{tmp_path / 'a.png'}: truncated image"
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is ImageError and str(again) == str(err) and again.path == err.path


@pytest.mark.parametrize("bg", [(0, 0), (0, 0, 256), (-1, 0, 0), (0.5, 0, 0), "white"])
def test_bad_background_is_rejected(tmp_path, bg):
    path = save(Image.fromarray(noise(2, 2)), tmp_path / "x.png")
    with pytest.raises(ValueError, match="background"):
        load_rgb(path, background=bg)


# ------------------------------------------------------------------------------------ listing


def test_find_images(tmp_path):
    names = ["b/Z.PNG", "a.jpg", "b/c/d.JpEg", "e.webp", "f.bmp", "g.tif", "h.TIFF", "i.gif", "b/a.png"]
    ignored = ["notes.txt", "png", "x.png.bak", ".hidden.png", ".cache/k.png", "b/.ipynb_checkpoints/l.jpg"]
    for name in names + ignored:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "dir.png").mkdir()  # a folder named like an image is not an image
    found = find_images(tmp_path)
    assert found == sorted(tmp_path / n for n in names)
    assert all(isinstance(p, type(tmp_path)) for p in found)
    assert find_images(str(tmp_path)) == found
    assert {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"} <= set(IMAGE_SUFFIXES)


def test_find_images_hidden_root_and_errors(tmp_path):
    root = tmp_path / ".data"
    root.mkdir()
    (root / "x.png").write_bytes(b"")
    assert find_images(root) == [root / "x.png"]  # only names *below* root are filtered
    with pytest.raises(NotADirectoryError):
        find_images(tmp_path / "missing")
    with pytest.raises(NotADirectoryError):
        find_images(root / "x.png")


# ------------------------------------------------------------------------------------ writing


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]


def test_save_png_roundtrip_creates_parents_and_leaves_no_temp(tmp_path):
    rgb = noise(7, 9)
    target = tmp_path / "deep" / "er" / "out.png"
    assert save_png(target, rgb) == target
    np.testing.assert_array_equal(load_rgb(target), rgb)
    with Image.open(target) as im:
        assert im.format == "PNG" and im.mode == "RGB"
    assert _leftovers(target.parent) == []

    other = noise(3, 2)
    save_png(str(target), other[::1, ::-1])  # overwrite; non-contiguous input
    np.testing.assert_array_equal(load_rgb(target), other[:, ::-1])
    assert _leftovers(target.parent) == []


def test_save_png_respects_umask(tmp_path):
    old = os.umask(0o022)
    try:
        target = save_png(tmp_path / "p.png", noise(2, 2))
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_save_png_failure_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "out.png"
    original = noise(4, 4)
    save_png(target, original)

    def half_write_then_fail(self, fp, *a, **k):
        fp.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", half_write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_png(target, noise(4, 4))
    with pytest.raises(OSError, match="disk full"):
        save_png(tmp_path / "new.png", noise(4, 4))
    monkeypatch.undo()

    np.testing.assert_array_equal(load_rgb(target), original)  # old file untouched
    assert not (tmp_path / "new.png").exists()  # no partial new file
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8),
                                 np.zeros((4, 4, 3), np.float32), np.zeros((0, 4, 3), np.uint8)])
def test_save_png_rejects_bad_arrays(tmp_path, bad):
    with pytest.raises(ValueError):
        save_png(tmp_path / "x.png", bad)
    assert list(tmp_path.iterdir()) == []


def test_module_reuses_conventions():
    from fvae_core import conventions

    assert images.uint8_from_unit is conventions.uint8_from_unit
    assert images.unit_from_uint8 is conventions.unit_from_uint8
    assert "conventions" in images.__doc__
