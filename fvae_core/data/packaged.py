"""The built-in sources read from installed packages: ``photos`` (real photographs) and ``painterly``.

Nothing is downloaded at run time. Every image carries its licence, author and origin (package, version,
path inside the package), read from the package itself wherever it states them; ``prepare`` writes them
into the manifest.

``photos``
    PyPI, always installed (10): scikit-image's 8 colour photographs (licences from their docstrings,
    :data:`SKIMAGE_CREDITS`) and scikit-learn's 2 (``sklearn/datasets/images``, CC-BY-2.0, credits from
    the README.txt beside them). Debian, when found (+24): ``tuxpaint-data``'s 19 template photographs
    (GPL-2+, Bill Kendrick, from its machine-readable ``copyright``) and ``palapeli-data``'s 5 puzzle
    photographs (per-file author, licence and Commons page from the sibling ``.desktop`` files).
``painterly``
    Debian only: the story paintings of two Wesnoth campaigns, ``wesnoth-1.16-trow`` (19, 1920x1080) and
    ``wesnoth-1.16-httt`` (8, 640x480), GPL-2+, artists as each campaign's ``_main.cfg`` credits them.
    No PyPI package ships painted art with a recorded licence.

Each Debian package is looked for in the system root ``/`` (``apt-get install``), then in
``$FVAE_DEBIAN_ROOT`` (default: the project's ``.debian-data/``; empty: not at all). ``make debian-data``
fills that folder with ``apt-get download`` + ``dpkg-deb -x`` (:func:`fetch_debian`), which installs
nothing and pulls none of the packages' Depends (tuxpaint-data's would add 157 MB of stamps, Wesnoth's
the whole game), and records the versions it got in ``VERSIONS``. The survey that chose these packages
(every candidate image looked at) is summarised in ``docs/data.md``, "Sources and licences".
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable

from fvae_core.data.prepare import move_into_place
from fvae_core.data.sources import SKIMAGE_PHOTOS, SourceError, SourceItem

__all__ = ["DEBIAN_IMAGES", "PACKAGED_SOURCES", "SKIMAGE_CREDITS", "Credit", "DebianImages", "Packaged",
           "packages_fingerprint",
           "debian_roots", "debian_version", "fetch_debian", "project_debian_root", "resolve_packaged"]

#: Where ``apt-get install`` puts files; a module attribute so that tests can point it at a fake root.
SYSTEM_ROOT = Path("/")
#: The project's folder for ``make debian-data`` (git-ignored), unless ``$FVAE_DEBIAN_ROOT`` says otherwise.
DEFAULT_DEBIAN_DIR = Path(__file__).resolve().parents[2] / ".debian-data"
FETCH_HINT = "run `make debian-data`"


@dataclasses.dataclass(frozen=True)
class Credit:
    licence: str
    author: str = ""
    website: str = ""


#: scikit-image's photographs, as their ``skimage.data`` docstrings (0.26) credit them.
SKIMAGE_CREDITS = {
    "astronaut": Credit("Public domain", "NASA (Great Images database)", "https://flic.kr/p/r9qvLn"),
    "chelsea": Credit("CC0", "Stefan van der Walt"),
    "coffee": Credit("CC0", "Rachel Michetti (courtesy of Pikolo Espresso Bar)"),
    "rocket": Credit("Public domain", "SpaceX",
                     "https://www.flickr.com/photos/spacexphotos/16511594820/in/photostream/"),
    "hubble_deep_field": Credit("Public domain", "NASA",
                                "http://hubblesite.org/newscenter/archive/releases/2012/37/image/a/"),
    "immunohistochemistry": Credit("No known copyright restrictions",
                                   "Center for Microscopy And Molecular Imaging (CMMI)"),
    "retina": Credit("CC0-1.0", "Mikael Häggström",
                     "https://commons.wikimedia.org/wiki/File:Fundus_photograph_of_normal_left_eye.jpg"),
    "stereo_motorcycle": Credit("not stated by scikit-image (Middlebury 2014 stereo benchmark)",
                                "N. Nesic, P. Westling, X. Wang, Y. Kitajima, G. Krathwohl, D. Scharstein "
                                "(Middlebury College)"),
}


@dataclasses.dataclass(frozen=True)
class DebianImages:
    """The images one Debian package ships in one folder, and how to read their credits."""

    package: str
    folder: str  # inside the package (and the root it is unpacked or installed in)
    pattern: str
    credit: Callable[[Path, Path], Credit]  # (root, image path) -> its credit


# ---- reading the packages' own credits -------------------------------------------------------------


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _deb822(stanza: str) -> dict[str, str]:
    """One stanza of a Debian control-style file; continuation lines are joined with newlines."""
    fields, key = {}, None
    for line in stanza.splitlines():
        if line[:1] in (" ", "\t") and key is not None:
            fields[key] += "\n" + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            key = key.strip()
            fields[key] = value.strip()
    return fields


def _stanzas(text: str) -> list[dict[str, str]]:
    return [_deb822(s) for s in re.split(r"\n[ \t]*\n", text) if s.strip()]


def _dep5_credit(package: str, fallback: Credit) -> Callable[[Path, Path], Credit]:
    """The ``Files: *`` stanza of the package's machine-readable ``copyright``, else ``fallback``."""

    def read(root: Path, image: Path) -> Credit:
        text = _text(root / "usr/share/doc" / package / "copyright")
        if not text.startswith("Format:"):
            return fallback
        head = _deb822(re.split(r"\n[ \t]*\n", text)[0])
        for f in _stanzas(text):
            if f.get("Files", "").split() == ["*"]:
                return Credit(f.get("License", "").split("\n")[0] or fallback.licence,
                              "; ".join(f.get("Copyright", "").split("\n")) or fallback.author,
                              head.get("Source", fallback.website))
        return fallback

    return read


