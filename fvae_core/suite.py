"""The notebook suite: shared settings of the numbered notebooks and the headless runner behind ``make demo``.

Every notebook's first code cell (tagged ``parameters`` for papermill) holds ``SMOKE``, ``SEED``,
``RUN_ROOT`` and ``FIG_DIR``; ``None`` means "from the environment": ``FVAE_SMOKE=1`` turns smoke mode
on (tiny configs, a few steps: what the tests run), ``FVAE_RUN_ROOT`` and ``FVAE_FIG_DIR`` move the
cached runs and the figures (tests point them at a temporary folder). :func:`settings` resolves them.

:func:`run_notebooks` executes the notebooks in order with papermill (cwd = the project root), writing
the executed copies under ``runs/notebooks/`` (never into git) and printing progress.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

NOTEBOOKS = ("01_data_prep", "02_recipe", "03_training", "04_loss_ablations", "05_frequency_analysis",
             "06_model_card_claims", "07_generated_latents")


def project_root() -> Path:
    """The fvae checkout: the nearest folder above the cwd (or this package) holding pyproject.toml and notebooks/."""
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        for p in (start, *start.parents):
            if (p / "pyproject.toml").is_file() and (p / "notebooks").is_dir():
                return p
    raise FileNotFoundError("fvae: cannot find the project root (a folder with pyproject.toml and notebooks/)")


@dataclasses.dataclass(frozen=True)
class Settings:
    smoke: bool
    seed: int
    root: Path  # the project root
    run_root: Path  # cached runs (by config hash) and evaluation outputs
    fig_dir: Path  # figures/NN_name.png

    def fig(self, fig, name: str) -> Path:
        """Save a figure as ``fig_dir/name.png`` (the one figure helper: :func:`fvae_core.plotting.save_figure`)."""
        from fvae_core.plotting import save_figure

        return save_figure(fig, name, self.fig_dir)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def settings(smoke=None, seed: int = 0, run_root=None, fig_dir=None) -> Settings:
    """Resolve a notebook's parameters cell (``None`` = environment, then the defaults)."""
    root = project_root()
    smoke = _env_flag("FVAE_SMOKE") if smoke is None else bool(smoke)
    run_root = Path(run_root or os.environ.get("FVAE_RUN_ROOT") or root / "runs" / ("suite-smoke" if smoke else "suite"))
    fig_dir = Path(fig_dir or os.environ.get("FVAE_FIG_DIR") or root / "figures")
    if not run_root.is_absolute():
        run_root = root / run_root
    if not fig_dir.is_absolute():
        fig_dir = root / fig_dir
    run_root.mkdir(parents=True, exist_ok=True)
    fig_dir.mkdir(parents=True, exist_ok=True)
    return Settings(smoke, int(seed), root, run_root, fig_dir)


class _Heartbeat:
    """Prints "still running" once a minute: a training cell runs for minutes without a cell finishing."""

    def __init__(self, label: str, log: Callable, every: float = 60.0):
        import threading

        self.label, self.log, self.every, self.t0 = label, log, every, time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(self.every):
            self.log(f"\n{self.label}: running for {(time.perf_counter() - self.t0) / 60:.0f} min")

    def stop(self):
        self._stop.set()


