"""The run/image explorer: pure render/metrics functions on a real (small) evaluation of fake VAEs with
a known effect, and the ipywidgets wiring driven programmatically, without a kernel.

Oracles: the identity "VAE" must show an all-zero error map and a 0 dB spectral ratio; the blur
"VAE"'s per-image ratio line must equal the one :func:`fvae_core.evaluate.evaluate` stored for that
image (so the explorer shows the right image, resolution and channel); the crops must be the very
pixels of the view the VAEs saw.
"""
from __future__ import annotations

import base64
import dataclasses
import gc
import io
import subprocess
import sys
import weakref

import numpy as np
import pytest

from fake_vaes import Blur, Identity
from fvae_core.evaluate import EvalImage, evaluate, gather_images
from fvae_core.explorer import (DPI, VIEWS, Explorer, ExplorerError, ExplorerState, crop_box, crop_centre,
                                default_state, image_choices, metrics_table, render)

matplotlib = pytest.importorskip("matplotlib")
pytest.importorskip("ipywidgets")
from matplotlib.figure import Figure  # noqa: E402


def _quiet(*args):
    pass


@pytest.fixture(scope="module")
def images():
    imgs, _ = gather_images(["openmoji", "photos"], limit=2, log=_quiet)
    assert len(imgs) == 4 and min(min(im.rgb.shape[:2]) for im in imgs) >= 128
    return imgs


@pytest.fixture(scope="module")
def result(images):
    return evaluate([Identity(), Blur()], images, [64], lpips_net=None, log=_quiet)


@pytest.fixture(scope="module")
def result2(images):
    """Two resolutions; a 96 px image first, so it exists at 64 but not at 128 and every index shifts."""
    y, x = np.mgrid[:96, :96]
    small = EvalImage("synthetic/small", "synthetic",
                      np.stack([(y * 2) % 256, (x * 2) % 256, ((x + y) * 3) % 256], -1).astype(np.uint8))
    return evaluate([Identity(), Blur()], [small, *images], [64, 128], lpips_net=None, log=_quiet)


def _state(result, **kw):
    return dataclasses.replace(default_state(result), **kw)


def _line(ax, label):
    (line,) = [ln for ln in ax.get_lines() if ln.get_label() == label]
    return line


def _png_of(explorer):
    (out,) = explorer.output.outputs
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(out["data"]["image/png"])))


