"""The grain loader (fvae_core.data.loader) on small synthetic datasets written by fvae_core.data.prepare.

Determinism (per seed, across worker counts), exact resumption, epochs as permutations, disjoint
shards with independent augmentations, the small-image policy, validation crops against
:func:`fvae_core.data.augment.apply_crop` on the source pixels, and one-line :class:`DatasetError` s for
broken folders and records.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fvae_core.data.augment import AugmentConfig, apply_crop, val_params
from fvae_core.data.loader import DatasetError, PreparedDataset, make_iterator, train_dataset, val_dataset
from fvae_core.data.prepare import PrepareConfig, prepare

CROP = 16
CFG = AugmentConfig(crop=CROP)
N_USABLE, N_SMALL = 12, 2  # the train fixture: 12 images of 24..47 px, 2 of 12x20 (below the crop)


def quiet(msg):
    pass


def write_pngs(folder: Path, images: dict[str, np.ndarray]) -> None:
    folder.mkdir(parents=True)
    for name, img in images.items():
        Image.fromarray(img).save(folder / name)


def prepare_folder(src: Path, out: Path, val_fraction: float) -> Path:
    prepare([str(src)], out, PrepareConfig(min_side=8, val_fraction=val_fraction), workers=0, progress=False)
    return out


def noise(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def train_root(tmp_path_factory) -> Path:
    """All images in ``train``: records 0..11 usable (24..47 px), 12 and 13 smaller than the crop."""
    base = tmp_path_factory.mktemp("train")
    rng = np.random.default_rng(0)
    images = {f"im{i:02d}.png": noise(rng, *rng.integers(24, 48, 2)) for i in range(N_USABLE)}
    images.update({f"small{i}.png": noise(rng, 12, 20) for i in range(N_SMALL)})
    write_pngs(base / "src", images)
    return prepare_folder(base / "src", base / "ds", 0.0)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A dataset with a ``val`` split; returns (root, {manifest name: source pixels})."""
    base = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(1)
    images = {f"im{i:02d}.png": noise(rng, *rng.integers(20, 64, 2)) for i in range(20)}
    images.update({f"small{i}.png": noise(rng, 12, 20) for i in range(3)})
    write_pngs(base / "src", images)
    return prepare_folder(base / "src", base / "ds", 0.5), images


def batches(it, n):
    return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() == {"image", "index"}
        np.testing.assert_array_equal(x["index"], y["index"])
        np.testing.assert_array_equal(x["image"], y["image"])


def differ(a, b) -> bool:
    return any(not np.array_equal(x["image"], y["image"]) or not np.array_equal(x["index"], y["index"])
               for x, y in zip(a, b))


# --------------------------------------------------------------------------------- determinism


def test_batches_have_the_documented_form(train_root):
    b = next(make_iterator(train_dataset(train_root, CFG, 4, seed=0, log=quiet)))
    assert b["image"].shape == (4, CROP, CROP, 3) and b["image"].dtype == np.uint8
    assert b["index"].shape == (4,) and b["index"].dtype == np.int64


def test_same_seed_same_batches_other_seed_other_batches(train_root):
    def run(seed):
        return batches(make_iterator(train_dataset(train_root, CFG, 4, seed=seed, log=quiet)), 5)

    a, b, c = run(0), run(0), run(1)
    assert_same_batches(a, b)
    assert differ(a, c)


def test_resume_is_exact_and_the_state_is_json(train_root):
    ds = train_dataset(train_root, CFG, 4, seed=3, log=quiet)
    it = make_iterator(ds)
    batches(it, 2)
    state = it.get_state()
    rest = batches(it, 4)  # crosses the epoch boundary (3 batches per epoch)
    state = json.loads(json.dumps(state))
    fresh = make_iterator(train_dataset(train_root, CFG, 4, seed=3, log=quiet))
    fresh.set_state(state)
    assert_same_batches(batches(fresh, 4), rest)


def test_workers_give_the_same_batches_and_resume(train_root):
    """grain's mp_prefetch (2 spawned workers) against the in-process pipeline, then a resume of a
    multi-worker iterator into a fresh multi-worker iterator and into an in-process one (the state
    does not depend on the worker count)."""
    ds = train_dataset(train_root, CFG, 4, seed=5, log=quiet)
    want = batches(make_iterator(ds), 8)
    it = make_iterator(ds, workers=2)
    other = None
    try:
        assert_same_batches(batches(it, 5), want[:5])
        state = json.loads(json.dumps(it.get_state()))
        assert_same_batches(batches(it, 3), want[5:])
        other = make_iterator(ds, workers=2)
        other.set_state(state)
        assert_same_batches(batches(other, 3), want[5:])
        single = make_iterator(ds)
        single.set_state(state)
        assert_same_batches(batches(single, 3), want[5:])
    finally:
        it.close()
        if other is not None:
            other.close()


