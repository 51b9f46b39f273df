"""Tests for ``fvae data prepare`` (fvae_core.data.prepare, the sources of fvae_core.data, the CLI command).

The main fixture is :mod:`corpus`: a folder of bad and odd files whose expected pixels and skip
reasons are known by construction. Stored records are read back with grain's ArrayRecord source
(as the loader does) and with array_record's reader at the manifest's shard and record. The split
rule, content hashes, renders and resizes are recomputed here with hashlib, resvg, Pillow and
integer maths, never with the code under test.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from corpus import write_corpus
from fvae_core import cli
from fvae_core.data import sources as data
from fvae_core.data import SourceError, render_svg
from fvae_core.data.prepare import NothingUsable, PrepareConfig, _ShardWriter, prepare
from test_images import blend

CROP = 64
BOMB_PIXELS = 100_000
BG = (12, 200, 99)  # not white, so a wrong background shows
VAL_FRACTION = 0.3


def corpus_cfg(**kw) -> PrepareConfig:
    base = dict(min_side=CROP, max_pixels=BOMB_PIXELS, background=BG, val_fraction=VAL_FRACTION)
    return PrepareConfig(**(base | kw))


def run(specs, out, cfg, **kw):
    return prepare([str(s) for s in specs], out, cfg, workers=kw.pop("workers", 0), progress=False, **kw)


# --------------------------------------------------------------------------- independent readers


def read_outputs(out: Path) -> SimpleNamespace:
    return SimpleNamespace(
        meta=json.loads((out / "dataset.json").read_text()),
        manifest=[json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()],
        report=json.loads((out / "report.json").read_text()),
        text=(out / "report.txt").read_text())


def decode_png(record: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(record)) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        return np.asarray(im)


def stored_records(out: Path) -> dict[str, bytes]:
    """{item label: record bytes}, read at the manifest's split index (as the loader does) and
    checked against the same record read at the manifest's shard and record number."""
    import grain
    from array_record.python.array_record_module import ArrayRecordReader

    o = read_outputs(out)
    records = {}
    for split, info in o.meta["splits"].items():
        rows = [r for r in o.manifest if r["split"] == split]
        assert [r["index"] for r in rows] == list(range(info["count"]))
        if not rows:
            assert info["shards"] == []
            continue
        source = grain.sources.ArrayRecordDataSource([str(out / s) for s in info["shards"]])
        assert len(source) == info["count"]
        for r in rows:
            reader = ArrayRecordReader(str(out / r["shard"]), "readahead_buffer_size:0")
            try:
                assert reader.read([r["record"]])[0] == source[r["index"]]
            finally:
                reader.close()
            records[r["item"]] = source[r["index"]]
    return records


def hash_fraction(data: bytes) -> float:
    return int(hashlib.sha256(data).hexdigest()[:16], 16) / 2.0**64


def expected_splits(contents: dict, val_fraction: float) -> dict:
    """The documented rule, reimplemented: contents is {key: (source, bytes)} of the used images."""
    frac = {k: hash_fraction(b) for k, (_, b) in contents.items()}
    split = {k: "val" if f < val_fraction else "train" for k, f in frac.items()}
    if val_fraction > 0:
        for src in {s for s, _ in contents.values()}:
            keys = [k for k, (s, _) in contents.items() if s == src]
            if len(keys) >= 2 and all(split[k] == "train" for k in keys):
                split[min(keys, key=frac.get)] = "val"
    return split


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------------------- the corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    src = root / "src"
    expect = write_corpus(src, crop=CROP, bomb_pixels=BOMB_PIXELS, background=BG)
    out = root / "out"
    report = run([src], out, corpus_cfg())
    return SimpleNamespace(root=root, src=src, expect=expect, out=out, report=report, files=read_outputs(out),
                           records=stored_records(out))


def names_with(expect, status):
    return {n for n, e in expect.items() if e.status == status}


