"""Data pipeline speed: ``prepare`` (decode + PNG shards) and the grain loader's 256² training crops.

A printed benchmark, not a test. It measures, on this machine's CPU cores:

1. **prepare**: :func:`fvae_core.data.prepare.prepare` of the bundled OpenMoji set (4,495 SVGs rendered
   at 512², written as PNG records) with ``--prepare-workers`` processes; images/s and seconds.
2. **large photos**: the 8 colour photographs scikit-image bundles, *Lanczos-upscaled* so the long
   side is ``--photo-side`` (2048) and saved as JPEG quality 95, stand in for a user's camera
   photos; they are prepared as they are (``max_side=None``), so every record is a large PNG. They
   are upscaled small photos, so their content is smoother than real 2048px photos; decode and
   resample cost depends on pixel count, which is what this measures.
3. **loader**: images/s of ``make_iterator(train_dataset(..., AugmentConfig(crop=256), 32), workers=W)``
   for W in ``--workers`` (0 = in this process, with grain's 2 read threads), from (a) OpenMoji and
   (b) the large photos. Each W gets a fresh iterator; its first batches (which include spawning and
   importing in the workers) are a warm-up, reported separately; then ``--reps`` timings of
   ``--batches`` batches each, of which we report the median. Per-worker rate is img/s divided by
   ``max(1, W)``; the scaling ratio is relative to W = 1.
4. **pieces**, single-threaded in this process, per image: reading the record bytes, PNG decode
   (as the loader does it: ``Image.open(...).convert("RGB")``), and the augmentation alone
   (:func:`fvae_core.data.augment.apply_crop` with parameters from ``sample_crop``), so one can say
   where the time goes.
5. **estimate**: how many loader workers would feed an H100 decoder finetune at batch 32, 256².
   Needed images/s = MFU x peak / FLOP per image (defaults: 40% of 989 TFLOP/s, the H100 SXM dense
   bf16 peak, over 1.5 TFLOP per image per step, the issue's figure) ~ 264 img/s; divided by the
   measured per-worker rate of each source. These are cores of *this* machine; H100 hosts have more
   and usually faster cores.

``--quick`` shrinks everything (first 400 SVGs, 1024px photos, few batches) for a smoke run under a
minute. It limits OpenMoji by temporarily replacing ``fvae_core.data.sources.openmoji_svgs`` (which
``resolve_sources`` looks up at call time) with a function returning the first 400 paths.

Usage::

    python benchmarks/data.py                      # full run, a few minutes on 2 cores
    python benchmarks/data.py --quick              # smoke run
    python benchmarks/data.py --keep /tmp/bench    # keep the prepared folders for a rerun ...
    python benchmarks/data.py --data-openmoji /tmp/bench/openmoji-512 \\
        --data-photos /tmp/bench/photos-2048       # ... which then skips preparing
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

CROP = 256
BATCH = 32
QUICK_SVGS = 400
H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM, dense (no sparsity) bf16 tensor-core peak
#: Default timed batches per repetition: big photos are ~15x slower per image than 512² emoji.
DEFAULT_BATCHES = {"openmoji": 20, "photos": 4}
SETTLE_S = 5.0  # pause after a repetition disturbed by other processes


# ---- other processes' load (this is a shared 2-core box) -----------------------------------------------
def _busy_ticks() -> int:
    """Busy CPU ticks of the whole machine since boot (user+nice+system+irq+softirq+steal)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return v[0] + v[1] + v[2] + v[5] + v[6] + v[7]


def _own_ticks() -> int:
    """CPU ticks of this process and all its descendants, alive or reaped."""
    procs = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    rest = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            procs[int(d)] = (int(rest[1]), sum(int(x) for x in rest[11:15]))  # ppid, u+s+cu+cs time
    tree, frontier = set(), {os.getpid()}
    while frontier:
        tree |= frontier
        frontier = {p for p, (pp, _) in procs.items() if pp in frontier} - tree
    return sum(procs[p][1] for p in tree if p in procs)


class _OtherLoad:
    """Average CPU cores used by processes that are not ours over an interval (None off Linux)."""

    def __init__(self):
        try:
            self._t, self._b, self._o = time.perf_counter(), _busy_ticks(), _own_ticks()
        except (OSError, ValueError, IndexError):
            self._t = None

    def cores(self) -> float | None:
        if self._t is None:
            return None
        dt = time.perf_counter() - self._t
        other = (_busy_ticks() - self._b) - (_own_ticks() - self._o)
        return max(0.0, other / os.sysconf("SC_CLK_TCK") / dt)