def run_notebooks(names=NOTEBOOKS, *, smoke: bool = False, out_dir=None, env: dict | None = None,
                  progress: bool = True, log: Callable = print) -> dict[str, float]:
    """Execute notebooks headless, in order (later ones reuse earlier runs); returns seconds per notebook.

    Raises :class:`RuntimeError` naming the notebook and cell that failed.
    """
    import papermill as pm

    root = project_root()
    out_dir = Path(out_dir or root / "runs" / ("notebooks-smoke" if smoke else "notebooks"))
    out_dir.mkdir(parents=True, exist_ok=True)
    old = dict(os.environ)
    os.environ.update({"FVAE_SMOKE": "1" if smoke else "0", **(env or {})})
    times = {}
    try:
        for i, name in enumerate(names, 1):
            src = root / "notebooks" / f"{name}.ipynb"
            if not src.is_file():
                raise FileNotFoundError(f"no notebook {src}")
            log(f"[{i}/{len(names)}] {name} ...")
            t0 = time.perf_counter()
            beat = _Heartbeat(f"[{i}/{len(names)}] {name}", log) if progress else None
            try:
                pm.execute_notebook(str(src), str(out_dir / f"{name}.ipynb"), cwd=str(root), kernel_name="python3",
                                    progress_bar=progress, log_output=False, stdout_file=None)
            except pm.PapermillExecutionError as e:
                raise RuntimeError(f"{name}: cell {e.exec_count} failed: {e.ename}: {e.evalue}") from e
            finally:
                if beat:
                    beat.stop()
            times[name] = time.perf_counter() - t0
            log(f"[{i}/{len(names)}] {name} done in {times[name]:.0f} s")
    finally:
        os.environ.clear()
        os.environ.update(old)
    return times


# ---- the suite's runs and evaluation (shared by notebooks 03-06) ----------------------------------------
#: The ablation grid of notebook 04: the card's recipe and one change each (see runs.config.ABLATIONS).
#: Smoke mode trains all of them too (a few steps each), so the tests run every finetune ``make demo`` runs.
ABLATIONS = ("card", "mae-only", "mse-only", "srgb-loss", "no-gan", "hinge-gan")


@dataclasses.dataclass(frozen=True)
class EvalPlan:
    sources: tuple[str, ...]
    limit: int  # images per source
    resolutions: tuple[int, ...]
    lpips_net: str


#: What notebooks 04-06 evaluate. The CPU models were trained on 64² crops of OpenMoji rendered at 128
#: and of the photos; 64² and 128² views test the resolution claim. Every packaged photo (and painting) is
#: used (34 and 27 with ``make debian-data``, 10 and none on a pip-only machine).
EVAL_FULL = EvalPlan(("openmoji", "photos"), 100, (64, 128), "vgg16")
EVAL_SMOKE = EvalPlan(("openmoji", "photos"), 3, (32, 64), "alexnet")
#: No-learning references evaluated beside every VAE, so that every number has a scale: 8x and 4x
#: Lanczos down, bicubic up (:class:`fvae_core.evaluate.ResizeReconstructor`).
REFERENCES = ("bicubic:8", "bicubic:4")


#: The suite's base (the committed weights of the pretrain preset) and its finetune preset.
BASE, FINETUNE = "small-cpu", "small-cpu-finetune"


def base_weights(s: Settings, pretrain: bool = False, log: Callable = print) -> Path:
    """The base VAE: the committed ``weights/small-cpu``, or (``pretrain``) a cached ``small-cpu`` run's
    export (about two hours on 2 CPU cores)."""
    if not pretrain:
        return s.root / "weights" / BASE
    from fvae_core.runs import cache
    from fvae_core.runs.config import preset, smoke_variant

    cfg = preset(BASE)
    return cache.cached_run(smoke_variant(cfg) if s.smoke else cfg, s.run_root, log=log) / "export" / "diffusers"


def finetune_config(s: Settings, base: Path, ablation: str = "card"):
    """:data:`FINETUNE` from ``base`` with one ablation, shrunk in smoke mode."""
    from fvae_core.runs import cache
    from fvae_core.runs.config import preset, smoke_variant

    cfg = dataclasses.replace(preset(FINETUNE), init=str(base), seed=s.seed)
    cfg = cache.ablation(cfg, ablation)
    return smoke_variant(cfg) if s.smoke else cfg


def finetune_runs(s: Settings, base: Path, names=None, log: Callable = print) -> dict[str, Path]:
    """The finished (cached) finetune run directory of each ablation; the missing ones are trained two at a
    time in child processes (:func:`fvae_core.runs.cache.cached_runs`: 1.4x the throughput of one at a time
    on 2 cores)."""
    from fvae_core.runs import cache

    names = list(names or ABLATIONS)
    dirs = cache.cached_runs([finetune_config(s, base, n) for n in names], s.run_root, workers=2, log=log)
    return dict(zip(names, dirs))