# --------------------------------------------------------------------------------- epochs and shards


def test_each_epoch_is_a_new_permutation_of_the_usable_records(train_root):
    it = make_iterator(train_dataset(train_root, CFG, 4, seed=0, log=quiet))
    epochs = [np.concatenate([b["index"] for b in batches(it, N_USABLE // 4)]) for _ in range(3)]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(N_USABLE))
    for a, b in zip(epochs, epochs[1:]):
        assert not np.array_equal(a, b)
    assert not np.array_equal(epochs[0], np.arange(N_USABLE))  # shuffled at all


def test_finite_epochs_end(train_root):
    ds = train_dataset(train_root, CFG, 5, seed=0, num_epochs=2, log=quiet)
    got = list(make_iterator(ds))
    assert len(got) == len(ds) == (2 * N_USABLE) // 5  # drop_remainder
    counts = np.bincount(np.concatenate([b["index"] for b in got]), minlength=N_USABLE)
    assert counts.max() <= 2 and counts.sum() == 5 * len(got)


@pytest.mark.parametrize("count", [2, 3, 5])
def test_shards_are_disjoint_and_cover_the_usable_records(train_root, count):
    seen = []
    for index in range(count):
        ds = train_dataset(train_root, CFG, 1, seed=0, shard_index=index, shard_count=count, num_epochs=1, log=quiet)
        seen.append([int(b["index"][0]) for b in make_iterator(ds)])
    flat = [i for s in seen for i in s]
    assert len(flat) == len(set(flat)), seen  # disjoint, and no record twice within a shard
    assert sorted(flat) == list(range(N_USABLE))
    assert max(map(len, seen)) - min(map(len, seen)) <= 1


def test_shards_draw_independent_augmentations(tmp_path):
    """Twin images (one pixel apart) on two shards: with one RNG stream per position for all shards,
    both would get the same crop, rotation and flip at every step, i.e. near-identical crops."""
    rng = np.random.default_rng(2)
    base = noise(rng, 40, 40)
    twins = {}
    for i in range(8):
        img = base.copy()
        img[-1, -1] = i  # distinct content hash, otherwise prepare drops duplicates
        twins[f"t{i}.png"] = img
    write_pngs(tmp_path / "src", twins)
    root = prepare_folder(tmp_path / "src", tmp_path / "ds", 0.0)
    shards = [batches(make_iterator(train_dataset(root, CFG, 4, seed=0, shard_index=i, shard_count=2, log=quiet)), 2)
              for i in range(2)]
    a = np.concatenate([b["image"] for b in shards[0]]).astype(int)
    b = np.concatenate([b["image"] for b in shards[1]]).astype(int)
    near_identical = (np.abs(a - b).mean(axis=(1, 2, 3)) < 2).sum()
    assert near_identical == 0, f"{near_identical} of {len(a)} positions got the same augmentation"


def test_bad_shard_arguments(train_root):
    for index, count in ((1, 1), (-1, 2), (0, 0)):
        with pytest.raises(ValueError):
            train_dataset(train_root, CFG, 1, seed=0, shard_index=index, shard_count=count, log=quiet)
    with pytest.raises(DatasetError):  # 12 usable records cannot fill one batch of 13 once
        train_dataset(train_root, CFG, 13, seed=0, num_epochs=1, log=quiet)


# --------------------------------------------------------------------------------- small images


def test_small_images_are_skipped_and_reported(train_root):
    logs = []
    ds = train_dataset(train_root, CFG, 2, seed=0, num_epochs=1, log=logs.append)
    seen = sorted(int(i) for b in make_iterator(ds) for i in b["index"])
    assert seen == list(range(N_USABLE))
    assert len(logs) == 1 and f"{N_SMALL} of {N_USABLE + N_SMALL}" in logs[0] and f"{CROP}px" in logs[0]


def test_small_images_are_used_with_upsample_small(train_root):
    logs = []
    cfg = AugmentConfig(crop=CROP, upsample_small=True)
    ds = train_dataset(train_root, cfg, 2, seed=0, num_epochs=1, log=logs.append)
    got = list(make_iterator(ds))
    assert sorted(int(i) for b in got for i in b["index"]) == list(range(N_USABLE + N_SMALL))
    assert all(b["image"].shape == (2, CROP, CROP, 3) for b in got)
    assert logs == []


# --------------------------------------------------------------------------------- validation


def test_val_dataset_is_deterministic_centre_crops_of_every_val_record(mixed):
    root, sources = mixed
    cfg = AugmentConfig(crop=CROP, val_scales=(1.0, 0.5))
    rows = PreparedDataset.open(root).rows["val"]
    jobs = {r["index"]: val_params(r["height"], r["width"], cfg) for r in rows}
    # the fixture must exercise every case: no usable scale, one, both
    assert {len(p) for p in jobs.values()} == {0, 1, 2}, {r["name"]: len(jobs[r["index"]]) for r in rows}

    want = sorted((r["index"], apply_crop(sources[r["name"]], p, CROP).tobytes())
                  for r in rows for p in jobs[r["index"]])
    ds = val_dataset(root, cfg, 3, log=quiet)
    runs = [list(make_iterator(ds)) for _ in range(2)]
    assert_same_batches(runs[0], runs[1])
    got = sorted((int(i), img.tobytes()) for b in runs[0] for i, img in zip(b["index"], b["image"]))
    assert got == want
    assert all(len(b["index"]) == 3 for b in runs[0][:-1]) and 1 <= len(runs[0][-1]["index"]) <= 3


def test_val_dataset_without_a_usable_image(mixed):
    root, _ = mixed
    with pytest.raises(DatasetError, match="large enough"):
        val_dataset(root, AugmentConfig(crop=512), 2, log=quiet)


# --------------------------------------------------------------------------------- broken folders


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _drop_last_manifest_line(root: Path) -> None:
    lines = (root / "manifest.jsonl").read_text().splitlines()
    (root / "manifest.jsonl").write_text("\n".join(lines[:-1]) + "\n")


BREAKERS = {
    "missing folder": lambda root: shutil.rmtree(root),
    "no dataset.json": lambda root: (root / "dataset.json").unlink(),
    "wrong format": lambda root: _edit_json(root / "dataset.json", lambda d: d.update(format="fvae-prepared/0")),
    "manifest short": _drop_last_manifest_line,
    "count mismatch": lambda root: _edit_json(root / "dataset.json",
                                              lambda d: d["splits"]["train"].update(count=N_USABLE + N_SMALL + 1)),
    "no manifest": lambda root: (root / "manifest.jsonl").unlink(),
    "manifest not json": lambda root: (root / "manifest.jsonl").write_text("{not json\n"),
    "missing shard": lambda root: (root / "train-00000.array_record").unlink(),
}


@pytest.fixture
def broken_copy(train_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(train_root, root)
    return root


@pytest.mark.parametrize("breaker", sorted(BREAKERS))
def test_open_rejects_broken_folders_in_one_line(broken_copy, breaker):
    BREAKERS[breaker](broken_copy)
    with pytest.raises(DatasetError) as e:
        PreparedDataset.open(broken_copy)
    msg = str(e.value)
    assert "\n" not in msg and str(broken_copy) in msg, msg
    with pytest.raises(DatasetError):  # and the pipelines say the same
        train_dataset(broken_copy, CFG, 2, seed=0, log=quiet)


def _read_all(ds):
    return list(make_iterator(ds))


def test_corrupt_record_bytes_give_dataset_error(broken_copy):
    shard = broken_copy / "train-00000.array_record"
    data = bytearray(shard.read_bytes())
    at = data.find(b"IDAT") + 8  # inside the first stored PNG
    assert at > 8
    data[at:at + 8] = bytes(b ^ 0xFF for b in data[at:at + 8])
    shard.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="undecodable"):
        _read_all(train_dataset(broken_copy, CFG, 2, seed=0, num_epochs=1, log=quiet))


def test_truncated_shard_gives_dataset_error(broken_copy):
    shard = broken_copy / "train-00000.array_record"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(DatasetError, match="train-00000"):
        _read_all(train_dataset(broken_copy, CFG, 2, seed=0, num_epochs=1, log=quiet))


@pytest.mark.parametrize("payload, match", [(b"not a png at all", "undecodable"), ("png 9x9", "size")])
def test_wrong_record_payload_gives_dataset_error(broken_copy, payload, match):
    """A well-formed shard whose record 0 is not a PNG, or a PNG of another size than the manifest's."""
    import grain
    from array_record.python.array_record_module import ArrayRecordWriter

    shard = broken_copy / "train-00000.array_record"
    records = [bytes(r) for r in grain.sources.ArrayRecordDataSource([str(shard)])]
    if payload == "png 9x9":
        import io

        buf = io.BytesIO()
        Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(buf, format="PNG")
        payload = buf.getvalue()
    shard.unlink()
    writer = ArrayRecordWriter(str(shard), "group_size:1")
    for r in [payload] + records[1:]:
        writer.write(r)
    writer.close()
    with pytest.raises(DatasetError, match=match):
        _read_all(train_dataset(broken_copy, CFG, 2, seed=0, num_epochs=1, log=quiet))