def test_corpus_is_what_it_claims(corpus):
    """Guard the fixture itself: each odd file really is the odd case it stands for."""
    src, expect = corpus.src, corpus.expect
    assert len([n for n in expect if (src / n).is_file()]) >= 14
    with Image.open(src / "cmyk.jpg") as im:
        assert im.mode == "CMYK" and im.info.get("icc_profile")
    with Image.open(src / "grey_alpha.png") as im:
        assert im.mode == "LA"
    with Image.open(src / "palette_trns.png") as im:
        assert im.mode == "P" and im.info.get("transparency") == 1
    with Image.open(src / "anim.gif") as im:
        assert im.n_frames == 3
    with Image.open(src / "exif6.png") as im:
        assert im.getexif()[0x0112] == 6
    with Image.open(src / "rgb16.png") as im:
        assert im.tile[0].args == "RGB;16B"
    with Image.open(src / "linear_icc.png") as im:
        assert im.info.get("icc_profile")
    with Image.open(src / "jpeg_named.png") as im:
        assert im.format == "JPEG"
    with Image.open(src / "bomb.png") as im:
        assert BOMB_PIXELS < im.width * im.height < 2 * BOMB_PIXELS  # Pillow itself only warns here
    assert (src / "empty.png").stat().st_size == 0
    assert (src / "plain.png").read_bytes() == (src / "plain_copy.png").read_bytes()
    # The expected pixels really differ from the naive decodes they guard against.
    with Image.open(src / "exif6.png") as im:
        assert expect["exif6.png"].pixels.shape[:2] == (im.width, im.height) != (im.height, im.width)
    with Image.open(src / "linear_icc.png") as im:
        assert np.abs(np.asarray(im).astype(int) - expect["linear_icc.png"].pixels).max() > 50


def test_corpus_used_images_have_the_expected_pixels(corpus):
    by_name = {r["name"]: r for r in corpus.files.manifest}
    assert set(by_name) == names_with(corpus.expect, "used")
    assert corpus.report.used == len(by_name)
    for name, row in by_name.items():
        want = corpus.expect[name]
        got = decode_png(corpus.records[row["item"]])
        assert got.shape == want.pixels.shape, name
        assert (row["height"], row["width"]) == got.shape[:2] == (row["orig_height"], row["orig_width"])
        diff = np.abs(got.astype(int) - want.pixels.astype(int)).max()
        assert diff <= want.tol, f"{name}: off by {diff} > {want.tol}"


def test_corpus_bad_files_are_skipped_with_reasons(corpus):
    src, expect, report = corpus.src, corpus.expect, corpus.report
    skipped = {Path(s["item"]).relative_to(src).as_posix(): s for s in report.skipped}
    assert set(skipped) == names_with(expect, "skipped")
    for name, s in skipped.items():
        assert s["source"] == str(src)
        assert re.search(expect[name].reason, s["reason"]), (name, s["reason"])
        assert "\n" not in s["reason"]
        assert f"  {s['item']}: {s['reason']}" in corpus.files.text.splitlines()
    assert report.ignored == {str(src): [str(src / n) for n in sorted(names_with(expect, "ignored"))]}
    assert corpus.files.report["ignored"] == report.ignored
    assert "notes.txt" in corpus.files.text
    # Hidden files and folders appear nowhere.
    everything = corpus.files.text + json.dumps(corpus.files.report) + "".join(map(json.dumps, corpus.files.manifest))
    for name in names_with(expect, "hidden"):
        assert Path(name).name not in everything


def test_corpus_warnings_and_notes(corpus):
    warned = {Path(w["item"]).relative_to(corpus.src).as_posix(): w["note"] for w in corpus.report.warnings}
    wanted = {n: e.warning for n, e in corpus.expect.items() if e.warning}
    assert wanted and set(warned) == set(wanted)
    for name, pattern in wanted.items():
        assert re.search(pattern, warned[name])
        assert re.search(pattern, corpus.files.text)
    notes = {r["name"]: " | ".join(r["notes"]) for r in corpus.files.manifest}
    assert "orientation 6" in notes["exif6.png"]
    assert "ICC" in notes["linear_icc.png"] and "ICC" in notes["cmyk.jpg"]
    assert "transparency composited over (12, 200, 99)" in notes["palette_trns.png"]
    assert notes["plain.png"] == ""