def _desktop_credit(fallback: Credit) -> Callable[[Path, Path], Credit]:
    """KDE puzzle metadata: ``X-KDE-PluginInfo-{Author,License,Website}`` in the image's ``.desktop``."""

    def read(root: Path, image: Path) -> Credit:
        keys = dict(re.findall(r"^X-KDE-PluginInfo-(Author|License|Website)=(.*?)\s*$",
                               _text(image.with_suffix(".desktop")), re.M))
        return Credit(keys.get("License") or fallback.licence, keys.get("Author") or fallback.author,
                      keys.get("Website", ""))

    return read


def _wesnoth_credit(licence: str) -> Callable[[Path, Path], Credit]:
    """The campaign's ``[about] title = _ "Artwork and Graphics Design"`` entries in its ``_main.cfg``
    (``<campaign>/images/story/x.jpg`` -> ``<campaign>/_main.cfg``). Wesnoth credits artists per campaign,
    not per picture, so every painting of a campaign gets the campaign's list."""

    def read(root: Path, image: Path) -> Credit:
        cfg = _text(image.parents[2] / "_main.cfg")
        artists = []
        for about in re.findall(r"\[about\](.*?)\[/about\]", cfg, re.S):
            if re.search(r'title\s*=\s*_?\s*"Artwork and Graphics Design"', about):
                for entry in re.findall(r"\[entry\](.*?)\[/entry\]", about, re.S):
                    name = re.search(r'name\s*=\s*"([^"]*)"', entry)
                    comment = re.search(r'comment\s*=\s*"([^"]*)"', entry)
                    if name:
                        artists.append(name[1] + (f": {comment[1]}" if comment else ""))
        author = ("campaign artwork credits: " + "; ".join(artists)) if artists else "the Battle for Wesnoth artists"
        return Credit(licence, author, "https://www.wesnoth.org/")

    return read