def eval_sources(plan: EvalPlan, log: Callable = print) -> tuple[str, ...]:
    """The plan's sources, plus the ``painterly`` subset where its Debian packages are here
    (``make debian-data``; the card separates flat, realistic and painterly); says so when it is not."""
    from fvae_core.data.packaged import resolve_packaged
    from fvae_core.data.sources import SourceError

    try:
        resolve_packaged("painterly")  # the evaluation's own log names its packages
    except SourceError as e:
        log(f"{e} (the evaluation goes on without a painterly subset)")
        return tuple(plan.sources)
    return tuple(plan.sources) + ("painterly",)


def suite_evaluation(s: Settings, base: Path, runs: dict[str, Path], log: Callable = print):
    """The base, every finetune (EMA export) and the no-learning references (:data:`REFERENCES`) evaluated
    on the same images (:data:`EVAL_FULL` / :data:`EVAL_SMOKE`), cached under the run root; VAE names are
    "base", the ablation names and the references' names ("bicubic×8", "bicubic×4")."""
    from fvae_core.evaluate import ResizeReconstructor, cached_evaluation

    plan = EVAL_SMOKE if s.smoke else EVAL_FULL
    sources = eval_sources(plan, log)
    vaes = {"base": base, **{n: r / "export" / "diffusers" for n, r in runs.items()},
            **{ResizeReconstructor.parse(ref).name: ref for ref in REFERENCES}}
    return cached_evaluation(vaes, sources, plan.resolutions, s.run_root, limit=plan.limit,
                             lpips_net=plan.lpips_net, log=log)


def suite_results(s: Settings, pretrain: bool = False, log: Callable = print):
    """``(base, runs, result)``: the base weights, every finetune run of the grid and their evaluation,
    all cached (what notebooks 04-06 start from)."""
    base = base_weights(s, pretrain, log=log)
    runs = finetune_runs(s, base, log=log)
    return base, runs, suite_evaluation(s, base, runs, log=log)


# ---- notebook 07: what a diffusion model would hand the decoders -----------------------------------------
@dataclasses.dataclass(frozen=True)
class LatentPlan:
    sizes: tuple[tuple[int, int], ...]  # (latent side, how many latents): the first is the model's own size
    sigmas: tuple[float, ...]  # perturbed latents: noise std in units of the latents' std
    perturbed_limit: int  # images per source for the perturbed evaluations
    sampler_steps: int | None  # None: the model's own (30 Heun steps)


#: 8² latents are the latent model's training size (64² decodes); 16² (128² decodes) is the second size C3
#: needs. Perturbed latents: the card's regime is decoders fed latents near but off the encoder's manifold.
LATENT_FULL = LatentPlan(((8, 128), (16, 48)), (0.1, 0.25, 0.5), 50, None)
LATENT_SMOKE = LatentPlan(((8, 4), (16, 2)), (0.25,), 3, 4)
#: The committed latent model (weights/record_latent.py): a rectified-flow UNet on weights/small-cpu's latents.
LATENT_MODEL = "latent-flow"


def latent_model(s: Settings):
    from fvae_core.latents.train import load_model

    return load_model(s.root / "weights" / LATENT_MODEL)


def _latent_model_for(s: Settings, base: Path):
    """The latent model, checked to belong to ``base``'s latent space (its std sets the perturbations' scale)."""
    model = latent_model(s)
    want = (s.root / model.meta["vae"]).resolve()
    if Path(base).resolve() != want:
        raise ValueError(f"the latent model {LATENT_MODEL} was trained on the latents of {want}, not of the base "
                         f"{base} (PRETRAIN=True): train one for it with `fvae latents train --vae {base}`")
    return model


def _vaes(base: Path, runs: dict[str, Path]) -> dict:
    from fvae_core.evaluate import VAEReconstructor

    return {"base": VAEReconstructor.load(str(base), "base"),
            **{n: VAEReconstructor.load(str(r / "export" / "diffusers"), n) for n, r in runs.items()}}


