"""An interactive explorer of one evaluation (:class:`fvae_core.evaluate.EvalResult`): pick VAEs, a
resolution and an image, then look at zoomed crops, error maps or that image's spectra.

The logic is pure and testable without a notebook: an :class:`ExplorerState` says what to show,
:func:`render` turns ``(result, state)`` into a ``matplotlib.figure.Figure`` and :func:`metrics_table`
into a table of the image's headline metrics. :class:`Explorer` only wires ipywidgets to that state
and puts each rendered figure into an ``Output`` widget; notebook 04 (ablations) calls it in one line.

Views (all from the reconstructions kept by ``evaluate(..., keep_recs=True)``):

* ``"crops"``: the original | each selected VAE, a ``crop``² window drawn pixel by pixel
  (nearest neighbour) at about ``zoom`` screen pixels per image pixel. The window is centred on
  ``centre`` or, when it is None, the one with the strongest edges of the original's Oklab L
  (:func:`fvae_core.plotting.strongest_edge_crop`): blur and ringing show there first.
* ``"errors"``: the channel-mean ``|rec − orig| × error_gain`` (clipped to 1) of each VAE over the
  same window, in magma, as :func:`fvae_core.plotting.crop_grid` draws them.
* ``"spectrum"``: the Oklab L radial power spectrum (:func:`fvae_core.spectra.radial_spectra`) of
  the original and of each VAE's reconstruction of this one image, and their ratio in dB
  (:func:`fvae_core.spectra.spectral_ratio_db`; 0 dB = power kept, below = lost), titled with the
  image's PSNR, LPIPS and ΔE_OK from ``result.rows``. The curves are recomputed from the images the
  VAE saw, exactly as :func:`fvae_core.evaluate.evaluate` computed the stored ones.

ipywidgets, IPython and matplotlib are imported inside the functions that need them, so importing
this module costs nothing. Figures are plain Agg ``Figure`` objects, never pyplot figures: nothing
is registered globally, so re-rendering cannot leak figures.
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import html
import io
import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from fvae_core.evaluate import EvalResult

VIEWS = ("crops", "errors", "spectrum")
#: Screen pixels per inch of the explorer's figures: a panel is ``crop · zoom / DPI`` inches wide.
DPI = 100
_PANEL_INCHES = (1.6, 6.0)  # a panel is never smaller (titles must fit) nor larger (the page must)
_MIN_WIDTH = 4.0  # inches: room for the two-line title
_MIN_CROP = 8


class ExplorerError(ValueError):
    """An explorer state that does not fit the evaluation result (unknown VAE, bad index...); one line."""


@dataclasses.dataclass(frozen=True)
class ExplorerState:
    """What the explorer shows. ``image`` indexes ``result.views[resolution]``; ``centre`` is the crop
    centre ``(y, x)`` in that image's pixels, or None for the strongest-edge window."""

    vaes: tuple[str, ...]
    resolution: int
    image: int = 0
    centre: tuple[int, int] | None = None
    crop: int = 32
    zoom: int = 4
    view: str = "crops"
    error_gain: float = 4.0


# ---- pure functions ----------------------------------------------------------------------------------------
def image_choices(result: "EvalResult", resolution: int) -> list[tuple[str, int]]:
    """``[(label, index)]`` of the images evaluated at ``resolution``, for a dropdown."""
    if resolution not in result.resolutions or resolution not in result.views:
        raise ExplorerError(f"resolution {resolution!r} is not in the result (have: {_join(result.resolutions)})")
    return [(f"{i}: {v.name} ({v.subset})", i) for i, v in enumerate(result.views[resolution])]


