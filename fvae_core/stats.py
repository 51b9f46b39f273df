"""Bootstrap confidence intervals for per-image metrics and spectra (NumPy only, seeded, vectorised).

Every number the notebooks report about a set of images is a statistic of a small sample (tens to
hundreds of images), so it comes with a 95% interval. We use the nonparametric percentile bootstrap:
resample the images with replacement ``n_boot`` times, recompute the statistic, and take the
``(1 - ci)/2`` and ``(1 + ci)/2`` quantiles of the replicates (Efron & Tibshirani, *An Introduction to
the Bootstrap*, 1993, ch. 13). For a mean of n roughly normal values the interval is close to
``mean ± 1.96 s/√n``; the bootstrap needs no normality and works the same for medians.

Comparisons of two models are made on the *same* images, so :func:`paired_difference` resamples the
per-image differences ``a_i - b_i``: the image-to-image spread (some photographs are simply harder)
cancels, and a shift far smaller than that spread is still resolved.

Resampling scheme. ``u = rng.random((n, n_boot))`` and the indices of a column with ``n_c`` valid
(non-NaN) values are ``floor(u[:n_c] * n_c)``. Because the generator fills ``u`` row by row, the
first ``n_c`` rows are exactly what a 1-D call on that column alone draws. Hence a 2-D call (used for
spectra bands, one column per frequency) gives each column the result of a 1-D call on that column
with the same seed, and columns without NaNs share one set of resample indices.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

STATS = ("mean", "median")

# The median path materialises the resampled values; it works on column chunks of at most this many.
_MEDIAN_CHUNK_ELEMENTS = 1 << 24


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A statistic with its bootstrap interval. Scalars for 1-D input, ``(F,)`` arrays for ``(n, F)``.

    ``n`` is the number of non-NaN values used (per column for 2-D input). ``value`` is the statistic
    of the observed sample, not the mean of the replicates.
    """

    value: float | np.ndarray
    lo: float | np.ndarray
    hi: float | np.ndarray
    n: int | np.ndarray

    def fmt(self, digits: int = 3) -> str:
        """``"0.123 [0.101, 0.145]"``: fixed-point with ``digits`` decimals (scalar estimates only)."""
        if np.ndim(self.value) != 0:
            raise ValueError(f"fmt needs a scalar Estimate, this one has shape {np.shape(self.value)}")
        return f"{self.value:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"

    @property
    def half_width(self) -> float | np.ndarray:
        return np.subtract(self.hi, self.lo) / 2.0