def generated_decodes(s: Settings, base: Path, runs: dict[str, Path], log: Callable = print) -> dict:
    """``{latent side: {"latents": z, "decodes": {vae: (n, H, W, 3) in [0, 1]}}}``: latents sampled by the
    committed latent model (seed ``s.seed + side``), each decoded by the base and by every finetune."""
    from fvae_core.evaluate import map_threads
    from fvae_core.reconstruct import decode_latents

    model = _latent_model_for(s, base)
    plan, vaes = LATENT_SMOKE if s.smoke else LATENT_FULL, _vaes(base, runs)
    out = {}
    for side, n in plan.sizes:
        t0 = time.perf_counter()
        z = model.sample(n, s.seed + side, steps=plan.sampler_steps, size=(side, side))
        # two VAEs at a time (evaluate's measured 1.7x on 2 cores)
        dec = dict(zip(vaes, map_threads(lambda v: decode_latents(v.config, v.params, z, uint8=False), vaes.values())))
        out[side] = {"latents": z, "decodes": dec}
        log(f"generated {n} latents {side}x{side}x{z.shape[-1]}, decoded by {len(dec)} VAEs in "
            f"{time.perf_counter() - t0:.0f} s")
    return out


def generated_measures(s: Settings, generated: dict, log: Callable = print) -> dict:
    """Reference-free measures (:func:`fvae_core.reference_free.measure_decodes`) of every decoder's decodes,
    per decode size (pixels), against the evaluation's OpenMoji images (:data:`EVAL_FULL`) at that size."""
    from fvae_core.evaluate import gather_images, views_at
    from fvae_core.reference_free import measure_decodes

    images, _ = gather_images(["openmoji"], limit=(EVAL_SMOKE if s.smoke else EVAL_FULL).limit, log=log)
    out = {}
    for side, g in generated.items():
        dec = g["decodes"]
        px = next(iter(dec.values())).shape[1]
        refs, _ = views_at(images, px)
        out[px] = measure_decodes(dec, np.stack([v.rgb for v in refs]).astype(np.float32) / 255.0)
    return out


def perturbed_evaluations(s: Settings, base: Path, runs: dict[str, Path], log: Callable = print) -> dict:
    """``{sigma: EvalResult}``: the base and the card finetune decoding the encoded evaluation images plus
    Gaussian noise of ``sigma`` times the latent std (1 / the latent model's measured scaling factor), with
    the same noise for both (:class:`fvae_core.evaluate.PerturbedReconstructor`); no LPIPS (C1–C4 do not use
    it)."""
    from fvae_core.evaluate import EncodeMemo, PerturbedReconstructor, evaluate, gather_images

    std = 1.0 / _latent_model_for(s, base).scaling_factor
    plan, eplan = (LATENT_SMOKE, EVAL_SMOKE) if s.smoke else (LATENT_FULL, EVAL_FULL)
    vaes = _vaes(base, {"card": runs["card"]})
    images, _ = gather_images(eval_sources(eplan, log), limit=plan.perturbed_limit, log=log)
    out, memo = {}, EncodeMemo()
    for sigma in plan.sigmas:
        t0 = time.perf_counter()
        recons = [PerturbedReconstructor(v, sigma, std, seed=s.seed, name=n, encodings=memo) for n, v in vaes.items()]
        out[sigma] = evaluate(recons, images, list(eplan.resolutions), lpips_net=None, log=log)
        log(f"perturbed σ={sigma:g}: {len(images)} images at {list(eplan.resolutions)} in {time.perf_counter() - t0:.0f} s")
    return out


def main(argv=None) -> int:
    """``python -m fvae_core.suite [--smoke] [NN_name ...]``: what ``make demo`` runs."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m fvae_core.suite", description=main.__doc__)
    ap.add_argument("names", nargs="*", default=list(NOTEBOOKS))
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        times = run_notebooks(args.names, smoke=args.smoke)
    except (RuntimeError, FileNotFoundError) as e:
        print(f"fvae suite: error: {e}", file=sys.stderr)
        return 1
    print(f"suite: {len(times)} notebooks in {(time.perf_counter() - t0) / 60:.1f} min; figures in "
          f"{settings().fig_dir}, claims table in figures/claims.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