def test_corpus_counts_agree_everywhere(corpus):
    f, expect, src = corpus.files, corpus.expect, str(corpus.src)
    used, skipped = names_with(expect, "used"), names_with(expect, "skipped")
    per = {"found": len(used) + len(skipped), "used": len(used), "skipped": len(skipped)}
    assert {k: corpus.report.per_source[src][k] for k in per} == per
    assert f.report["per_source"] == corpus.report.per_source
    counts = {s: sum(r["split"] == s for r in f.manifest) for s in ("train", "val")}
    assert counts == corpus.report.splits == f.report["splits"]
    assert counts == {s: v["count"] for s, v in f.meta["splits"].items()}
    assert corpus.report.per_source[src]["train"] == counts["train"]
    assert corpus.report.per_source[src]["val"] == counts["val"]
    assert f.report["used"] == len(f.manifest) == len(used) == corpus.report.used
    assert len(f.report["skipped"]) == len(skipped)
    first = f.text.splitlines()[0]
    assert first.startswith(f"prepared {len(used)} image(s) into ")
    assert f"train {counts['train']}, val {counts['val']}" in first
    assert f"found {per['found']}, used {per['used']}" in f.text and f"skipped {len(skipped)} file(s):" in f.text
    assert f.meta["format"] == "fvae-prepared/1" and f.meta["sources"] == [src]
    assert f.meta["settings"]["background"] == list(BG) and f.meta["settings"]["max_pixels"] == BOMB_PIXELS


def test_corpus_manifest_rows(corpus):
    rows = corpus.files.manifest
    for r in rows:
        path = Path(r["item"])
        assert path == corpus.src / r["name"] and r["source"] == str(corpus.src)
        assert r["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        h, w = decode_png(corpus.records[r["item"]]).shape[:2]
        assert (r["height"], r["width"]) == (h, w)
    modes = {r["name"]: r["mode"] for r in rows}
    assert (modes["cmyk.jpg"], modes["grey_alpha.png"], modes["palette_trns.png"]) == ("CMYK", "LA", "P")


def test_corpus_split_follows_the_documented_rule(corpus):
    rows = corpus.files.manifest
    contents = {r["name"]: (r["source"], (corpus.src / r["name"]).read_bytes()) for r in rows}
    assert {r["name"]: r["split"] for r in rows} == expected_splits(contents, VAL_FRACTION)
    assert {r["split"] for r in rows} == {"train", "val"}


# ------------------------------------------------------------------------------ validation split


def write_noise_pngs(folder: Path, names, seed: int, side: int = 16) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    out = {}
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)
        out[name] = path.read_bytes()
    return out


def split_by_hash(out: Path) -> dict[str, str]:
    return {r["sha256"]: r["split"] for r in read_outputs(out).manifest}


def test_split_is_stable_under_renames_and_additions(tmp_path):
    cfg = PrepareConfig(min_side=8, val_fraction=0.25)
    first = write_noise_pngs(tmp_path / "a", [f"img{i:02d}.png" for i in range(16)], seed=1)
    fractions = [hash_fraction(b) for b in first.values()]
    assert 0 < sum(f < 0.25 for f in fractions) < 16  # the rule itself gives val: no fallback involved
    run([tmp_path / "a"], tmp_path / "out1", cfg)
    before = split_by_hash(tmp_path / "out1")
    assert set(before.values()) == {"train", "val"}

    # Same contents under new names and folders (reverse order), plus 12 new images.
    renamed = tmp_path / "b"
    for i, content in enumerate(reversed(list(first.values()))):
        (renamed / f"z{i % 3}").mkdir(parents=True, exist_ok=True)
        (renamed / f"z{i % 3}" / f"renamed_{i}.PNG").write_bytes(content)
    added = write_noise_pngs(renamed, [f"new{i}.png" for i in range(12)], seed=2)
    run([renamed], tmp_path / "out2", cfg)
    after = split_by_hash(tmp_path / "out2")
    assert {h: after[h] for h in before} == before
    contents = {hashlib.sha256(b).hexdigest(): ("b", b) for b in list(first.values()) + list(added.values())}
    assert after == expected_splits(contents, 0.25)


