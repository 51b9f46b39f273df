"""Batches from a prepared dataset (:mod:`fvae_core.data.prepare`) with ``grain``: deterministic for a
seed, multi-worker, sharded per process, and resumable at an exact batch.

Train pipeline (a ``grain.MapDataset``, so every element is a pure function of seed and position)::

    usable records -> this process's shard -> shuffle (new order each epoch) -> repeat
        -> decode PNG + card augmentation (fvae_core.data.augment, per-element RNG from grain)
        -> batch (drop remainder) -> iterator (optionally multiprocess)

Each batch is a dict: ``image`` uint8 [B, crop, crop, 3] (sRGB; use
:func:`fvae_core.conventions.unit_from_uint8`), ``index`` int64 [B] (row of the split in
``manifest.jsonl``). The sequence of batches does not depend on the number of workers.

Resuming: ``state = it.get_state()`` is ``{"next_batch": n}``; ``it.set_state(state)`` on a fresh
iterator of the same dataset continues with exactly the batches the old one would have produced,
with any number of workers (:class:`BatchIterator`).

Multiprocess workers (``workers > 0``) start with ``spawn``: a script that uses them needs an
``if __name__ == "__main__":`` guard, and grain needs absl flags parsed, which :func:`make_iterator`
does for you (``absl.flags.FLAGS(sys.argv[:1])``).
"""
from __future__ import annotations

import dataclasses
import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from fvae_core.data.augment import AugmentConfig, CropParams, apply_crop, sample_crop, val_params

__all__ = ["BatchIterator", "DatasetError", "PreparedDataset", "make_iterator", "train_dataset", "val_dataset"]


class DatasetError(ValueError):
    """A prepared dataset folder is missing, incomplete, of another format, or corrupt."""


@dataclasses.dataclass(frozen=True)
class PreparedDataset:
    root: Path
    meta: dict
    rows: dict  # split -> list of manifest rows, in record order

    @classmethod
    def open(cls, root) -> "PreparedDataset":
        from fvae_core.data.prepare import DATASET_FORMAT

        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"{root}: no such folder (prepare one with `fvae data prepare`)")
        meta_path = root / "dataset.json"
        if not meta_path.is_file():
            raise DatasetError(f"{root}: not a prepared dataset (no dataset.json; run `fvae data prepare`)")
        try:
            meta = json.loads(meta_path.read_text())
            rows_all = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines() if line]
        except (OSError, ValueError) as e:
            raise DatasetError(f"{root}: unreadable dataset metadata ({e})") from e
        if not isinstance(meta, dict) or meta.get("format") != DATASET_FORMAT:
            got = meta.get("format") if isinstance(meta, dict) else None
            raise DatasetError(f"{root}: dataset format {got!r}, expected {DATASET_FORMAT!r}")
        try:
            return cls(root, meta, cls._check(root, meta, rows_all))
        except (KeyError, TypeError, AttributeError) as e:
            raise DatasetError(f"{root}: malformed dataset.json or manifest.jsonl ({type(e).__name__}: {e})") from e

    @staticmethod
    def _check(root: Path, meta: dict, rows_all: list) -> dict:
        keys = ("split", "index", "shard", "record", "item", "height", "width")
        bad = next((r for r in rows_all if not isinstance(r, dict) or any(k not in r for k in keys)), None)
        if bad is not None:
            raise DatasetError(f"{root}: manifest row lacks one of {keys}: {str(bad)[:80]}")
        rows = {}
        for split, info in meta["splits"].items():
            rows[split] = [r for r in rows_all if r["split"] == split]
            if len(rows[split]) != info["count"] or [r["index"] for r in rows[split]] != list(range(info["count"])):
                raise DatasetError(f"{root}: manifest does not match dataset.json for split {split!r}")
            missing = [s for s in info["shards"] if not (root / s).is_file()]
            if missing:
                raise DatasetError(f"{root}: missing shard file(s) {', '.join(missing)}")
        return rows

    def shard_paths(self, split: str) -> list[str]:
        return [str(self.root / s) for s in self.meta["splits"][split]["shards"]]

    def __len__(self):
        return sum(len(r) for r in self.rows.values())


class _Records:
    """Picklable random access to one split's PNG records; opens the shards lazily in each process."""

    def __init__(self, paths: list[str], rows: list[dict]):
        self.paths, self.sizes = paths, [(r["height"], r["width"]) for r in rows]
        self.where = [f"{r['shard']} record {r['record']} ({r['item']})" for r in rows]
        self._source = None

    def __getstate__(self):
        return {**self.__dict__, "_source": None}

    def decode(self, index: int) -> np.ndarray:
        import grain

        if self._source is None:
            try:  # a damaged shard header or footer fails here, before any record is read
                self._source = grain.sources.ArrayRecordDataSource(self.paths)
            except Exception as e:
                raise DatasetError(f"{self.paths[0]}...: unreadable shard(s) ({e})") from e
        try:
            img = np.asarray(Image.open(io.BytesIO(self._source[index])).convert("RGB"))
        except Exception as e:
            raise DatasetError(f"{self.where[index]}: undecodable ({e})") from e
        if img.shape[:2] != tuple(self.sizes[index]):
            raise DatasetError(f"{self.where[index]}: size {img.shape[:2]} != manifest {tuple(self.sizes[index])}")
        return img


class _TrainSample:
    def __init__(self, records: _Records, cfg: AugmentConfig):
        self.records, self.cfg = records, cfg

    def __call__(self, index, rng: np.random.Generator):
        img = self.records.decode(index)
        p = sample_crop(rng, img.shape[0], img.shape[1], self.cfg)
        return {"image": apply_crop(img, p, self.cfg.crop), "index": np.int64(index)}