def test_import_is_cheap():
    code = ("import sys, fvae_core.explorer; "
            "print(sorted(m for m in ('matplotlib', 'ipywidgets', 'IPython', 'jax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_choices_and_default_state(result):
    choices = image_choices(result, 64)
    assert [i for _, i in choices] == [0, 1, 2, 3]
    assert all(v.name in label and v.subset in label for (label, _), v in zip(choices, result.views[64]))
    s = default_state(result)
    assert s == ExplorerState(vaes=("identity", "blur"), resolution=64, image=0, centre=None, crop=32, zoom=4,
                              view="crops", error_gain=4.0)


@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize("vaes", [("identity", "blur"), ("blur",)])
def test_render_axes_per_view(result, view, vaes):
    fig = render(result, _state(result, vaes=vaes, view=view))
    assert isinstance(fig, Figure)
    expected = {"crops": 1 + len(vaes), "errors": len(vaes), "spectrum": 2}[view]
    assert len(fig.axes) == expected


def test_crops_are_the_view_pixels_and_identity_error_is_zero(result):
    s = _state(result, image=2, centre=(40, 10), crop=24)
    y, x, size = crop_box(result, s)
    assert (y, x, size) == (28, 0, 24)  # centred on (40, 10), then clipped at the left edge
    orig = result.views[64][2].rgb.astype(np.float32)[y:y + size, x:x + size] / np.float32(255.0)
    crops = render(result, s)
    data = [np.asarray(ax.images[0].get_array()) for ax in crops.axes]
    assert all(d.shape == (24, 24, 3) for d in data)
    np.testing.assert_array_equal(data[0], orig)
    np.testing.assert_array_equal(data[1], orig)  # identity
    assert np.abs(data[2] - orig).max() > 0.05  # blur
    errors = render(result, dataclasses.replace(s, view="errors"))
    err_id, err_blur = (np.asarray(ax.images[0].get_array()) for ax in errors.axes)
    assert err_id.shape == (24, 24) and np.all(err_id == 0.0)
    blur = result.recs[("blur", 64)][2][y:y + size, x:x + size]
    np.testing.assert_allclose(err_blur, np.clip(4.0 * np.abs(blur - orig).mean(-1), 0, 1), atol=1e-6)
    assert err_blur.max() > 0.1


def test_auto_crop_round_trips_through_its_centre(result):
    s = _state(result, image=3, crop=16)
    box = crop_box(result, s)
    assert box[2] == 16 and 0 <= box[0] <= 48 and 0 <= box[1] <= 48
    assert crop_box(result, dataclasses.replace(s, centre=crop_centre(box))) == box
    assert crop_box(result, dataclasses.replace(s, crop=500))[2] == 64  # clipped to the image


def test_spectrum_view_identity_is_0db_and_blur_matches_evaluate(result):
    i = 1
    fig = render(result, _state(result, image=i, view="spectrum"))
    ax_power, ax_ratio = fig.axes
    f = result.spectra[("blur", 64)]["freqs"]
    keep = f > 0
    assert np.all(_line(ax_ratio, "identity").get_ydata() == 0.0)
    np.testing.assert_allclose(_line(ax_power, "identity").get_ydata(), _line(ax_power, "original").get_ydata())
    s = result.spectra[("blur", 64)]
    stored = 10.0 * (s["rec"][i, 0] - s["orig"][i, 0])  # evaluate's own log10 curves, Oklab L
    blur = _line(ax_ratio, "blur")
    np.testing.assert_allclose(blur.get_xdata(), f[keep])
    np.testing.assert_allclose(blur.get_ydata(), stored[keep], atol=1e-8)
    assert np.all(blur.get_ydata()[f[keep] > 0.25] < -3.0)
    np.testing.assert_allclose(_line(ax_power, "original").get_ydata(), s["orig"][i, 0][keep], atol=1e-10)
    title = fig._suptitle.get_text()
    psnr = [r["psnr"] for r in result.select("blur", 64) if r["image"] == result.views[64][i].name][0]
    assert "identity: PSNR ∞ dB" in title and f"blur: PSNR {psnr:.4g} dB" in title
    assert "LPIPS –" in title and "ΔE_OK" in title  # LPIPS was not measured (lpips_net=None)


def test_metrics_table(result):
    s = _state(result, image=2)
    name = result.views[64][2].name
    rows = {r["vae"]: r for r in result.select(resolution=64) if r["image"] == name}
    table = metrics_table(result, s)
    assert table.startswith("<table>") and table.count("<tr>") == 3
    assert f"<td>{rows['blur']['psnr']:.4g}</td>" in table and "<td>∞</td>" in table and name in table
    md = metrics_table(result, dataclasses.replace(s, vaes=("blur",)), fmt="markdown").splitlines()
    assert md[2].startswith("| VAE | PSNR (dB) | SSIM | LPIPS") and len(md) == 5
    assert md[4].startswith(f"| blur | {rows['blur']['psnr']:.4g} | {rows['blur']['ssim']:.4g} | – |")


@pytest.mark.parametrize("change, message", [
    ({"vaes": ("identity", "nope")}, "unknown VAE 'nope'"),
    ({"vaes": ()}, "no VAE selected"),
    ({"image": 4}, "image index 4 out of range"),
    ({"image": -1}, "out of range"),
    ({"resolution": 128}, "resolution 128 is not in the result"),
    ({"view": "histogram"}, "view 'histogram' must be one of"),
    ({"crop": 0}, "crop size"),
    ({"zoom": 0}, "zoom"),
    ({"centre": (64, 0)}, "not a pixel"),
    ({"error_gain": float("nan")}, "error gain"),
])
def test_bad_state_raises_one_line(result, change, message):
    bad = _state(result, **change)
    for fn in (render, metrics_table):
        with pytest.raises(ValueError, match=message) as info:
            fn(result, bad)
        assert isinstance(info.value, ExplorerError) and "\n" not in str(info.value)


def test_render_needs_kept_reconstructions(result):
    no_recs = dataclasses.replace(result, recs={})
    with pytest.raises(ExplorerError, match="keep_recs=True"):
        render(no_recs, default_state(no_recs))
    assert "<table>" in metrics_table(no_recs, default_state(no_recs))  # the metrics need no images


def test_explorer_one_render_per_change(result):
    ex = Explorer(result)
    assert ex.renders == 1 and ex.state == default_state(result)
    assert ex.widget.__class__.__name__ == "VBox"
    assert "application/vnd.jupyter.widget-view+json" in ex._repr_mimebundle_()
    png = _png_of(ex)
    assert png.size == tuple(int(round(v)) for v in ex.figure.get_size_inches() * DPI)
    assert "<table>" in ex.metrics.value
    # The sliders show where the strongest-edge window is.
    assert (ex.crop_y.value, ex.crop_x.value) == crop_centre(crop_box(result, ex.state))

    steps = [
        (lambda: setattr(ex.vae_select, "value", ("blur",)), {"vaes": ("blur",)}),
        (lambda: setattr(ex.view, "value", "errors"), {"view": "errors"}),
        (lambda: setattr(ex.image, "value", 2), {"image": 2}),
        (lambda: setattr(ex.crop_size, "value", 16), {"crop": 16}),
        (lambda: setattr(ex.zoom, "value", 8), {"zoom": 8}),
        (lambda: setattr(ex.error_gain, "value", 10.0), {"error_gain": 10.0}),
        (lambda: setattr(ex.crop_x, "value", 5), lambda: {"centre": (ex.crop_y.value, 5)}),  # a manual centre
        (lambda: setattr(ex.crop_y, "value", 50), {"centre": (50, 5)}),
        (lambda: setattr(ex.auto_centre, "value", True), {"centre": None}),
        (lambda: setattr(ex.view, "value", "spectrum"), {"view": "spectrum"}),
        (lambda: setattr(ex.vae_select, "value", ("blur", "identity")), {"vaes": ("identity", "blur")}),
    ]
    expected = ex.state
    for n, (act, change) in enumerate(steps, start=2):
        change = change() if callable(change) else change
        act()
        expected = dataclasses.replace(expected, **change)
        assert ex.state == expected, n
        assert ex.renders == n, (n, change)
        assert len(ex.output.outputs) == 1 and ex.figure is not None
    assert len(ex.figure.axes) == 2  # spectrum
    ex.view.value = "spectrum"  # not a change: no render
    assert ex.renders == len(steps) + 1
    ex.view.value = "crops"
    assert len(ex.figure.axes) == 3 and _png_of(ex).size[0] > 0


def test_explorer_shows_an_invalid_state_as_a_message(result):
    ex = Explorer(result)
    ex.vae_select.value = ()
    assert ex.renders == 2 and ex.figure is None
    (out,) = ex.output.outputs
    assert out["data"] == {"text/plain": "no VAE selected"} and "no VAE selected" in ex.metrics.value
    ex.vae_select.value = ("identity",)
    assert ex.renders == 3 and "image/png" in ex.output.outputs[0]["data"]


def test_explorer_resolution_refreshes_images(result2):
    names64 = [v.name for v in result2.views[64]]
    names128 = [v.name for v in result2.views[128]]
    assert names64[0] == "synthetic/small" and names128 == names64[1:]
    ex = Explorer(result2)
    assert len(ex.image.options) == 5
    ex.image.value = 3
    ex.crop_y.value, ex.crop_x.value = 10, 40  # a manual centre
    n = ex.renders
    ex.resolution.value = 128
    assert ex.renders == n + 1
    assert [i for _, i in ex.image.options] == [0, 1, 2, 3] and ex.image.label.startswith("2: " + names64[3])
    s = ex.state
    assert s.resolution == 128 and s.image == 2 and s.centre == (21, 81)  # the same image, same place
    assert ex.crop_y.max == 127 and ex.crop_size.max == 128
    assert result2.views[128][s.image].name in ex.metrics.value
    ex.resolution.value = 64
    assert ex.renders == n + 2 and ex.state.image == 3 and ex.state.centre == (10, 40) and ex.crop_x.max == 63
    ex.image.value = 0  # the small image is not evaluated at 128: fall back to the first one
    ex.crop_size.value = 64
    ex.resolution.value = 128
    assert ex.state.image == 0 and ex.state.crop == 64 and ex.renders == n + 5
    ex.resolution.value = 64
    assert ex.state.crop == 64 and ex.crop_size.max == 64


def test_explorer_leaks_no_figures(result):
    import matplotlib.pyplot as plt

    ex = Explorer(result, _state(result, crop=16, zoom=2))
    alive = [weakref.ref(ex.figure)]
    for k in range(1, 25):  # every step changes both the image and the view
        ex.image.value = k % 4
        ex.view.value = VIEWS[k % 3]
        alive.append(weakref.ref(ex.figure))
    assert ex.renders == 1 + 48
    gc.collect()
    assert [r() for r in alive if r() is not None] == [ex.figure]
    assert plt.get_fignums() == []