def bootstrap_ci(values, *, n_boot: int = 2000, ci: float = 0.95, seed: int = 0, stat: str = "mean") -> Estimate:
    """Percentile-bootstrap interval of ``stat`` over the first axis of ``values`` ((n,) or (n, F)).

    NaNs are dropped (per column for 2-D input). A column with no values gets ``value = nan``; one
    with a single value gets its value and ``lo = hi = nan`` (no spread to resample).
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim not in (1, 2):
        raise ValueError(f"values must be (n,) or (n, F), got shape {x.shape}")
    if stat not in STATS:
        raise ValueError(f"stat must be one of {STATS}, got {stat!r}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    n_boot = int(n_boot)
    cols = x[:, None] if x.ndim == 1 else x
    valid = ~np.isnan(cols)
    counts = valid.sum(axis=0)
    n_cols = cols.shape[1]
    value = np.full(n_cols, np.nan)
    lo = np.full(n_cols, np.nan)
    hi = np.full(n_cols, np.nan)

    # Compact every column: its valid values first, in their original order (stable sort on "is NaN").
    order = np.argsort(~valid, axis=0, kind="stable")
    compact = np.take_along_axis(cols, order, axis=0)
    reduce = np.mean if stat == "mean" else np.median
    for j in np.flatnonzero(counts > 0):
        value[j] = reduce(compact[: counts[j], j])

    n_max = int(counts.max(initial=0))
    if n_max >= 2:
        u = np.random.default_rng(seed).random((n_max, n_boot))
        q = [(1.0 - ci) / 2.0, (1.0 + ci) / 2.0]
        for n_c in np.unique(counts[counts >= 2]):
            js = np.flatnonzero(counts == n_c)
            idx = np.minimum((u[:n_c] * n_c).astype(np.intp), n_c - 1)  # (n_c, n_boot); min guards u*n rounding up to n
            reps = _replicates(compact[:n_c, js], idx, stat)  # (n_boot, len(js))
            inf = ~np.all(np.isfinite(reps), axis=0)
            lo[js[~inf]], hi[js[~inf]] = np.quantile(reps[:, ~inf], q, axis=0)
            if inf.any():  # interpolating between inf and inf is NaN: take the nearest order statistic there
                lo[js[inf]], hi[js[inf]] = np.quantile(reps[:, inf], q, axis=0, method="nearest")

    if x.ndim == 1:
        return Estimate(float(value[0]), float(lo[0]), float(hi[0]), int(counts[0]))
    return Estimate(value, lo, hi, counts.astype(int))


def _replicates(data: np.ndarray, idx: np.ndarray, stat: str) -> np.ndarray:
    """The statistic of every resample: data (n, k), idx (n, n_boot) -> (n_boot, k)."""
    n, n_boot = idx.shape
    if stat == "mean":
        # A resample's mean is (multiplicity of each row) @ data / n: no (n_boot, n, k) tensor needed.
        flat = (np.arange(n_boot)[None, :] * n + idx).ravel()
        mult = np.bincount(flat, minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)
        finite = np.all(np.isfinite(data), axis=0)
        out = np.empty((n_boot, data.shape[1]))
        out[:, finite] = mult @ data[:, finite] / n
        if not finite.all():  # ±inf (e.g. the PSNR of an exact reconstruction): 0 * inf would be NaN above
            out[:, ~finite] = data[:, ~finite][idx].mean(axis=0)
        return out
    step = max(1, _MEDIAN_CHUNK_ELEMENTS // (n * n_boot))
    return np.concatenate([np.median(data[idx.T, s:s + step], axis=1) for s in range(0, data.shape[1], step)], axis=1)


def paired_difference(a, b, **kw) -> Estimate:
    """Bootstrap interval of ``stat(a - b)`` where ``a[i]`` and ``b[i]`` are measured on the same image i.

    Image pairs are resampled together (the resample is over the differences), so between-image
    variation cancels. A pair with a NaN on either side is dropped. ``kw`` goes to :func:`bootstrap_ci`.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired_difference needs a and b of the same shape (one value per image), "
                         f"got {a.shape} and {b.shape}")
    return bootstrap_ci(a - b, **kw)


def summarise(rows: Iterable[Mapping], keys: Sequence[str], by: str | None = None,
              **kw) -> dict[object, dict[str, Estimate]]:
    """Per-group, per-key :class:`Estimate` of per-image metric rows.

    ``rows`` are dicts such as ``{"image": ..., "subset": "photos", "psnr": 31.2}``; ``by`` names the
    grouping key (``None``: a single group ``"all"``). Groups keep their first-seen order. A row that
    lacks a metric (or holds None) counts as NaN for it. ``kw`` goes to :func:`bootstrap_ci`.
    """
    groups: dict[object, list[Mapping]] = {}
    for row in rows:
        if by is not None and by not in row:
            raise KeyError(f"row has no grouping key {by!r}: {sorted(row)}")
        groups.setdefault("all" if by is None else row[by], []).append(row)
    out = {}
    for g, members in groups.items():
        out[g] = {}
        for k in keys:
            vals = [np.nan if r.get(k) is None else float(r[k]) for r in members]
            out[g][k] = bootstrap_ci(np.asarray(vals, dtype=np.float64), **kw)
    return out


def unpaired_difference(a, b, *, n_boot: int = 2000, ci: float = 0.95, seed: int = 0) -> Estimate:
    """Bootstrap interval of ``mean(a) - mean(b)`` for two *independent* samples (different images).

    Each sample is resampled on its own (two independent draws from one seeded generator) and the
    difference of the resampled means is taken; NaNs are dropped. ``n`` is ``min(len(a), len(b))``.
    """
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    value = float(a.mean() - b.mean()) if a.size and b.size else float("nan")
    if a.size < 2 or b.size < 2:
        return Estimate(value, float("nan"), float("nan"), int(min(a.size, b.size)))
    rng = np.random.default_rng(seed)
    ra = a[rng.integers(0, a.size, (n_boot, a.size))].mean(axis=1)
    rb = b[rng.integers(0, b.size, (n_boot, b.size))].mean(axis=1)
    lo, hi = np.quantile(ra - rb, [(1.0 - ci) / 2.0, (1.0 + ci) / 2.0])
    return Estimate(value, float(lo), float(hi), int(min(a.size, b.size)))