class _ValSample:
    def __init__(self, records: _Records, crop: int):
        self.records, self.crop = records, crop

    def __call__(self, job):
        index, params = job
        img = self.records.decode(index)
        return {"image": apply_crop(img, CropParams(*params), self.crop), "index": np.int64(index)}


def _usable(data: PreparedDataset, split: str, cfg: AugmentConfig, log) -> list[int]:
    rows = data.rows[split]
    keep = [r["index"] for r in rows if cfg.usable(r["height"], r["width"])]
    if len(keep) < len(rows):
        log(f"{split}: skipping {len(rows) - len(keep)} of {len(rows)} image(s) smaller than the "
            f"{cfg.crop}px crop (allow with upsample_small)")
    return keep


def train_dataset(data, cfg: AugmentConfig, batch_size: int, *, seed: int, split: str = "train",
                  shard_index: int = 0, shard_count: int = 1, num_epochs: int | None = None, log=print):
    """The training pipeline as a ``grain.MapDataset`` of batches (see the module docstring).

    ``shard_index``/``shard_count``: this process's share in a multi-host run (pass
    ``jax.process_index()``, ``jax.process_count()``); the shards are disjoint, and each draws its own
    shuffle and augmentations from ``(seed, shard_index)``. ``num_epochs=None``
    repeats forever (batches then run across epoch boundaries). Raises :class:`DatasetError` when
    no image is usable, or when ``num_epochs`` is finite and they make less than one batch.
    """
    import grain

    data = data if isinstance(data, PreparedDataset) else PreparedDataset.open(data)
    if not (0 <= shard_index < shard_count):
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
    keep = _usable(data, split, cfg, log)[shard_index::shard_count]
    if not keep or (num_epochs is not None and len(keep) * num_epochs < batch_size):
        raise DatasetError(f"{data.root}: {len(keep)} usable {split} image(s) for this process, "
                           f"not enough for one batch of {batch_size}")
    records = _Records(data.shard_paths(split), data.rows[split])
    # grain's per-element RNG depends only on (seed, position): with one seed for all processes,
    # every shard would draw the same scale, crop, rotation and flip at each step.
    seed = int(np.random.SeedSequence([seed, shard_index]).generate_state(1)[0])
    ds = grain.MapDataset.source(keep).shuffle(seed=seed).repeat(num_epochs)
    ds = ds.random_map(_TrainSample(records, cfg), seed=seed)
    return ds.batch(batch_size, drop_remainder=True)


def val_dataset(data, cfg: AugmentConfig, batch_size: int, *, split: str = "val", log=print):
    """Deterministic validation crops (``cfg.val_scales``, centre, no rotation or flip), batched,
    one pass, last batch possibly short. Also usable on ``split="train"`` for a fixed probe set."""
    import grain

    data = data if isinstance(data, PreparedDataset) else PreparedDataset.open(data)
    jobs = [(r["index"], tuple(p)) for r in data.rows[split] for p in val_params(r["height"], r["width"], cfg)]
    unused = sum(not val_params(r["height"], r["width"], cfg) for r in data.rows[split])
    if unused:
        log(f"{split}: {unused} of {len(data.rows[split])} image(s) are too small for a {cfg.crop}px "
            f"crop at any of the scales {cfg.val_scales} and are not used")
    if not jobs:
        raise DatasetError(f"{data.root}: no {split} image is large enough for a {cfg.crop}px crop")
    records = _Records(data.shard_paths(split), data.rows[split])
    return grain.MapDataset.source(jobs).map(_ValSample(records, cfg.crop)).batch(batch_size)


def make_iterator(ds, *, workers: int = 0, prefetch: int = 2) -> "BatchIterator":
    """An iterator over a dataset from :func:`train_dataset`/:func:`val_dataset`, with ``workers``
    processes (0: in this process). See :class:`BatchIterator` for resumption."""
    return BatchIterator(ds, workers=workers, prefetch=prefetch)


class BatchIterator:
    """Batches of a ``grain.MapDataset``, resumable with a state that does not depend on workers.

    ``get_state()`` is ``{"next_batch": n}``; ``set_state`` reopens the pipeline at ``ds[n:]``.
    Because every element is a pure function of the seed and its position, that is exactly the
    sequence the old iterator would have continued with, whatever the number of workers before
    and after (grain's own iterator states are tied to the worker count). Use as a context
    manager, or call :meth:`close`, to stop worker processes promptly.
    """

    def __init__(self, ds, *, workers: int = 0, prefetch: int = 2):
        if not (isinstance(workers, int) and workers >= 0):
            raise ValueError(f"workers must be an int >= 0, got {workers!r}")
        self._ds, self._workers, self._prefetch = ds, workers, prefetch
        self._next, self._it = 0, None

    def _open(self):
        import grain

        ds = self._ds[self._next:] if self._next else self._ds
        it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0 if self._workers else 2,
                                                     prefetch_buffer_size=self._prefetch))
        if self._workers:
            from absl import flags

            if not flags.FLAGS.is_parsed():
                flags.FLAGS(sys.argv[:1])  # grain's worker processes read absl flags
            it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self._workers, per_worker_buffer_size=self._prefetch))
        self._it = iter(it_ds)

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:
            self._open()
        batch = next(self._it)
        self._next += 1
        return batch

    def get_state(self) -> dict:
        return {"next_batch": self._next}

    def set_state(self, state: dict) -> None:
        n = state.get("next_batch") if isinstance(state, dict) else None
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"not a BatchIterator state: {state!r}")
        self.close()
        self._next = n

    def close(self) -> None:
        if self._it is not None:
            self._it.close()
            self._it = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
