"""Figures and tables: the one home for everything the notebooks, ``fvae eval`` and ``fvae demo`` draw.

* :func:`image_grid` lays images out as one uint8 array (demo grids, training sample grids).
* :func:`save_figure` is the one way a figure reaches disk: ``figures/NN_name.png``, atomically.
* :func:`plot_spectra`, :func:`plot_spectral_ratio`, :func:`plot_error_spectra` draw radial spectra
  with bootstrap CI bands (:class:`fvae_core.stats.Estimate`) on a log-frequency axis in cycles/px,
  marking the band edges 1/16 and 1/4 cycles/px and Nyquist (0.5).
* :func:`crop_grid` shows zoomed crops of an original, its reconstructions and their error maps
  around the strongest edge (:func:`strongest_edge_crop`), where VAE blur and ringing show first.
* :func:`metric_table_markdown` renders metric rows (numbers or Estimates) as a GitHub table.

matplotlib is imported inside the functions, so importing this module (and the training core, which
imports :func:`image_grid`) never pays for it. Figures this module creates are plain
``matplotlib.figure.Figure`` objects on an Agg canvas: no pyplot state, no GUI backend, nothing to
leak between tests; functions that take ``ax=`` also draw into a pyplot axes the caller owns.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from fvae_core.stats import Estimate

# Band edges of the spectral metrics (cycles/px): low < 1/16 <= mid < 1/4 <= high <= Nyquist.
BAND_EDGES = (1.0 / 16.0, 1.0 / 4.0)
NYQUIST = 0.5
FIGURE_NAME = re.compile(r"^\d\d_[a-z0-9_]+$")
FIGURE_DPI = 120
# Rec. 709 luma weights, applied to the sRGB-encoded values (Y', as in video): enough to find edges.
_LUMA = np.array([0.2126, 0.7152, 0.0722])


# ---- images -------------------------------------------------------------------------------------------------
def image_grid(rows: Sequence[Sequence[np.ndarray]], pad: int = 4) -> np.ndarray:
    """Images laid out row by row into one array, with ``pad`` white pixels right of and below each
    image; shorter images are padded at the bottom and shorter rows at the right. White is 255 for
    integer images and 1.0 for float ones. All images share dtype and channel layout."""
    first = np.asarray(rows[0][0])
    white = 255 if np.issubdtype(first.dtype, np.integer) else 1.0
    extra = ((0, 0),) * (first.ndim - 2)  # channel axes, if any, are never padded
    h = max(np.shape(im)[0] for r in rows for im in r)
    out_rows = []
    for r in rows:
        padded = [np.pad(np.asarray(im), ((0, h - np.shape(im)[0]), (0, pad)) + extra, constant_values=white)
                  for im in r]
        out_rows.append(np.concatenate(padded, axis=1))
    w = max(r.shape[1] for r in out_rows)
    out_rows = [np.pad(r, ((0, pad), (0, w - r.shape[1])) + extra, constant_values=white) for r in out_rows]
    return np.concatenate(out_rows, axis=0)


def decode_grid(blocks: Mapping[int, Mapping[str, np.ndarray]], columns: int = 8, scale: float = 1.6):
    """A figure of decodes: one block per latent size, one row per VAE (labelled), ``columns`` latents
    (the same latents in every row of a block). ``blocks[size][vae]`` is ``(n, H, W, 3)`` in [0, 1]."""
    n_rows = sum(len(b) for b in blocks.values())
    widths = [next(iter(b.values())).shape[2] for b in blocks.values()]
    fig = _new_figure((scale * columns * max(widths) / 64 + 1.2, scale * n_rows * 0.9 + 0.4))
    axes = fig.subplots(n_rows, 1, squeeze=False)[:, 0]
    i = 0
    for size, by_vae in blocks.items():
        for name, imgs in by_vae.items():
            k = min(columns, len(imgs))
            axes[i].imshow(image_grid([list(np.clip(imgs[:k], 0.0, 1.0))], pad=2), interpolation="nearest")
            axes[i].set_xticks([])
            axes[i].set_yticks([])
            axes[i].set_ylabel(f"{name}\n{size}x{size}", rotation=0, ha="right", va="center", fontsize=8)
            i += 1
    return fig


def strongest_edge_crop(L: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left ``(y, x)`` of the ``size``×``size`` window (clipped to the image) of ``L`` with the
    largest summed gradient magnitude. Window sums come from a summed-area table, O(H·W)."""
    L = np.asarray(L, dtype=np.float64)
    if L.ndim != 2:
        raise ValueError(f"L must be a 2-D (H, W) image, got shape {L.shape}")
    sh, sw = min(int(size), L.shape[0]), min(int(size), L.shape[1])
    if sh < 1 or sw < 1:
        raise ValueError(f"size must be >= 1 and the image non-empty, got size={size} for shape {L.shape}")
    gy, gx = np.gradient(L) if min(L.shape) > 1 else (np.zeros_like(L), np.zeros_like(L))
    sat = np.zeros((L.shape[0] + 1, L.shape[1] + 1))
    sat[1:, 1:] = np.hypot(gy, gx).cumsum(0).cumsum(1)
    win = sat[sh:, sw:] - sat[:-sh, sw:] - sat[sh:, :-sw] + sat[:-sh, :-sw]
    y, x = np.unravel_index(int(np.argmax(win)), win.shape)
    return int(y), int(x)