_WESNOTH = "usr/share/games/wesnoth/1.16/data/campaigns"
# Wesnoth's copyright file is not machine-readable; it says "GNU General Public License version 2 or at your
# option any later version" for the whole game, art included.
DEBIAN_IMAGES = {
    "photos": (
        DebianImages("tuxpaint-data", "usr/share/tuxpaint/templates", "*.jpg",
                     _dep5_credit("tuxpaint-data", Credit("GPL-2+", "Bill Kendrick"))),
        DebianImages("palapeli-data", "usr/share/palapeli/collection", "*.jpg",
                     _desktop_credit(Credit("GPL-2+", "the Palapeli authors"))),
    ),
    "painterly": (
        DebianImages("wesnoth-1.16-trow", f"{_WESNOTH}/The_Rise_Of_Wesnoth/images/story", "*.jpg",
                     _wesnoth_credit("GPL-2+")),
        DebianImages("wesnoth-1.16-httt", f"{_WESNOTH}/Heir_To_The_Throne/images/story", "httt_story*.jpg",
                     _wesnoth_credit("GPL-2+")),
    ),
}
PACKAGED_SOURCES = tuple(DEBIAN_IMAGES)
DEBIAN_PACKAGES = tuple(d.package for group in DEBIAN_IMAGES.values() for d in group)


# ---- where the Debian packages are -----------------------------------------------------------------


def project_debian_root() -> Path | None:
    """``$FVAE_DEBIAN_ROOT`` when set (an empty value: none), else the project's ``.debian-data``."""
    env = os.environ.get("FVAE_DEBIAN_ROOT")
    if env is None:
        return DEFAULT_DEBIAN_DIR
    return Path(env).expanduser() if env else None


def debian_roots() -> list[Path]:
    """The roots searched, in order: the system's, then the project's."""
    project = project_debian_root()
    return [SYSTEM_ROOT] + ([project] if project is not None else [])


def _versions_file(root: Path) -> dict[str, str]:
    out = {}
    for line in _text(root / "VERSIONS").splitlines():
        name, _, ver = line.strip().partition(" ")
        if name:
            out[name] = ver.strip()
    return out


def debian_version(root: Path, package: str) -> str:
    """The package's version in ``root``: from ``VERSIONS`` (``make debian-data``) or dpkg's status file."""
    if ver := _versions_file(root).get(package):
        return ver
    status = root / "var/lib/dpkg/status"
    if status.is_file():
        for f in _stanzas(_text(status)):
            if f.get("Package") == package and f.get("Status", "").endswith(" installed"):
                return f.get("Version", "")
    return ""


def _dist_version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


# ---- resolving a source ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Packaged:
    """A resolved packaged source: its items, and which packages gave them or were not found."""

    source: str
    items: tuple[SourceItem, ...]
    found: tuple[str, ...]  # e.g. "19 tuxpaint-data 1:0.9.28-sdl2-1 (Debian)"
    missing: tuple[str, ...]  # e.g. "palapeli-data not found (run `make debian-data`)"

    def line(self) -> str:
        """One line for the user's log: what was used, what was not found."""
        return f"{self.source}: " + ", ".join(self.found + self.missing)


def packages_fingerprint(sources) -> list[list[str]]:
    """What the packaged sources among ``sources`` resolve to here: ``[source, "19 tuxpaint-data 1:0.9.28-…
    (Debian)", …]`` per source, the found packages with their counts and versions only (not the log's
    wording), for the cache keys of prepared data and evaluations. Raises :class:`SourceError`."""
    out = []
    for src in dict.fromkeys(map(str, sources)):
        if src in PACKAGED_SOURCES:
            p = resolve_packaged(src)
            out.append([src, *p.found])
    return out


def _item(source, name, kind, ref, credit: Credit, origin: str) -> SourceItem:
    origin += f"; {credit.website}" if credit.website else ""
    return SourceItem(source, name, kind, ref, licence=credit.licence, author=credit.author, origin=origin)


def _skimage_items(source: str) -> list[SourceItem]:
    ver = _dist_version("scikit-image")
    return [_item(source, n, "skimage", n, SKIMAGE_CREDITS[n], f"scikit-image {ver} (PyPI): skimage.data.{n}()")
            for n in SKIMAGE_PHOTOS]