def test_split_fallback_and_zero_fraction(tmp_path):
    a = write_noise_pngs(tmp_path / "a", [f"{i}.png" for i in range(4)], seed=3)
    b = write_noise_pngs(tmp_path / "b", [f"{i}.png" for i in range(3)], seed=4)
    c = write_noise_pngs(tmp_path / "c", ["only.png"], seed=5)
    tiny = 1e-9  # no hash falls below this: every source with >= 2 images gets its smallest hash as val
    report = run([tmp_path / "a", tmp_path / "b", tmp_path / "c"], tmp_path / "out", PrepareConfig(
        min_side=8, val_fraction=tiny))
    assert {s: (v["train"], v["val"]) for s, v in report.per_source.items()} == {
        str(tmp_path / "a"): (3, 1), str(tmp_path / "b"): (2, 1), str(tmp_path / "c"): (1, 0)}
    rows = read_outputs(tmp_path / "out").manifest
    val = {r["sha256"] for r in rows if r["split"] == "val"}
    smallest = {min((hashlib.sha256(x).hexdigest() for x in group.values()), key=lambda h: int(h[:16], 16))
                for group in (a, b)}
    assert val == smallest

    report = run([tmp_path / "a", tmp_path / "b"], tmp_path / "out0", PrepareConfig(min_side=8, val_fraction=0.0))
    meta = read_outputs(tmp_path / "out0").meta
    assert report.splits == {"train": 7, "val": 0}
    assert meta["splits"]["val"] == {"count": 0, "shards": []}
    assert sorted(p.name for p in (tmp_path / "out0").glob("val-*")) == []


