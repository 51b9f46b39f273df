"""Tests of the notebook helpers in ``fvae_core.teaching`` against values known by construction."""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from coloraide import Color

from fvae_core.data.prepare import PrepareConfig, prepare
from fvae_core.teaching import BAD_INPUT_REASONS, IGNORED_NAME, colour_stats, ema_half_life_images, write_bad_inputs
from fvae_core.train_steps import ema_decay_for_batch


def test_colour_stats_constant_image_is_all_flat_one_colour():
    s = colour_stats(np.full((48, 40, 3), 128, np.uint8))
    assert (s["height"], s["width"], s["distinct_colours"]) == (48, 40, 1)
    assert s["flat_fraction"] == 1.0 and s["edge_fraction"] == 0.0
    assert s["mean_chroma"] < 1e-6  # grey has no chroma


def test_colour_stats_red_chroma_matches_coloraide():
    s = colour_stats(np.tile(np.array([255, 0, 0], np.uint8), (16, 16, 1)))
    lab = Color("srgb", [1, 0, 0]).convert("oklab").coords()
    assert s["mean_chroma"] == pytest.approx(math.hypot(lab[1], lab[2]), abs=1e-5)
    assert s["mean_lightness"] == pytest.approx(lab[0], abs=1e-5)


def test_colour_stats_two_halves_vs_noise():
    halves = np.zeros((64, 64, 3), np.uint8)
    halves[:, 32:] = 255
    s = colour_stats(halves)
    assert s["distinct_colours"] == 2 and s["edge_fraction"] > 0
    assert 0.5 < s["flat_fraction"] < 1.0  # all but the band around the edge
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    n = colour_stats(noise)
    assert n["distinct_colours"] > 4000 and n["flat_fraction"] == 0.0


def test_colour_stats_rejects_float_input():
    with pytest.raises(ValueError, match="uint8"):
        colour_stats(np.zeros((8, 8, 3)))


def test_write_bad_inputs_gives_the_expected_prepare_report(tmp_path):
    rng = np.random.default_rng(0)
    good = {f"good{i}": rng.integers(0, 256, (48, 56, 3), dtype=np.uint8) for i in range(3)}
    expected = write_bad_inputs(tmp_path / "src", good, small_side=16)
    assert expected == BAD_INPUT_REASONS
    report = prepare([tmp_path / "src"], tmp_path / "out", PrepareConfig(min_side=32), workers=0, progress=False)
    assert report.used == 3
    reasons = {Path(s["item"]).name: s["reason"] for s in report.skipped}
    assert set(reasons) == set(expected)
    for name, pattern in expected.items():
        assert re.search(pattern, reasons[name]), (name, reasons[name])
    assert [Path(f).name for f in report.ignored[str(tmp_path / "src")]] == [IGNORED_NAME]


def test_write_bad_inputs_needs_a_large_enough_first_image(tmp_path):
    with pytest.raises(ValueError, match="larger than"):
        write_bad_inputs(tmp_path, {"a": np.zeros((16, 16, 3), np.uint8)}, small_side=16)


def test_ema_half_life_is_batch_invariant_under_the_card_scaling():
    ref = ema_half_life_images(0.999, 192)
    assert ref == pytest.approx(192 * 692.8, rel=1e-3)  # 0.999**693 ~ 1/2
    for b in (8, 32, 64):
        assert ema_half_life_images(ema_decay_for_batch(b), b) == pytest.approx(ref, rel=1e-3)
    with pytest.raises(ValueError):
        ema_half_life_images(1.0, 32)
