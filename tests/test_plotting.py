"""Figures and tables: layout, atomic PNG writes, spectral plots on synthetic curves, edge crops."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fvae_core.plotting import (crop_grid, image_grid, metric_table_markdown, plot_error_spectra, plot_spectra,
                                plot_spectral_ratio, save_figure, strongest_edge_crop)
from fvae_core.stats import Estimate, bootstrap_ci


def _solid(h, w, v):
    return np.full((h, w, 3), v, np.uint8)


def test_image_grid_layout_and_pixels():
    a, b, c = _solid(10, 6, 10), _solid(8, 5, 20), _solid(4, 3, 30)
    g = image_grid([[a, b], [c]], pad=4)
    # row 1: 6 + 4 + 5 + 4 = 19 wide, 10 + 4 high; row 2 padded right to 19 and to the tallest image, 10 + 4 high
    assert g.shape == (28, 19, 3) and g.dtype == np.uint8
    assert (g[:10, :6] == 10).all() and (g[:8, 10:15] == 20).all() and (g[14:18, :3] == 30).all()
    assert (g[8:10, 10:15] == 255).all()  # the shorter image is padded at the bottom
    assert (g[:, 6:10] == 255).all() and (g[10:14] == 255).all() and (g[14:, 3:] == 255).all()
    tight = image_grid([[_solid(4, 3, 10), c], [c, c]], pad=0)
    assert tight.shape == (8, 6, 3) and (tight[:4, :3] == 10).all() and (tight[4:, :] == 30).all()
    assert image_grid([[np.zeros((2, 2))]], pad=1)[2, 2] == 1.0  # float images pad with white 1.0


def test_import_does_not_load_matplotlib():
    code = "import sys, fvae_core.plotting; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_save_figure_writes_png_atomically(tmp_path):
    pytest.importorskip("matplotlib")
    ax = plot_spectra(np.linspace(0, 0.5, 33), {"a": np.linspace(0, -3, 33)})
    path = save_figure(ax.figure, "05_spectra", tmp_path / "figs")
    assert path == tmp_path / "figs" / "05_spectra.png"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100
    assert os.listdir(tmp_path / "figs") == ["05_spectra.png"]
    for bad in ("spectra", "5_spectra", "05-spectra", "05_Spectra", "05_spectra.png", "../05_x"):
        with pytest.raises(ValueError, match="two digits"):
            save_figure(ax.figure, bad, tmp_path / "figs")
    assert os.listdir(tmp_path / "figs") == ["05_spectra.png"]


def test_save_figure_closes_a_pyplot_figure(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    fig, _ = plt.subplots()
    n_open = len(plt.get_fignums())
    save_figure(fig, "01_pyplot", tmp_path)
    assert len(plt.get_fignums()) == n_open - 1 and (tmp_path / "01_pyplot.png").exists()


def _spectra_estimates(n=20, bins=32):
    rng = np.random.default_rng(0)
    freqs = np.arange(bins + 1) / (2 * bins)  # DC .. Nyquist
    slope = -2.0 * np.log10(np.maximum(freqs, freqs[1]))
    orig = bootstrap_ci(slope + rng.normal(0, 0.1, (n, bins + 1)), n_boot=200)
    rec = bootstrap_ci(slope - 3 * freqs + rng.normal(0, 0.1, (n, bins + 1)), n_boot=200)
    return freqs, orig, rec


def test_spectral_plots_draw_one_line_per_curve_plus_markers(tmp_path):
    pytest.importorskip("matplotlib")
    freqs, orig, rec = _spectra_estimates()
    ax = plot_spectra(freqs, {"original": orig, "rec": rec}, title="t")
    assert len(ax.lines) == 2 + 3  # curves + band edges 1/16, 1/4 + Nyquist
    assert len(ax.collections) == 2  # CI bands
    assert ax.get_xscale() == "log" and ax.get_title() == "t" and ax.get_ylabel() == "log10 power"
    assert ax.get_xlim()[1] >= 0.5 and ax.get_xlim()[0] > 0
    ratio = Estimate(rec.value - orig.value, rec.lo - orig.hi, rec.hi - orig.lo, rec.n)
    ax = plot_spectral_ratio(freqs, {"rec": ratio, "plain": 10 * (rec.value - orig.value)})
    assert len(ax.lines) == 2 + 3 + 1 and len(ax.collections) == 1  # + the 0 dB line; a plain array has no band
    assert "dB" in ax.get_ylabel()
    ax = plot_error_spectra(freqs, {"rec": rec})
    assert len(ax.lines) == 1 + 3 and ax.get_ylabel() == "log10 error power"
    save_figure(ax.figure, "02_error_spectra", tmp_path)


def test_spectral_plots_draw_into_a_given_axes():
    plt = pytest.importorskip("matplotlib.pyplot")
    freqs, orig, rec = _spectra_estimates()
    fig, axes = plt.subplots(1, 2)
    assert plot_spectra(freqs, {"o": orig}, ax=axes[1]) is axes[1]
    assert len(axes[0].lines) == 0 and len(axes[1].lines) == 4
    plt.close(fig)


def test_strongest_edge_crop_finds_a_planted_square():
    rng = np.random.default_rng(3)
    L = rng.normal(0.5, 0.01, (200, 240))
    L[120:140, 30:50] += 0.4  # a 20 px square, the only strong edge
    y, x = strongest_edge_crop(L, 32)
    assert y <= 119 and y + 32 >= 141 and x <= 29 and x + 32 >= 51  # the window holds the square's whole outline
    assert strongest_edge_crop(L, 500) == (0, 0)  # clipped to the image
    L2 = np.zeros((64, 64))
    L2[50:, 55:] = 1.0  # a corner at the bottom right: the window is clipped inside the image
    y, x = strongest_edge_crop(L2, 16)
    assert 34 <= y <= 48 and 39 <= x <= 48


def test_crop_grid_returns_a_figure(tmp_path):
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(0)
    orig = rng.integers(0, 256, (96, 80, 3), dtype=np.uint8)
    recs = {"a": np.clip(orig / 255.0 + rng.normal(0, 0.02, orig.shape), 0, 1), "b": orig}
    fig = crop_grid(orig, recs, size=32, zoom=2)
    assert len(fig.axes) == 1 + 2 + 2
    assert [ax.get_title() for ax in fig.axes][:3] == ["original", "a", "b"]
    assert fig.axes[0].images[0].get_array().shape == (64, 64, 3)
    fig = crop_grid(orig, recs, centre=(0, 79), size=32)  # clipped at the top right
    assert "y=0, x=48" in fig.get_suptitle()
    save_figure(fig, "03_crops", tmp_path)
    with pytest.raises(ValueError, match="shape"):
        crop_grid(orig, {"bad": orig[:10]})


def test_metric_table_markdown():
    rows = [{"vae": "ft-mse", "res": 256, "psnr": Estimate(31.23456, 30.9, 31.5, 40), "lpips": 0.052345},
            {"vae": "a|b", "res": 512, "psnr": 29.0, "lpips": float("nan")}]
    cols = [("vae", "VAE"), ("res", "res"), ("psnr", "PSNR (dB)"), ("lpips", "LPIPS"), ("ssim", "SSIM")]
    assert metric_table_markdown(rows, cols) == (
        "| VAE | res | PSNR (dB) | LPIPS | SSIM |\n"
        "|---|---|---|---|---|\n"
        "| ft-mse | 256 | 31.235 [30.900, 31.500] | 0.052 |  |\n"
        "| a\\|b | 512 | 29.000 | nan |  |")
    small_big = metric_table_markdown([{"x": 1.5e-5}, {"x": 2.5e7}, {"x": 0.0}], [("x", "x")], digits=2)
    assert small_big.splitlines()[2:] == ["| 1.5e-05 |", "| 2.5e+07 |", "| 0.00 |"]


def test_plot_curves_and_estimates():
    from fvae_core.plotting import plot_curves, plot_estimates
    from fvae_core.stats import Estimate

    rows = [{"step": s, "loss": 1.0 / s, **({"val": 2.0} if s % 5 == 0 else {})} for s in range(1, 31)]
    ax = plot_curves(rows, ["loss", "val", "absent"], smooth=5)
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels.count("loss") == 1 and labels.count("val") == 1 and "absent" not in labels
    ax = plot_estimates({"a": Estimate(1.0, 0.5, 1.5, 10), "b": Estimate(-1.0, float("nan"), float("nan"), 1)})
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b"]