def noise_png_bytes(seed: int, side: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_fallback_is_chosen_among_used_images(tmp_path):
    """A skipped file can neither be the fallback validation image nor stand in for one."""
    # (a) No hash is below the fraction and the smallest hash is an undecodable file.
    good = {f"good{i}.png": noise_png_bytes(i) for i in range(2)}
    junk = next(b for b in (f"junk {i}".encode() for i in range(1000))
                if hash_fraction(b) < min(map(hash_fraction, good.values())))
    # (b) The only file below the fraction is undecodable (as coffee is for photos at --min-side 512).
    fraction = 0.5
    good_b = {f"good{i}.png": b for i, b in enumerate(b for b in map(noise_png_bytes, range(100, 200))
                                                      if hash_fraction(b) >= fraction) if i < 3}
    junk_b = next(b for b in (f"junk {i}".encode() for i in range(1000)) if hash_fraction(b) < fraction)
    for case, files, bad, val_fraction in [("a", good, junk, 1e-9), ("b", good_b, junk_b, fraction)]:
        folder = tmp_path / case
        folder.mkdir()
        for name, content in files.items():
            (folder / name).write_bytes(content)
        (folder / "bad.png").write_bytes(bad)
        report = run([folder], tmp_path / f"out_{case}", PrepareConfig(min_side=8, val_fraction=val_fraction))
        assert [Path(s["item"]).name for s in report.skipped] == ["bad.png"]
        rows = read_outputs(tmp_path / f"out_{case}").manifest
        assert {r["name"]: r["split"] for r in rows} == expected_splits(
            {n: ("x", b) for n, b in files.items()}, val_fraction)
        assert report.splits == {"train": len(files) - 1, "val": 1}


# -------------------------------------------------------------------------------- atomic output


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    src = tmp_path / "src"
    write_noise_pngs(src, [f"{i}.png" for i in range(6)], seed=6)
    real_write, calls = _ShardWriter.write, []

    def failing_write(self, record):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return real_write(self, record)

    monkeypatch.setattr(_ShardWriter, "write", failing_write)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk on fire"):
        run([src], out, PrepareConfig(min_side=8))
    assert len(calls) == 3  # it really failed mid-way, after writing records
    assert not out.exists() and leftovers(tmp_path) == []

    # An existing dataset survives a failed overwrite untouched.
    monkeypatch.undo()
    run([src], out, PrepareConfig(min_side=8))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls.clear()
    monkeypatch.setattr(_ShardWriter, "write", failing_write)
    with pytest.raises(RuntimeError, match="disk on fire"):
        run([src], out, PrepareConfig(min_side=8, val_fraction=0.5), overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(tmp_path) == []


def test_existing_output_needs_overwrite(tmp_path):
    src = tmp_path / "src"
    write_noise_pngs(src, ["a.png", "b.png"], seed=7)
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite"):
        run([src], out, PrepareConfig(min_side=8))
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert (out / "precious.txt").read_text() == "keep me"
    assert leftovers(tmp_path) == []

    report = run([src], out, PrepareConfig(min_side=8), overwrite=True)
    assert report.used == 2 and not (out / "precious.txt").exists()
    assert (out / "dataset.json").is_file() and leftovers(tmp_path) == []

    # --overwrite never replaces the images being prepared (out is a source, or holds one).
    snapshot = {p.name: p.read_bytes() for p in src.iterdir()}
    for specs, target in [([src], src), ([src / "a.png"], src), ([src], tmp_path), (["photos", src / "b.png"], src)]:
        with pytest.raises(ValueError, match="would replace the source"):
            run(specs, target, PrepareConfig(min_side=8), overwrite=True)
        assert {p.name: p.read_bytes() for p in src.iterdir()} == snapshot
    assert leftovers(tmp_path) == []

    empty = tmp_path / "empty_out"
    empty.mkdir()  # an existing empty folder is fine without overwrite
    assert run([src], empty, PrepareConfig(min_side=8)).used == 2
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(FileExistsError):
        run([src], tmp_path / "a_file", PrepareConfig(min_side=8), overwrite=True)


# ------------------------------------------------------------------------------- nothing usable


def write_only_bad(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_text("not a jpeg")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="PNG")
    (folder / "cut.png").write_bytes(buf.getvalue()[:40])


def test_nothing_usable_writes_nothing(tmp_path):
    write_only_bad(tmp_path / "bad")
    out = tmp_path / "out"
    with pytest.raises(NothingUsable, match=r"none of the 3 image file\(s\) was usable") as excinfo:
        run([tmp_path / "bad"], out, PrepareConfig(min_side=8))
    assert "empty file" in str(excinfo.value) and "\n" not in str(excinfo.value)
    assert not out.exists() and leftovers(tmp_path) == []

    (tmp_path / "no_images").mkdir()
    (tmp_path / "no_images" / "readme.txt").write_text("hi")
    with pytest.raises(NothingUsable, match="no image files found"):
        run([tmp_path / "no_images"], out, PrepareConfig(min_side=8))
    assert not out.exists()
    with pytest.raises(SourceError, match="no such file or folder"):
        run([tmp_path / "missing"], out, PrepareConfig(min_side=8))


def cli_prepare(*args):
    return cli.main(["data", "prepare", *map(str, args), "--quiet", "--workers", "0"])


def test_cli_exit_codes(tmp_path, capsys, corpus):
    write_only_bad(tmp_path / "bad")
    assert cli_prepare(tmp_path / "bad", "--out", tmp_path / "o1", "--min-side", "8") == 2
    err = capsys.readouterr().err
    assert err.startswith("fvae: error: none of the 3") and err.count("\n") == 1
    assert not (tmp_path / "o1").exists()

    assert cli_prepare("no_such_source_xyz", "--out", tmp_path / "o2") == 2
    err = capsys.readouterr().err
    assert "no_such_source_xyz: no such file or folder" in err and err.count("\n") == 1

    out = tmp_path / "o3"
    code = cli_prepare(corpus.src, "--out", out, "--min-side", CROP, "--max-pixels", BOMB_PIXELS,
                       "--background", "#0cc863", "--val-fraction", VAL_FRACTION)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.startswith(f"prepared {corpus.report.used} image(s)")
    assert read_outputs(out).meta["settings"]["background"] == list(BG)  # "#0cc863" == (12, 200, 99)
    assert stored_records(out) == corpus.records  # same bytes as the API run with the same settings

    assert cli_prepare(corpus.src, "--out", out, "--min-side", CROP) == 2  # exists, no --overwrite
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(SystemExit) as excinfo:
        cli_prepare(corpus.src, "--out", tmp_path / "o4", "--background", "chartreuse-ish")
    assert excinfo.value.code == 2
    assert "not a colour" in capsys.readouterr().err
    assert not (tmp_path / "o4").exists()


# ------------------------------------------------------------------------------- the resizes


def test_max_side_downscales_with_lanczos(tmp_path):
    rgb = np.random.default_rng(8).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "wide.png")
    out = tmp_path / "out"
    run([tmp_path / "wide.png"], out, PrepareConfig(max_side=150, min_side=64))
    (row,) = read_outputs(out).manifest
    got = decode_png(stored_records(out)[row["item"]])
    want = np.asarray(Image.fromarray(rgb).resize((150, 100), Image.Resampling.LANCZOS))
    assert got.shape == (100, 150, 3)
    np.testing.assert_array_equal(got, want)
    assert (row["height"], row["width"], row["orig_height"], row["orig_width"]) == (100, 150, 200, 300)
    assert any("downscaled from 300x200" in n for n in row["notes"])

    # Too small only because of --max-side: the reason says so.
    with pytest.raises(NothingUsable, match="too small: 75x50 after --max-side"):
        run([tmp_path / "wide.png"], tmp_path / "out2", PrepareConfig(max_side=75, min_side=64))


def test_small_image_skipped_or_upsampled(tmp_path, corpus):
    small = corpus.src / "small.png"  # a single-file source
    want = corpus.expect["small.png"]
    h, w = want.pixels.shape[:2]
    assert want.small and h < CROP
    with pytest.raises(NothingUsable, match=f"too small: {w}x{h}, short side below --min-side {CROP}"):
        run([small], tmp_path / "o1", PrepareConfig(min_side=CROP))
    report = run([small], tmp_path / "o2", PrepareConfig(min_side=CROP, upsample_small=True))
    (row,) = read_outputs(tmp_path / "o2").manifest
    got = decode_png(stored_records(tmp_path / "o2")[row["item"]])
    new_w = round(w * CROP / h)
    np.testing.assert_array_equal(
        got, np.asarray(Image.fromarray(want.pixels).resize((new_w, CROP), Image.Resampling.LANCZOS)))
    assert [w_["item"] for w_ in report.warnings] == [str(small)]
    assert "upsampled from" in report.warnings[0]["note"]


# ------------------------------------------------------------------------------ built-in sources

SKLEARN_PHOTOS = ("scikit-learn/china.jpg", "scikit-learn/flower.jpg")


def test_photos_source(tmp_path, pip_only):
    import skimage.data
    import sklearn.datasets

    report = run(["photos"], tmp_path / "out", PrepareConfig(min_side=256))
    photos = report.per_source["photos"]
    assert (photos["found"], photos["used"], photos["skipped"], photos["train"] + photos["val"]) == (10, 10, 0, 10)
    assert photos["val"] >= 1  # naturally or by the fallback
    rows = {r["name"]: r for r in read_outputs(tmp_path / "out").manifest}
    assert set(rows) == set(data.SKIMAGE_PHOTOS) | set(SKLEARN_PHOTOS)
    records = stored_records(tmp_path / "out")
    np.testing.assert_array_equal(decode_png(records["photos:astronaut"]), skimage.data.astronaut())
    np.testing.assert_array_equal(decode_png(records["photos:stereo_motorcycle"]),
                                  skimage.data.stereo_motorcycle()[0])
    assert (rows["coffee"]["height"], rows["coffee"]["width"]) == skimage.data.coffee().shape[:2]
    china = sklearn.datasets.load_sample_image("china.jpg")
    np.testing.assert_array_equal(decode_png(records["photos:scikit-learn/china.jpg"]), china)
    assert rows["scikit-learn/china.jpg"]["licence"] == "CC-BY-2.0"
    assert report.packages["photos"].startswith("photos: 8 scikit-image ")


def resvg_over(svg: bytes, size: int, bg) -> np.ndarray:
    """Independent render: resvg's straight-alpha RGBA, blended over bg with integer maths."""
    import resvg_py

    png = resvg_py.svg_to_bytes(svg_string=svg.decode(), width=size, height=size, skip_system_fonts=True)
    rgba = np.asarray(Image.open(io.BytesIO(bytes(png))).convert("RGBA")).astype(np.int64)
    return blend(rgba[..., :3], rgba[..., 3:], np.asarray(bg)[None, None])


def test_render_svg_composites_over_background():
    svgs = data.openmoji_svgs()
    assert len(svgs) > 4000
    for path in (svgs[0], svgs[len(svgs) // 2], svgs[-1]):
        decoded = render_svg(path.read_bytes(), 64, name=path.name, background=BG)
        rgb = decoded.rgb
        assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
        for corner in (rgb[0, 0], rgb[0, -1], rgb[-1, 0], rgb[-1, -1]):
            np.testing.assert_array_equal(corner, BG)
        assert (rgb.max(axis=-1) < 40).sum() > 10, path.name  # the dark outline is there
        np.testing.assert_array_equal(rgb, resvg_over(path.read_bytes(), 64, BG))
        assert decoded.mode == "SVG" and "rendered at 64x64" in decoded.notes


def test_openmoji_source_subset(tmp_path, monkeypatch):
    subset = data.openmoji_svgs()[:12]
    monkeypatch.setattr(data, "openmoji_svgs", lambda: subset)
    report = run(["openmoji"], tmp_path / "out", PrepareConfig(min_side=64, render_size=64, background=BG))
    assert report.per_source["openmoji"]["found"] == report.per_source["openmoji"]["used"] == 12
    rows = read_outputs(tmp_path / "out").manifest
    records = stored_records(tmp_path / "out")
    by_name = {p.name: p for p in subset}
    assert sorted(r["name"] for r in rows) == sorted(by_name)
    for r in rows:
        svg = by_name[r["name"]].read_bytes()
        assert r["item"] == f"openmoji:{r['name']}" and r["source"] == "openmoji"
        assert r["sha256"] == hashlib.sha256(svg).hexdigest()
        np.testing.assert_array_equal(decode_png(records[r["item"]]), resvg_over(svg, 64, BG))
    contents = {r["name"]: ("openmoji", by_name[r["name"]].read_bytes()) for r in rows}
    assert {r["name"]: r["split"] for r in rows} == expected_splits(contents, 0.02)


def test_mixed_sources_with_worker_processes(tmp_path, corpus, pip_only):
    """The one test with a process pool: a folder plus the photos, min_side 64, two workers."""
    src = str(corpus.src)
    report = run([src, "photos"], tmp_path / "out", corpus_cfg(), workers=2)
    assert report.per_source[src] == corpus.report.per_source[src]
    photos = report.per_source["photos"]
    assert (photos["found"], photos["used"], photos["skipped"], photos["train"] + photos["val"]) == (10, 8, 2, 8)
    assert report.used == corpus.report.used + 8
    # scikit-learn's two 640x427 JPEGs are files, so the corpus's small bomb limit refuses them too.
    bombs = [s for s in report.skipped if s["source"] == "photos"]
    assert sorted(s["item"] for s in bombs) == [f"photos:{n}" for n in SKLEARN_PHOTOS]
    assert all("bomb" in s["reason"] for s in bombs), bombs
    assert sorted(map(str, [s for s in report.skipped if s not in bombs])) == sorted(map(str, corpus.report.skipped))
    records = stored_records(tmp_path / "out")
    # Decoding in workers gives the same bytes as in-process, and the corpus split is per source.
    assert {k: v for k, v in records.items() if not k.startswith("photos:")} == corpus.records
    mine = {r["name"]: r["split"] for r in read_outputs(tmp_path / "out").manifest if r["source"] == src}
    assert mine == {r["name"]: r["split"] for r in corpus.files.manifest}


# ----------------------------------------------------------------------------------- the config


@pytest.mark.parametrize("kw, words", [
    ({"max_side": 4}, "max_side"), ({"min_side": 0}, "min_side"), ({"max_side": 100, "min_side": 200}, "below"),
    ({"background": (0, 0, 256)}, "background"), ({"background": (0, 0)}, "background"),
    ({"render_size": 4}, "render_size"), ({"max_pixels": 10}, "max_pixels"), ({"val_fraction": 1.0}, "val_fraction"),
    ({"val_fraction": -0.1}, "val_fraction"), ({"shard_size": 0}, "shard_size"), ({"png_level": 10}, "png_level"),
])
def test_config_is_validated(kw, words):
    with pytest.raises(ValueError, match=words):
        PrepareConfig(**kw)


def test_shards_roll_over(tmp_path):
    write_noise_pngs(tmp_path / "src", [f"{i}.png" for i in range(7)], seed=9)
    report = run([tmp_path / "src"], tmp_path / "out", PrepareConfig(min_side=8, shard_size=3, val_fraction=0.0))
    meta = read_outputs(tmp_path / "out").meta
    assert meta["splits"]["train"]["shards"] == ["train-00000.array_record", "train-00001.array_record",
                                                 "train-00002.array_record"]
    assert report.used == 7 and len(stored_records(tmp_path / "out")) == 7


# --------------------------------------------------------------------------- special files (issue 31, item 6)
@pytest.fixture
def no_hang():
    """A test that would block forever (reading a FIFO) fails after 20 s instead."""
    import signal

    def timeout(*_):
        raise TimeoutError("blocked: a special file was read as a regular one")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def special_folder(root: Path) -> tuple[Path, dict]:
    """Two noise PNGs, a FIFO and a Unix socket with image names, and a FIFO without one."""
    import os
    import socket
    import tempfile

    folder = Path(tempfile.mkdtemp(dir="/tmp", prefix="fvae-special-"))  # a socket path has <= 107 bytes
    good = write_noise_pngs(folder, ["a.png", "b.png"], seed=11)
    os.mkfifo(folder / "pipe.png")
    os.mkfifo(folder / "pipe.txt")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / "sock.jpg"))
    return folder, {"good": good, "sock": sock}


def test_special_files_are_skipped_with_a_reason_not_waited_on(tmp_path, no_hang):
    """A FIFO named ``pipe.png`` made ``fvae data prepare`` hang at "hashing"; a socket or a device is no
    better. Each is reported with its reason and the regular images are prepared; a FIFO without an image
    suffix is only listed as ignored (never opened)."""
    import shutil

    folder, made = special_folder(tmp_path)
    try:
        report = run([folder], tmp_path / "out", PrepareConfig(min_side=8, val_fraction=0.0))
        reasons = {Path(s["item"]).name: s["reason"] for s in report.skipped}
        assert reasons == {"pipe.png": "unreadable: not a regular file (a FIFO)",
                           "sock.jpg": "unreadable: not a regular file (a socket)"}, reasons
        assert report.splits == {"train": 2, "val": 0}
        assert any("pipe.txt" in f for f in report.ignored[str(folder)])
        text = read_outputs(tmp_path / "out").text
        assert "not a regular file (a FIFO)" in text and "not a regular file (a socket)" in text
    finally:
        made["sock"].close()
        shutil.rmtree(folder)


def test_special_files_in_eval_and_reconstruct(tmp_path, no_hang, capsys):
    """``fvae eval``'s image gathering skips them with the reason; ``fvae reconstruct`` given a FIFO and a
    device among its inputs reconstructs the rest and reports each (exit 1)."""
    import os
    import shutil

    from fvae_core.evaluate import gather_images
    from fvae_core.images import ImageError, load_rgb

    folder, made = special_folder(tmp_path)
    try:
        images, skipped = gather_images([str(folder)], log=lambda m: None)
        assert len(images) == 2
        assert {Path(s["item"]).name: s["reason"] for s in skipped} == {
            "pipe.png": "unreadable: not a regular file (a FIFO)",
            "sock.jpg": "unreadable: not a regular file (a socket)"}
        with pytest.raises(ImageError, match=r"not a regular file \(a character device\)"):
            load_rgb(os.devnull)
        root = Path(__file__).resolve().parents[1]
        rc = cli.main(["reconstruct", "--vae", str(root / "weights" / "tiny-cpu"), str(folder / "a.png"),
                       str(folder / "pipe.png"), os.devnull, "--out", str(tmp_path / "rec")])
        err = capsys.readouterr().err
        assert rc == 1 and sorted(p.name for p in (tmp_path / "rec").iterdir()) == ["a.png"]
        assert "pipe.png: unreadable: not a regular file (a FIFO)" in err
        assert "unreadable: not a regular file (a character device)" in err
    finally:
        made["sock"].close()
        shutil.rmtree(folder)