def _unit_float(img: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] or float [0, 1] -> float64 [0, 1]."""
    a = np.asarray(img)
    return a / 255.0 if np.issubdtype(a.dtype, np.integer) else np.clip(a.astype(np.float64), 0.0, 1.0)


def _luma(img01: np.ndarray) -> np.ndarray:
    return img01 if img01.ndim == 2 else img01[..., :3] @ _LUMA


# ---- figures ------------------------------------------------------------------------------------------------
def _new_figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, name: str, fig_dir) -> Path:
    """Write ``fig_dir/name.png`` (``name`` like ``"05_spectra"``; 120 dpi, tight bounding box) via a
    temporary file and ``os.replace``, so a reader never sees half a PNG. Closes the figure."""
    if not isinstance(name, str) or not FIGURE_NAME.match(name):
        raise ValueError(f"figure name {name!r} must look like '05_spectra' (two digits, '_', then [a-z0-9_])")
    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    path = fig_dir / f"{name}.png"
    fd, tmp = tempfile.mkstemp(dir=fig_dir, prefix=f".{name}.", suffix=".png.tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=FIGURE_DPI, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        if "matplotlib.pyplot" in sys.modules:  # a pyplot figure would otherwise stay open (and show twice in Jupyter)
            sys.modules["matplotlib.pyplot"].close(fig)
    return path


def _axes(ax, figsize=(6.4, 4.2)):
    return _new_figure(figsize).add_subplot() if ax is None else ax


def _curve_parts(c) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    if isinstance(c, Estimate):
        return np.asarray(c.value, float), np.asarray(c.lo, float), np.asarray(c.hi, float)
    return np.asarray(c, float), None, None


def _frequency_axes(ax, freqs: np.ndarray, curves: Mapping, ylabel: str, title: str | None):
    """Shared body of the spectral plots: a line and CI band per curve on a log-frequency axis."""
    f = np.asarray(freqs, dtype=np.float64)
    keep = f > 0  # the DC bin has no place on a log axis
    for name, c in curves.items():
        v, lo, hi = _curve_parts(c)
        (line,) = ax.plot(f[keep], v[keep], label=name, lw=1.4)
        if lo is not None and np.isfinite(lo[keep]).any():
            ax.fill_between(f[keep], lo[keep], hi[keep], color=line.get_color(), alpha=0.25, lw=0)
    ax.set_xscale("log")
    f_min = float(f[keep].min()) if keep.any() else 1.0 / 256.0
    ax.set_xlim(f_min, NYQUIST * 1.02)
    ticks = [2.0 ** -k for k in range(1, 16) if 2.0 ** -k >= f_min * 0.999]
    ax.set_xticks(ticks, [f"1/{2 ** k}" for k in range(1, len(ticks) + 1)])
    ax.minorticks_off()
    trans = ax.get_xaxis_transform()  # x in data, y in axes coordinates
    for edge in BAND_EDGES:
        ax.axvline(edge, color="0.75", lw=0.8, zorder=0)
    ax.axvline(NYQUIST, color="0.45", lw=0.8, ls="--", zorder=0)
    for x0, x1, label in ((f_min, BAND_EDGES[0], "low"), (*BAND_EDGES, "mid"), (BAND_EDGES[1], NYQUIST, "high")):
        if x1 > x0:
            ax.text(np.sqrt(x0 * x1), 0.98, label, transform=trans, ha="center", va="top", fontsize=8, color="0.4",
                    bbox={"fc": "white", "ec": "none", "alpha": 0.8, "pad": 1})
    ax.set_xlabel("spatial frequency (cycles/px)")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if curves:
        ax.legend(fontsize=8, loc="best")
    return ax


def plot_spectra(freqs, curves: Mapping[str, Estimate], *, ax=None, title: str | None = None,
                 ylabel: str = "log10 power"):
    """Radial power spectra (one line and CI band per curve; plain arrays draw without a band).
    Returns the axes; a new Agg figure is made when ``ax`` is None (``ax.figure`` for :func:`save_figure`)."""
    return _frequency_axes(_axes(ax), freqs, curves, ylabel, title)


def plot_spectral_ratio(freqs, curves: Mapping[str, Estimate], *, ax=None, title: str | None = None,
                        ylabel: str = "power ratio rec/orig (dB)"):
    """Spectral ratios already in dB (e.g. ``10·log10(P_rec/P_orig)`` per image, then bootstrapped), with
    a 0 dB line: below it the reconstruction lost power (blur), above it added some (noise, ringing)."""
    ax = _frequency_axes(_axes(ax), freqs, curves, ylabel, title)
    ax.axhline(0.0, color="k", lw=0.8, zorder=1)
    return ax


def plot_error_spectra(freqs, curves: Mapping[str, Estimate], *, ax=None, title: str | None = None,
                       ylabel: str = "log10 error power"):
    """Radial power spectra of the error ``rec − orig``: which frequencies the reconstruction gets wrong."""
    return _frequency_axes(_axes(ax), freqs, curves, ylabel, title)


def crop_grid(original: np.ndarray, recs: Mapping[str, np.ndarray], *, centre: tuple[int, int] | None = None,
              size: int = 64, zoom: int = 4, error_gain: float = 4.0):
    """One row of nearest-neighbour zoomed crops: original | each reconstruction | each ``|rec − orig|``.

    Images are (H, W, 3) or (H, W), uint8 or float in [0, 1], all the same shape. The crop is the
    ``size``² window around ``centre`` ``(y, x)`` or, by default, the one with the strongest edges
    in the original's luma. Error maps are the channel-mean absolute difference × ``error_gain``
    (clipped to 1) in magma. Returns the figure.
    """
    orig = _unit_float(original)
    rec01 = {k: _unit_float(v) for k, v in recs.items()}
    for k, v in rec01.items():
        if v.shape != orig.shape:
            raise ValueError(f"reconstruction {k!r} has shape {v.shape}, the original {orig.shape}")
    H, W = orig.shape[:2]
    sh, sw = min(size, H), min(size, W)
    if centre is None:
        y, x = strongest_edge_crop(_luma(orig), size)
    else:
        y = int(np.clip(centre[0] - sh // 2, 0, H - sh))
        x = int(np.clip(centre[1] - sw // 2, 0, W - sw))

    def zoomed(img):
        c = img[y:y + sh, x:x + sw]
        return np.repeat(np.repeat(c, zoom, axis=0), zoom, axis=1)

    panels = [("original", zoomed(orig), {})]
    panels += [(k, zoomed(v), {}) for k, v in rec01.items()]
    for k, v in rec01.items():
        err = np.abs(v - orig)
        err = err.mean(-1) if err.ndim == 3 else err
        panels.append((f"|{k} − orig| ×{error_gain:g}", zoomed(np.clip(err * error_gain, 0.0, 1.0)),
                       {"cmap": "magma", "vmin": 0.0, "vmax": 1.0}))
    fig = _new_figure((2.4 * len(panels), 2.8))
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (title, img, kw) in zip(axes, panels):
        if img.ndim == 2 and not kw:
            kw = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0}
        ax.imshow(img, interpolation="nearest", **kw)
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    fig.suptitle(f"crop y={y}, x={x}, {sh}×{sw} px, zoom ×{zoom}", fontsize=9)
    return fig


# ---- tables -------------------------------------------------------------------------------------------------
def _cell(v, digits: int) -> str:
    if v is None:
        return ""
    if isinstance(v, Estimate):
        return v.fmt(digits)
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if not np.isfinite(v):
            return str(v)
        # fixed point keeps columns aligned; tiny or huge magnitudes would lose their digits there
        return f"{v:.{digits}f}" if v == 0 or 10.0 ** -digits <= abs(v) < 1e6 else f"{v:.{digits}g}"
    return str(v).replace("|", "\\|")


def metric_table_markdown(rows: Sequence[Mapping], columns: Sequence[tuple[str, str]], *, digits: int = 3) -> str:
    """A GitHub markdown table: one line per row, columns from ``(key, title)`` pairs.

    Floats print with ``digits`` decimals (``g`` format when tiny or huge), Estimates as
    ``"v [lo, hi]"``, missing keys as empty cells. No trailing newline.
    """
    lines = ["| " + " | ".join(title for _, title in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key), digits) for key, _ in columns) + " |")
    return "\n".join(lines)


def plot_curves(rows: Sequence[Mapping], keys: Sequence[str], *, ax=None, title: str | None = None,
                ylabel: str | None = None, logy: bool = False, smooth: int = 1):
    """Training curves from metric rows (``metrics.jsonl``): one line per key, x = ``step``, rows that
    lack the key skipped; ``smooth`` > 1 draws a centred moving average (the raw values faintly behind)."""
    ax = _axes(ax)
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if k in r and r[k] is not None and np.isfinite(r[k])]
        if not pts:
            continue
        x, y = np.array(pts, dtype=np.float64).T
        if smooth > 1 and len(y) > smooth:
            line, = ax.plot(x, y, alpha=0.25)
            kernel = np.ones(smooth) / smooth
            ys = np.convolve(np.pad(y, (smooth // 2, smooth - 1 - smooth // 2), mode="edge"), kernel, "valid")
            ax.plot(x, ys, color=line.get_color(), label=k)
        else:
            ax.plot(x, y, marker="o" if len(y) < 12 else None, label=k)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return ax


def plot_estimates(estimates: Mapping[str, Estimate], *, ax=None, title: str | None = None,
                   xlabel: str | None = None, zero: bool = True, delta: float | None = None):
    """A forest plot: one row per labelled scalar :class:`Estimate` (point and 95% CI bar), with a line at 0
    and, given ``delta``, the band ±δ of effects too small to matter shaded."""
    ax = _axes(ax, figsize=(6.4, 0.5 + 0.45 * max(1, len(estimates))))
    labels = list(estimates)
    for i, k in enumerate(labels):
        e = estimates[k]
        if e is None or not np.isfinite(e.value):
            continue
        lo = e.lo if np.isfinite(e.lo) else e.value
        hi = e.hi if np.isfinite(e.hi) else e.value
        ax.errorbar([e.value], [i], xerr=[[e.value - lo], [hi - e.value]], fmt="o", capsize=4, color="C0")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_ylim(-0.6, len(labels) - 0.4)
    ax.invert_yaxis()
    if zero:
        ax.axvline(0.0, color="k", lw=0.8)
    if delta:
        ax.axvspan(-delta, delta, color="0.85", zorder=0, label=f"±δ = {delta:g}")
        ax.legend(loc="best", fontsize=8)
    if xlabel:
        ax.set_xlabel(xlabel)
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def plot_activation_headroom(reports: Mapping[str, Sequence], *, ax=None, title: str | None = None):
    """Max |activation| per layer (log scale, layers in network order) for one or more
    :func:`fvae_core.precision.inspect` reports (``{label: report.layers}``), with fp16's largest finite value
    as a line: what crosses it overflows in an fp16 decode."""
    from fvae_core.precision import FP16_MAX

    ax = _axes(ax, (8.0, 3.6))
    for label, layers in reports.items():
        ax.plot(range(len(layers)), [max(m.max_abs, 1e-30) for m in layers], lw=1, marker=".", ms=3, label=label)
    ax.axhline(FP16_MAX, color="k", ls="--", lw=1, label="fp16 max (65504)")
    ax.set_yscale("log")
    ax.set_xlabel("layer (encoder, then decoder, in network order)")
    ax.set_ylabel("max |activation|")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return ax