def _fmt_load(x) -> str:
    return "—" if x is None else f"{x:.2f}"


# ---- the data ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _openmoji_limited(n: int | None):
    """Within the block, the ``openmoji`` source is only its first ``n`` SVGs (None: all of them)."""
    import fvae_core.data.sources

    original = fvae_core.data.sources.openmoji_svgs
    if n is not None:
        subset = original()[:n]
        fvae_core.data.sources.openmoji_svgs = lambda: subset
    try:
        yield
    finally:
        fvae_core.data.sources.openmoji_svgs = original


def _prepare(specs, out: Path, cfg, workers: int) -> dict:
    from fvae_core.data.prepare import prepare

    load = _OtherLoad()
    t = time.perf_counter()
    report = prepare(specs, out, cfg, workers=workers, overwrite=True, progress=False)
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "other": load.cores(), "used": report.used,
            "found": sum(s["found"] for s in report.per_source.values()), "skipped": len(report.skipped),
            "splits": report.splits}


def _write_large_photos(folder: Path, side: int) -> list[tuple[str, int, int, int]]:
    """The bundled photos, Lanczos-upscaled to long side ``side``, as JPEG q95; [(name, w, h, bytes)]."""
    from PIL import Image

    from fvae_core.data import SKIMAGE_PHOTOS, skimage_photo

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name in SKIMAGE_PHOTOS:
        img = Image.fromarray(skimage_photo(name))
        f = side / max(img.size)
        size = (max(1, round(img.width * f)), max(1, round(img.height * f)))
        path = folder / f"{name}.jpg"
        img.resize(size, Image.Resampling.LANCZOS).save(path, format="JPEG", quality=95)
        out.append((name, size[0], size[1], path.stat().st_size))
    return out


# ---- measures ---------------------------------------------------------------------------------------------
def _disturbed(other, max_other: float) -> bool:
    return other is not None and other > max_other


def _loader_rates(root, workers: int, batches: int, reps: int, warmup: int, max_other: float) -> dict:
    """One fresh iterator with ``workers``; warm-up, then ``reps`` timings of ``batches`` batches.

    A repetition during which other processes used more than ``max_other`` cores is repeated (at most
    ``reps`` extra tries), after a pause and a fresh warm-up so that the prefetch buffers filled during
    the pause are not counted.
    """
    from fvae_core.data.augment import AugmentConfig
    from fvae_core.data.loader import make_iterator, train_dataset

    ds = train_dataset(root, AugmentConfig(crop=CROP), BATCH, seed=0, log=lambda msg: None)
    t = time.perf_counter()
    it = make_iterator(ds, workers=workers)
    try:
        batch = next(it)
        first_s = time.perf_counter() - t
        assert batch["image"].shape == (BATCH, CROP, CROP, 3), batch["image"].shape
        for _ in range(warmup - 1):
            next(it)
        warm_s = time.perf_counter() - t
        times, other = [], []
        while len(times) < 2 * reps and sum(not _disturbed(o, max_other) for o in other) < reps:
            if other and _disturbed(other[-1], max_other):
                time.sleep(SETTLE_S)
                for _ in range(warmup):
                    next(it)
            load = _OtherLoad()
            t = time.perf_counter()
            for _ in range(batches):
                next(it)
            times.append(time.perf_counter() - t)
            other.append(load.cores())
    finally:
        it.close()
    return {"first_s": first_s, "warm_s": warm_s, "times": times, "other": other, "batches": batches}


def _piece_times(root, n_images: int, reps: int, max_other: float, seed: int = 0) -> dict:
    """Per-image seconds of record read, PNG decode and augmentation, one thread, this process
    (disturbed repetitions are repeated as in :func:`_loader_rates`)."""
    import grain
    import numpy as np
    from PIL import Image

    from fvae_core.data.augment import AugmentConfig, apply_crop, sample_crop
    from fvae_core.data.loader import PreparedDataset

    cfg = AugmentConfig(crop=CROP)
    data = PreparedDataset.open(root)
    rows = [r for r in data.rows["train"] if cfg.usable(r["height"], r["width"])]
    indices = [rows[i % len(rows)]["index"] for i in range(n_images)]
    source = grain.sources.ArrayRecordDataSource(data.shard_paths("train"))
    rng = np.random.default_rng(seed)
    out = {"read": [], "decode": [], "augment": []}
    pixels, other = [], []
    while len(other) < 2 * reps and sum(not _disturbed(o, max_other) for o in other) < reps:
        if other and _disturbed(other[-1], max_other):
            time.sleep(SETTLE_S)
        load = _OtherLoad()
        acc = dict.fromkeys(out, 0.0)
        for i in indices:
            t0 = time.perf_counter()
            rec = source[i]
            t1 = time.perf_counter()
            img = np.asarray(Image.open(io.BytesIO(rec)).convert("RGB"))  # as fvae_core.data.loader does
            t2 = time.perf_counter()
            p = sample_crop(rng, img.shape[0], img.shape[1], cfg)
            t3 = time.perf_counter()
            apply_crop(img, p, cfg.crop)
            t4 = time.perf_counter()
            acc["read"] += t1 - t0
            acc["decode"] += t2 - t1
            acc["augment"] += t4 - t3
            pixels.append(img.shape[0] * img.shape[1])
        for k in out:
            out[k].append(acc[k] / len(indices))
        other.append(load.cores())
    return {"per_image": {k: statistics.median(_kept(v, other, max_other)) for k, v in out.items()},
            "all": out, "other": other, "megapixels": statistics.mean(pixels) / 1e6, "n": len(indices)}