def _sklearn_credits(readme: str) -> dict[str, Credit]:
    """scikit-learn's ``datasets/images/README.txt``: per ``Image:`` block, the licence link [1], the
    ``Attribution:`` line with the photographer's page [2] and the photo's page [3], kept verbatim (the
    flower's attribution names one Flickr user and links another)."""
    out = {}
    for block in re.split(r"^Image:\s*", readme, flags=re.M)[1:]:
        name, _, body = block.partition("\n")
        refs = dict(re.findall(r"^\[(\d+)\]\s*(\S+)", body, re.M))
        cc = re.search(r"creativecommons\.org/licenses/([a-z-]+)/(\d\.\d)", refs.get("1", ""))
        attribution = re.search(r"^Attribution:\s*(.+?)(?:\s*\[\d+\])?\s*$", body, re.M)
        out[name.strip()] = Credit(f"CC-{cc[1].upper()}-{cc[2]}" if cc else refs.get("1", ""),
                                   (attribution[1] if attribution else "")
                                   + (f" ({refs['2']})" if "2" in refs else ""), refs.get("3", ""))
    return out


def _sklearn_items(source: str) -> list[SourceItem] | None:
    """scikit-learn's sample photographs, found without importing scikit-learn (which takes seconds)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    pkg = Path(list(spec.submodule_search_locations)[0])
    folder = pkg / "datasets" / "images"
    files = sorted(folder.glob("*.jpg"))
    if not files:
        return None
    credits, ver = _sklearn_credits(_text(folder / "README.txt")), _dist_version("scikit-learn")
    return [_item(source, f"scikit-learn/{p.name}", "package", str(p), credits.get(p.name, Credit("")),
                  f"scikit-learn {ver} (PyPI): {p.relative_to(pkg.parent).as_posix()}") for p in files]


def _debian_items(source: str, spec: DebianImages, roots) -> tuple[list[SourceItem], str]:
    for root in roots:
        files = sorted((Path(root) / spec.folder).glob(spec.pattern))
        if files:
            ver = debian_version(Path(root), spec.package) or "(version unknown)"
            items = [_item(source, f"{spec.package}/{p.name}", "package", str(p), spec.credit(Path(root), p),
                           f"{spec.package} {ver} (Debian): /{spec.folder}/{p.name}") for p in files]
            return items, ver
    return [], ""


def resolve_packaged(source: str, roots=None) -> Packaged:
    """The items of the built-in ``photos`` or ``painterly`` source, searching ``roots`` (default
    :func:`debian_roots`) for the Debian packages. Raises :class:`SourceError` when ``painterly``
    finds no package (``photos`` always has the PyPI ones)."""
    if source not in DEBIAN_IMAGES:
        raise ValueError(f"{source!r} is not a packaged source ({', '.join(PACKAGED_SOURCES)})")
    roots = debian_roots() if roots is None else list(roots)
    items, found, missing = [], [], []
    if source == "photos":
        items += _skimage_items(source)
        found.append(f"{len(items)} scikit-image {_dist_version('scikit-image')} (PyPI)")
        sk = _sklearn_items(source)
        if sk:
            items += sk
            found.append(f"{len(sk)} scikit-learn {_dist_version('scikit-learn')} (PyPI)")
        else:
            missing.append("scikit-learn not found (pip install scikit-learn)")
    for spec in DEBIAN_IMAGES[source]:
        got, ver = _debian_items(source, spec, roots)
        items += got
        if got:
            found.append(f"{len(got)} {spec.package} {ver} (Debian)")
        else:
            missing.append(f"{spec.package} not found ({FETCH_HINT})")
    if not items:
        packages = ", ".join(s.package for s in DEBIAN_IMAGES[source])
        raise SourceError(f"{source}: no packaged paintings found; {FETCH_HINT} (Debian: {packages})"
                          if source == "painterly" else f"{source}: no packaged images found")
    return Packaged(source, tuple(items), tuple(found), tuple(missing))


# ---- make debian-data ------------------------------------------------------------------------------


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


def fetch_debian(dest=None, packages=DEBIAN_PACKAGES, *, log: Callable = print) -> bool:
    """``make debian-data``: ``apt-get download`` the packages and ``dpkg-deb -x`` them into ``dest``
    (default :func:`project_debian_root`), with their versions in ``dest/VERSIONS``.

    Idempotent (a ``dest`` that lists every package is kept) and atomic (everything is unpacked into a
    temporary sibling folder that is renamed at the end). Without apt-get, or when it fails (no network,
    empty package lists), logs one line and returns False; it never raises for that, so ``make demo``
    goes on with the PyPI photos.
    """
    dest = Path(dest) if dest is not None else (project_debian_root() or DEFAULT_DEBIAN_DIR)
    have = _versions_file(dest)
    if packages and all(p in have for p in packages):
        log(f"debian-data: {dest} already holds " + ", ".join(f"{p} {have[p]}" for p in packages))
        return True
    absent = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if absent:
        log(f"debian-data: skipped, {' and '.join(absent)} not found (not a Debian/Ubuntu machine); "
            "`photos` uses the PyPI photographs only and `painterly` is unavailable")
        return False
    t0 = time.perf_counter()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        debs = tmp / ".debs"
        debs.mkdir()
        r = subprocess.run(["apt-get", "download", *packages], cwd=debs, capture_output=True, text=True)
        if r.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
            # a fresh machine's package lists are empty: as root, read them once and try again
            log("debian-data: apt-get download failed; running `apt-get update` once and retrying")
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
            r = subprocess.run(["apt-get", "download", *packages], cwd=debs, capture_output=True, text=True)
        if r.returncode != 0:
            log(f"debian-data: skipped, `apt-get download` failed ({_last_line(r.stderr or r.stdout)}); "
                "without network access or package lists (`apt-get update`) `photos` uses the PyPI "
                "photographs only")
            return False
        versions = {}
        for deb in sorted(debs.glob("*.deb")):
            fields = _deb822(subprocess.run(["dpkg-deb", "-f", str(deb), "Package", "Version"], check=True,
                                            capture_output=True, text=True).stdout)
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True, capture_output=True, text=True)
            versions[fields["Package"]] = fields["Version"]
        if sorted(versions) != sorted(packages):
            log(f"debian-data: skipped, apt-get downloaded {', '.join(sorted(versions)) or 'nothing'} "
                f"instead of {', '.join(packages)}")
            return False
        shutil.rmtree(debs)
        (tmp / "VERSIONS").write_text("".join(f"{p} {versions[p]}\n" for p in packages), encoding="utf-8")
        move_into_place(tmp, dest)
    except subprocess.CalledProcessError as e:
        log(f"debian-data: skipped, `{' '.join(map(str, e.cmd[:2]))}` failed ({_last_line(e.stderr)})")
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    log(f"debian-data: unpacked " + ", ".join(f"{p} {versions[p]}" for p in packages)
        + f" into {dest} in {time.perf_counter() - t0:.0f} s")
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fvae_core.data.packaged",
                                 description="Fetch the Debian packages of the built-in photos/painterly sources.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fetch", help="apt-get download + dpkg-deb -x into --dest (what `make debian-data` runs)")
    p.add_argument("--dest", default=None, help="default: $FVAE_DEBIAN_ROOT or the project's .debian-data")
    p.add_argument("packages", nargs="*", default=list(DEBIAN_PACKAGES))
    p = sub.add_parser("list", help="print what the photos and painterly sources resolve to here")
    args = ap.parse_args(argv)
    if args.command == "fetch":
        fetch_debian(args.dest, tuple(args.packages))
        return 0
    for source in PACKAGED_SOURCES:
        try:
            print(resolve_packaged(source).line())
        except SourceError as e:
            print(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