def default_state(result: "EvalResult") -> ExplorerState:
    """All VAEs, the first resolution and image, the strongest-edge crop (half the image, at most 64 px)."""
    if not result.resolutions:
        raise ExplorerError("the result has no resolution with images")
    res = result.resolutions[0]
    return ExplorerState(vaes=tuple(result.vaes), resolution=res, image=0, centre=None,
                         crop=max(_MIN_CROP, min(64, res // 2)))


def validate(result: "EvalResult", state: ExplorerState, *, need_recs: bool = False) -> None:
    """Raise :class:`ExplorerError` (one line) unless ``state`` can be shown for ``result``."""
    if not isinstance(state, ExplorerState):
        raise ExplorerError(f"expected an ExplorerState, got {type(state).__name__}")
    if not state.vaes:
        raise ExplorerError("no VAE selected")
    unknown = [v for v in state.vaes if v not in result.vaes]
    if unknown:
        raise ExplorerError(f"unknown VAE {unknown[0]!r} (have: {_join(result.vaes)})")
    n = len(image_choices(result, state.resolution))
    if not _is_int(state.image) or not 0 <= state.image < n:
        raise ExplorerError(f"image index {state.image!r} out of range: resolution {state.resolution} has {n} images")
    if state.view not in VIEWS:
        raise ExplorerError(f"view {state.view!r} must be one of {_join(VIEWS)}")
    if not _is_int(state.crop) or state.crop < 1:
        raise ExplorerError(f"crop size must be a positive integer, got {state.crop!r}")
    if not _is_int(state.zoom) or state.zoom < 1:
        raise ExplorerError(f"zoom must be a positive integer, got {state.zoom!r}")
    if not (isinstance(state.error_gain, (int, float)) and math.isfinite(state.error_gain) and state.error_gain > 0):
        raise ExplorerError(f"error gain must be a positive number, got {state.error_gain!r}")
    if state.centre is not None:
        r = state.resolution
        if (not isinstance(state.centre, (tuple, list)) or len(state.centre) != 2 or not all(_is_int(c) for c in state.centre)
                or not all(0 <= c < r for c in state.centre)):
            raise ExplorerError(f"crop centre {state.centre!r} is not a pixel (y, x) of the {r}×{r} image")
    if need_recs:
        missing = [v for v in state.vaes if (v, state.resolution) not in result.recs]
        if missing:
            raise ExplorerError(f"no reconstructions kept for {missing[0]!r} at {state.resolution}: "
                                "evaluate with keep_recs=True")


def crop_box(result: "EvalResult", state: ExplorerState) -> tuple[int, int, int]:
    """Top-left ``(y, x)`` and side of the crop window, clipped to the image (side ≤ resolution)."""
    validate(result, state)
    r = state.resolution
    size = min(state.crop, r)
    if state.centre is None:
        y, x = _strongest_edge(result, r, state.image, size)
    else:
        y = int(np.clip(state.centre[0] - size // 2, 0, r - size))
        x = int(np.clip(state.centre[1] - size // 2, 0, r - size))
    return y, x, size


def crop_centre(box: tuple[int, int, int]) -> tuple[int, int]:
    """The ``centre`` that gives back ``box`` from :func:`crop_box` (so a slider can show the auto crop)."""
    y, x, size = box
    return y + size // 2, x + size // 2


def image_rows(result: "EvalResult", state: ExplorerState) -> dict[str, dict]:
    """``{vae: row}`` of ``result.rows`` for the state's image and resolution, for each selected VAE."""
    validate(result, state)
    name = result.views[state.resolution][state.image].name
    rows = {r["vae"]: r for r in result.rows if r["resolution"] == state.resolution and r["image"] == name}
    return {v: rows.get(v, {}) for v in state.vaes}


def metrics_table(result: "EvalResult", state: ExplorerState, *, fmt: str = "html") -> str:
    """That image's headline metrics (:data:`fvae_core.evaluate.HEADLINE`), one row per selected VAE,
    as an HTML table (``fmt="html"``, for an ipywidgets ``HTML``) or a GitHub markdown table."""
    from fvae_core.evaluate import HEADLINE

    if fmt not in ("html", "markdown"):
        raise ExplorerError(f"fmt {fmt!r} must be 'html' or 'markdown'")
    rows = image_rows(result, state)
    present = set(result.metric_keys)
    cols = [(k, title) for k, title in HEADLINE if k in present]
    head = ["VAE"] + [t for _, t in cols]
    body = [[v] + [_number(row.get(k)) for k, _ in cols] for v, row in rows.items()]
    view = result.views[state.resolution][state.image]
    caption = f"{view.name} ({view.subset}), {state.resolution}×{state.resolution}"
    if fmt == "markdown":
        cell = lambda s: str(s).replace("|", "\\|")  # noqa: E731
        lines = [f"**{cell(caption)}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in body]
        return "\n".join(lines)
    esc = html.escape
    out = [f"<table><caption style='text-align:left'>{esc(caption)}</caption>",
           "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in r) + "</tr>" for r in body]
    return "\n".join(out + ["</table>"])


def render(result: "EvalResult", state: ExplorerState):
    """The figure of ``state``'s view (see the module docstring): 1 + n axes for ``"crops"``, n for
    ``"errors"`` and 2 (spectra, ratio) for ``"spectrum"``, n the number of selected VAEs."""
    validate(result, state, need_recs=True)
    from fvae_core.plotting import _new_figure

    if state.view == "spectrum":
        return _render_spectrum(result, state, _new_figure)
    y, x, size = crop_box(result, state)
    orig = _original01(result, state.resolution, state.image)
    recs = {v: result.recs[(v, state.resolution)][state.image] for v in state.vaes}
    rows = image_rows(result, state)
    win = (slice(y, y + size), slice(x, x + size))
    if state.view == "crops":
        panels = [("original", orig[win], {})]
        panels += [(f"{v}\nPSNR {_number(rows[v].get('psnr'))} dB", rec[win], {}) for v, rec in recs.items()]
    else:
        panels = []
        for v, rec in recs.items():
            err = np.abs(rec[win].astype(np.float64) - orig[win]).mean(-1)
            panels.append((f"|{v} − orig| ×{state.error_gain:g}", np.clip(err * state.error_gain, 0.0, 1.0),
                           {"cmap": "magma", "vmin": 0.0, "vmax": 1.0}))
    side = float(np.clip(size * state.zoom / DPI, *_PANEL_INCHES))
    fig = _new_figure((max(side * len(panels), _MIN_WIDTH), side + 0.9))
    fig.set_dpi(DPI)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (title, img, kw) in zip(axes, panels):
        ax.imshow(np.clip(img, 0.0, 1.0) if img.ndim == 3 else img, interpolation="nearest", **kw)
        ax.set_title(title, fontsize=8)
        ax.set_axis_off()
    view = result.views[state.resolution][state.image]
    fig.suptitle(f"{view.name} @ {state.resolution}²\ncrop y={y}, x={x}, {size}×{size} px, zoom ×{state.zoom}",
                 fontsize=8)
    return fig


def _render_spectrum(result: "EvalResult", state: ExplorerState, new_figure):
    from fvae_core import metrics, spectra
    from fvae_core.plotting import plot_spectra, plot_spectral_ratio

    def lightness(img01):
        return metrics.oklab_np(np.asarray(img01, np.float64))[None, ..., 0]  # (1, H, W)

    L_orig = lightness(_original01(result, state.resolution, state.image))
    power, ratio = {}, {}
    for v in state.vaes:
        rec = result.recs[(v, state.resolution)][state.image]
        freqs, p_orig, p_rec, _ = spectra.radial_spectra(L_orig, lightness(rec))
        power.setdefault("original", np.log10(np.maximum(p_orig[0], spectra.POWER_FLOOR)))
        power[v] = np.log10(np.maximum(p_rec[0], spectra.POWER_FLOOR))
        ratio[v] = spectra.spectral_ratio_db(p_rec[0], p_orig[0])
    fig = new_figure((11.0, 4.4))
    fig.set_dpi(DPI)
    ax_p, ax_r = fig.subplots(1, 2)
    import matplotlib

    cycle = matplotlib.rcParams["axes.prop_cycle"].by_key().get("color") or ["tab:blue"]
    # A VAE keeps its colour in both panels and whatever else is selected.
    colours = [cycle[result.vaes.index(v) % len(cycle)] for v in state.vaes]
    ax_p.set_prop_cycle(color=["k"] + colours)
    ax_r.set_prop_cycle(color=colours)
    plot_spectra(freqs, power, ax=ax_p, title="Oklab L radial power")
    plot_spectral_ratio(freqs, ratio, ax=ax_r, title="Oklab L ratio rec/orig")
    view = result.views[state.resolution][state.image]
    rows = image_rows(result, state)
    line = " · ".join(f"{v}: PSNR {_number(r.get('psnr'))} dB, LPIPS {_number(r.get('lpips'))}, "
                      f"ΔE_OK {_number(r.get('delta_e_ok_mean'))}" for v, r in rows.items())
    fig.suptitle(f"{view.name} @ {state.resolution}²\n{line}", fontsize=8)
    return fig


# ---- helpers -------------------------------------------------------------------------------------------------
def _original01(result: "EvalResult", resolution: int, index: int) -> np.ndarray:
    """The image exactly as the VAEs received it (float32 / 255, as in ``evaluate``), so an identity
    VAE's reconstruction equals it bit for bit and its error and spectral ratio are exactly zero."""
    return result.views[resolution][index].rgb.astype(np.float32) / np.float32(255.0)


def _strongest_edge(result: "EvalResult", resolution: int, index: int, size: int) -> tuple[int, int]:
    from fvae_core import metrics
    from fvae_core.plotting import strongest_edge_crop

    L = metrics.oklab_np(_original01(result, resolution, index).astype(np.float64))[..., 0]
    return strongest_edge_crop(L, size)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _join(items) -> str:
    return ", ".join(str(i) for i in items) or "none"


def _number(v) -> str:
    """A metric for a title or table: 4 significant digits, ∞ for a perfect PSNR, – when not measured."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    v = float(v)
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    return f"{v:.4g}"


def _png_output(fig) -> dict:
    """``fig`` as one Jupyter ``display_data`` output message (base64 PNG), the form ``Output.outputs`` holds."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return {"output_type": "display_data", "metadata": {},
            "data": {"image/png": base64.b64encode(buf.getvalue()).decode("ascii"), "text/plain": repr(fig)}}


def _text_output(text: str) -> dict:
    return {"output_type": "display_data", "metadata": {}, "data": {"text/plain": text}}


# ---- the widget ----------------------------------------------------------------------------------------------
class Explorer:
    """ipywidgets around :func:`render`: ``Explorer(result).widget`` is the box to display (or just
    ``Explorer(result)`` as a cell's last line). Every change calls :meth:`_update` once, which
    renders :attr:`state` and replaces the ``Output``'s one figure and the metrics table.

    Moving a crop slider picks that centre (and unticks "strongest edge"); ticking it again goes back
    to the strongest-edge window, which the sliders then show. Changing the resolution keeps the
    same image (by name) and the same place in it where possible. An invalid state (e.g. no VAE
    selected) is shown as a one-line message instead of a figure.

    The figure reaches the ``Output`` as one PNG ``display_data`` message assigned to its
    ``outputs`` (what ``Output.append_display_data`` appends), not through ``with output:
    display(...)``: that needs a live kernel and a parent message, would clear and redraw in two
    steps (flicker), and could not be checked in a test. The ``Figure`` is kept as :attr:`figure`
    until the next render replaces it; it was never registered with pyplot, so nothing else holds it.
    """

    def __init__(self, result: "EvalResult", state: ExplorerState | None = None):
        import ipywidgets as W

        state = default_state(result) if state is None else state
        validate(result, state, need_recs=True)
        self.result = result
        self.renders = 0
        self.figure = None  # the last rendered Figure (e.g. for save_figure); the previous one is dropped
        self._syncing = 0
        r = state.resolution
        centre = crop_centre(crop_box(result, state)) if state.centre is None else state.centre
        self.vae_select = W.SelectMultiple(options=list(result.vaes), value=tuple(state.vaes), description="VAEs",
                                           rows=min(6, max(2, len(result.vaes))))
        self.resolution = W.Dropdown(options=list(result.resolutions), value=r, description="resolution")
        self.image = W.Dropdown(options=image_choices(result, r), value=state.image, description="image")
        self.view = W.ToggleButtons(options=list(VIEWS), value=state.view, description="view")
        self.crop_y = W.IntSlider(value=centre[0], min=0, max=r - 1, description="crop y")
        self.crop_x = W.IntSlider(value=centre[1], min=0, max=r - 1, description="crop x")
        self.auto_centre = W.Checkbox(value=state.centre is None, description="strongest edge", indent=False)
        self.crop_size = W.IntSlider(value=min(state.crop, r), min=min(_MIN_CROP, r), max=r, description="crop px")
        self.zoom = W.IntSlider(value=state.zoom, min=1, max=max(16, state.zoom), description="zoom")
        self.error_gain = W.FloatSlider(value=state.error_gain, min=1.0, max=max(32.0, state.error_gain), step=1.0,
                                        description="error gain")
        self.output = W.Output()
        self.metrics = W.HTML()
        for w in (self.vae_select, self.resolution, self.image, self.view, self.crop_y, self.crop_x,
                  self.auto_centre, self.crop_size, self.zoom, self.error_gain):
            w.observe(self._on_change, names="value")
        self._box = W.VBox([
            W.HBox([self.vae_select, W.VBox([self.resolution, self.image, self.view])]),
            W.HBox([self.crop_y, self.crop_x, self.auto_centre]),
            W.HBox([self.crop_size, self.zoom, self.error_gain]),
            self.metrics, self.output])
        self._update()

    @property
    def widget(self):
        """The VBox holding every control, the metrics table and the figure."""
        return self._box

    def _repr_mimebundle_(self, **kwargs):
        return self._box._repr_mimebundle_(**kwargs)

    @property
    def state(self) -> ExplorerState:
        """The state the widgets describe now (VAEs in the result's order)."""
        chosen = set(self.vae_select.value)
        return ExplorerState(
            vaes=tuple(v for v in self.result.vaes if v in chosen), resolution=self.resolution.value,
            image=self.image.value, centre=None if self.auto_centre.value else (self.crop_y.value, self.crop_x.value),
            crop=self.crop_size.value, zoom=self.zoom.value, view=self.view.value,
            error_gain=float(self.error_gain.value))

    def _on_change(self, change) -> None:
        if self._syncing:
            return  # a value we set ourselves while syncing: the caller renders once at the end
        with self._sync():
            if change["owner"] is self.resolution:
                self._follow_resolution(change["old"], change["new"])
            elif change["owner"] in (self.crop_y, self.crop_x):
                self.auto_centre.value = False
        self._update()

    @contextlib.contextmanager
    def _sync(self):
        self._syncing += 1
        try:
            yield
        finally:
            self._syncing -= 1

    def _follow_resolution(self, old: int, new: int) -> None:
        """New image options (the same image by name if it was evaluated at ``new``), slider ranges,
        and the manual centre moved to the same relative place (the views are the same centre square)."""
        name = self.result.views[old][self.image.value].name if old in self.result.views else None
        names = [v.name for v in self.result.views[new]]
        y, x = self.crop_y.value, self.crop_x.value
        self.image.options = image_choices(self.result, new)
        self.image.value = names.index(name) if name in names else 0
        scale = new / old
        for slider, c in ((self.crop_y, y), (self.crop_x, x)):
            slider.max = new - 1
            slider.value = int(np.clip(math.floor((c + 0.5) * scale), 0, new - 1))  # the pixel under the old centre
        self.crop_size.min = min(_MIN_CROP, new)
        self.crop_size.max = new

    def _update(self) -> None:
        """Render the current state into the Output (replacing the old figure) and the metrics HTML."""
        self.renders += 1
        state = self.state
        try:
            fig = render(self.result, state)
            table = metrics_table(self.result, state)
        except ExplorerError as e:
            self.figure = None
            self.output.outputs = (_text_output(str(e)),)
            self.metrics.value = f"<p style='color:#b00020'>{html.escape(str(e))}</p>"
            return
        self.figure = fig
        self.output.outputs = (_png_output(fig),)
        self.metrics.value = table
        if state.centre is None:
            with self._sync():  # show where the strongest-edge window is
                self.crop_y.value, self.crop_x.value = crop_centre(crop_box(self.result, state))