# ---- report -----------------------------------------------------------------------------------------------
def _kept(values, other, max_other):
    """The undisturbed repetitions, or all of them when none is."""
    kept = [v for v, o in zip(values, other) if not _disturbed(o, max_other)]
    return kept or list(values)


def _rate(res, max_other) -> float:
    return BATCH * res["batches"] / statistics.median(_kept(res["times"], res["other"], max_other))


def _load_cell(other, max_other) -> str:
    """Median other-process load of the repetitions used, and how many were used."""
    kept = _kept(other, other, max_other)
    known = [o for o in kept if o is not None]
    cell = _fmt_load(statistics.median(known) if known else None)
    n_ok = sum(not _disturbed(o, max_other) for o in other)
    if n_ok == 0:
        return f"{cell} (all {len(other)} reps disturbed)"
    return cell + (f" ({n_ok} of {len(other)} reps used)" if n_ok < len(other) else "")


def _reps_line(values, other, max_other) -> str:
    return " ".join(v + ("*" if _disturbed(o, max_other) else "") for v, o in zip(values, other))


def _per_s(x: float) -> str:
    return f"{x:.1f}" if x < 100 else f"{x:.0f}"


def _ms(s: float) -> str:
    return f"{1000 * s:.1f} ms" if s < 1 else f"{s:.2f} s"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke run: first {QUICK_SVGS} SVGs, 1024px photos, few batches, 2 reps")
    ap.add_argument("--workers", default="0,1,2", help="comma-separated loader worker counts (0: in-process)")
    ap.add_argument("--prepare-workers", type=int, default=os.cpu_count() or 1,
                    help="decoding processes for prepare (default: all CPUs)")
    ap.add_argument("--batches", type=int, default=None,
                    help="timed batches per repetition (default: " +
                         ", ".join(f"{k} {v}" for k, v in DEFAULT_BATCHES.items()) + ")")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per setting (default 5; quick 2)")
    ap.add_argument("--max-other", type=float, default=0.25,
                    help="repeat a repetition (up to --reps extra) when processes other than this benchmark "
                         "used more than this many cores during it (default 0.25; inf: never)")
    ap.add_argument("--photo-side", type=int, default=None, help="long side of the upscaled photos (default 2048)")
    ap.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOP utilisation of the H100 step")
    ap.add_argument("--tflop-per-image", type=float, default=1.5,
                    help="FLOP per image per decoder-finetune step, in TFLOP (the issue's figure)")
    ap.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                    help="accelerator peak, TFLOP/s (default: H100 SXM dense bf16)")
    ap.add_argument("--keep", type=Path, default=None,
                    help="prepare into this folder (subfolders openmoji-*, photos-*) and keep it")
    ap.add_argument("--data-openmoji", type=Path, default=None,
                    help="an already-prepared OpenMoji folder (skips its prepare timing)")
    ap.add_argument("--data-photos", type=Path, default=None,
                    help="an already-prepared large-photo folder (skips making and preparing them)")
    args = ap.parse_args(argv)

    try:
        workers = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        ap.error(f"--workers must be comma-separated ints, got {args.workers!r}")
    if not workers or any(w < 0 for w in workers):
        ap.error("--workers needs at least one count, all >= 0")
    reps = args.reps or (2 if args.quick else 5)
    batches = ({k: args.batches for k in DEFAULT_BATCHES} if args.batches
               else {"openmoji": 3, "photos": 2} if args.quick else dict(DEFAULT_BATCHES))
    photo_side = args.photo_side or (1024 if args.quick else 2048)
    n_svgs = QUICK_SVGS if args.quick else None
    piece_n = {"openmoji": 32 if args.quick else 128, "photos": 8 if args.quick else 28}

    from fvae_core.data.prepare import PrepareConfig

    t_start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if args.keep:
            base = args.keep
            base.mkdir(parents=True, exist_ok=True)
        else:
            base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fvae-bench-data-")))

        # 1. prepare OpenMoji
        prep_moji = None
        if args.data_openmoji:
            moji_root = args.data_openmoji
        else:
            moji_root = base / ("openmoji-512" + ("-quick" if args.quick else ""))
            print(f"[prepare] openmoji ({n_svgs or 'all'} SVGs, 512², {args.prepare_workers} workers) ...",
                  file=sys.stderr, flush=True)
            with _openmoji_limited(n_svgs):
                prep_moji = _prepare(["openmoji"], moji_root, PrepareConfig(render_size=512), args.prepare_workers)

        # 2. large photos
        photos, prep_photos = None, None
        if args.data_photos:
            photos_root = args.data_photos
        else:
            src = base / f"photos-{photo_side}-jpeg"
            photos_root = base / f"photos-{photo_side}"
            print(f"[prepare] upscaled photos, long side {photo_side} ...", file=sys.stderr, flush=True)
            photos = _write_large_photos(src, photo_side)
            prep_photos = _prepare([str(src)], photos_root, PrepareConfig(max_side=None), args.prepare_workers)

        roots = {"openmoji": moji_root, "photos": photos_root}

        # 4. pieces, one thread (first: nothing else of ours is running)
        pieces = {}
        for name, root in roots.items():
            print(f"[pieces] {name}: read / decode / augment, one thread ...", file=sys.stderr, flush=True)
            pieces[name] = _piece_times(root, piece_n[name], reps, args.max_other)

        # 3. loader
        loader = {}
        for name, root in roots.items():
            for w in workers:
                warmup = 2 + 2 * w
                print(f"[loader] {name}: workers={w}, warm-up {warmup}, {reps} x {batches[name]} batches ...",
                      file=sys.stderr, flush=True)
                loader[name, w] = _loader_rates(root, w, batches[name], reps, warmup, args.max_other)
    total = time.perf_counter() - t_start

    # ---- print ----
    from importlib.metadata import version

    import PIL

    print("\n## Data pipeline speed\n")
    print(f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), python {platform.python_version()}, "
          f"grain {version('grain')}, pillow {PIL.__version__}, array-record {version('array-record')}, "
          f"resvg-py {version('resvg-py')}. Medians of {reps} repetitions. Training crops are {CROP}², "
          f"batch {BATCH}, AugmentConfig() defaults (scale 0.25..1 log-uniform, Lanczos, rot90, flip)."
          + (" QUICK run: small sizes, numbers are only a smoke test." if args.quick else ""))

    print("\n### prepare (decode, encode PNG level 1, write ArrayRecord shards)\n")
    print("| source | images | workers | seconds | images/s | other procs (cores) |")
    print("|---|---|---|---|---|---|")
    if prep_moji:
        label = f"OpenMoji SVG → 512² ({'first ' + str(n_svgs) if n_svgs else 'full set'})"
        print(f"| {label} | {prep_moji['used']} of {prep_moji['found']} | {args.prepare_workers} | "
              f"{prep_moji['seconds']:.1f} | {prep_moji['used'] / prep_moji['seconds']:.1f} | "
              f"{_fmt_load(prep_moji['other'])} |")
    else:
        print(f"| OpenMoji (reused {moji_root}) | — | — | — | — | — |")
    if prep_photos:
        print(f"| upscaled photos, JPEG q95, long side {photo_side} | "
              f"{prep_photos['used']} of {prep_photos['found']} | "
              f"{args.prepare_workers} | {prep_photos['seconds']:.1f} | "
              f"{prep_photos['used'] / prep_photos['seconds']:.1f} | {_fmt_load(prep_photos['other'])} |")
    else:
        print(f"| photos (reused {photos_root}) | — | — | — | — | — |")
    if photos:
        print(f"\nThe large photos are the {len(photos)} scikit-image colour photographs, Lanczos-UPSCALED "
              f"to a long side of {photo_side} and saved as JPEG q95 (a stand-in for user photos; not real "
              f"{photo_side}px captures): " + ", ".join(f"{n} {w}x{h} ({b / 1e6:.1f} MB)" for n, w, h, b in photos)
              + f". Split: {prep_photos['splits']}.")

    labels = {"openmoji": "OpenMoji 512²", "photos": f"photos ≤{photo_side}" if photos else "photos"}
    print("\n### Where the time goes: one image, one thread, in-process (median of per-image means)\n")
    print("| source | mean size | read record | PNG decode | augment (apply_crop) | total | 1-core ceiling | "
          "other procs (cores) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, pc in pieces.items():
        p = pc["per_image"]
        tot = sum(p.values())
        print(f"| {labels[name]} | {pc['megapixels']:.2f} MP | {_ms(p['read'])} | {_ms(p['decode'])} | "
              f"{_ms(p['augment'])} | {_ms(tot)} | {1 / tot:.0f} img/s | {_load_cell(pc['other'], args.max_other)} |")

    print(f"\n### Loader: {CROP}² training crops, batch {BATCH} (make_iterator(train_dataset(...), workers=W))\n")
    print("| source | W | first batch | warm-up | img/s | per worker | vs W=1 | other procs (cores) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in roots:
        base_rate = _rate(loader[name, 1], args.max_other) if (name, 1) in loader else None
        for w in workers:
            r = loader[name, w]
            rate = _rate(r, args.max_other)
            scale = f"{rate / base_rate:.2f}" if base_rate else "—"
            wl = f"{w} (in-process)" if w == 0 else str(w)
            print(f"| {labels[name]} | {wl} | {r['first_s']:.2f} s | {2 + 2 * w} batches, {r['warm_s']:.1f} s | "
                  f"{_per_s(rate)} | {_per_s(rate / max(1, w))} | {scale} | {_load_cell(r['other'], args.max_other)} |")
    print("\nW=0 runs in the main process with grain's 2 read threads (Pillow releases the GIL while decoding "
          "and resampling), so it can use more than one core. 'first batch' includes spawning the workers "
          f"and their imports; warm-up batches are not timed. With W = {os.cpu_count()} the workers share the "
          "cores with the main process, which here only receives batches; a training process would compete.")
    print(f"\n'other procs' is the median CPU use, in cores, of processes that are not this benchmark or its "
          f"workers (from /proc), during the timed repetitions used; a repetition with more than "
          f"{args.max_other} is disturbed, repeated (up to {reps} extra tries) and left out of the medians "
          f"(marked * below).")

    needed = args.mfu * args.peak_tflops / args.tflop_per_image
    print(f"\n### Estimate: feeding an H100 decoder finetune (batch {BATCH}, {CROP}²)\n")
    print(f"Needed: {args.mfu:.0%} MFU x {args.peak_tflops:.0f} TFLOP/s (H100 SXM dense bf16 peak) / "
          f"{args.tflop_per_image} TFLOP per image per step = {needed:.0f} img/s ({needed / BATCH:.1f} steps/s).\n")
    print("| source | per-worker rate (W=1) | workers needed | per-worker rate (W=max) | workers needed |")
    print("|---|---|---|---|---|")
    wmax = max(workers)
    for name in roots:
        cells = []
        for w in (1, wmax):
            if (name, w) in loader and w >= 1:
                per = _rate(loader[name, w], args.max_other) / w
                cells += [f"{_per_s(per)} img/s (W={w})", f"{math.ceil(needed / per)}"]
            else:
                cells += ["—", "—"]
        print(f"| {labels[name]} | " + " | ".join(cells) + " |")
    print(f"\nThese are loader worker processes, each about one CPU core of THIS machine ({os.cpu_count()} cores, "
          f"{platform.processor() or platform.machine()}); an H100 host has many more, usually faster, cores. "
          "The training process itself also needs a core.")

    print("\nAll repetitions:")
    for (name, w), r in loader.items():
        print(f"  loader {name:8s} W={w}: "
              + _reps_line([_per_s(BATCH * r['batches'] / t) for t in r["times"]], r["other"], args.max_other)
              + f" img/s ({r['batches']} batches each); other procs " + " ".join(map(_fmt_load, r["other"])))
    for name, pc in pieces.items():
        for k, v in pc["all"].items():
            print(f"  pieces {name:8s} {k:7s}: "
                  + _reps_line([f"{1000 * x:.2f}" for x in v], pc["other"], args.max_other)
                  + f" ms/img ({pc['n']} images)")
        print(f"  pieces {name:8s} other procs: " + " ".join(map(_fmt_load, pc["other"])))
    if args.keep:
        print(f"\nPrepared data kept in {args.keep}.")
    print(f"\nTotal benchmark time {total:.0f} s.")


if __name__ == "__main__":
    main()
