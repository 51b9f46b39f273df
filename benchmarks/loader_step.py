"""Does the input pipeline ever bound a train step? The step fed by the real loader vs the same step fed
from batches held in memory (issue 8, goal 2: loader step time <= 1.05x the in-memory step time).

A printed benchmark, not a test. The work per call is what ``fvae_core.runs.train`` does per call of
``n`` steps (``steps_per_call``, as ``fvae train`` resolves it for the preset on this backend): ``n`` times
``next(iterator)``, uint8 -> float32 [0, 1], ``jax.device_put`` (stacked for ``n > 1``), the jitted call
(state donated, compiled ahead of time by :func:`fvae_core.train_steps.compile_step` at the first batch),
then ``jax.device_get`` of the metrics (the loop syncs every call). Times are per step (a call's time over
``n``). Only the source of the batches differs:

* **loader**: ``make_iterator(train_dataset(...), workers=W)`` on a prepared OpenMoji set (the first
  ``--svgs`` SVGs rendered at the preset's ``render_size``), the preset's crop, augmentation and batch;
  W = the preset's ``data.workers`` unless ``--workers`` (0 = grain's 2 read threads in this process, which
  then compete with XLA's threads for the same cores);
* **memory**: ``--cache`` batches taken from that same iterator beforehand, cycled.

Rounds alternate (loader K calls, memory K calls, ...); the first calls of each phase are dropped from
the medians (``--settle``), and the time spent waiting in ``next()`` is reported on its own.
Default: the ``tiny-cpu-finetune`` preset (batch 8, 64² crops, the committed tiny VAE's shape) from the
adversarial phase, so the critic is included.

Usage::

    python benchmarks/loader_step.py                       # tiny-cpu-finetune, 3 rounds of 12 calls
    python benchmarks/loader_step.py --workers 1 --rounds 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny-cpu-finetune")
    ap.add_argument("--workers", type=int, default=None, help="loader processes (default: the preset's)")
    ap.add_argument("--svgs", type=int, default=400, help="OpenMoji SVGs to prepare (default 400)")
    ap.add_argument("--steps", type=int, default=12, help="calls (of steps_per_call steps) per phase and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--settle", type=int, default=2, help="calls dropped at the start of each phase")
    ap.add_argument("--cache", type=int, default=8, help="batches held in memory")
    args = ap.parse_args(argv)

    from fvae_core.train_steps import tune_host_allocator

    host_allocator = tune_host_allocator()  # as `fvae train`: first, before jax's backends start
    import absl.flags

    absl.flags.FLAGS(sys.argv[:1])  # grain's worker processes read absl flags
    import jax
    import jax.numpy as jnp
    import numpy as np

    from data import _openmoji_limited  # benchmarks/data.py
    from fvae_core.data.loader import PreparedDataset, make_iterator, train_dataset
    from fvae_core.data.prepare import PrepareConfig, prepare
    from fvae_core.runs.config import preset
    from fvae_core.runs.train import _init_params, steps_per_call
    from fvae_core.train_steps import Trainer, activation_elements, compile_step, step_keys

    cfg = preset(args.preset)
    workers = cfg.data.workers if args.workers is None else args.workers
    r = cfg.recipe
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "openmoji"
        t = time.perf_counter()
        with _openmoji_limited(args.svgs):
            prepare(["openmoji"], folder, PrepareConfig(render_size=cfg.data.render_size,
                                                        min_side=max(1, cfg.data.min_side)),
                    progress=False, log=lambda *a: None)
        prep_s = time.perf_counter() - t
        data = PreparedDataset.open(folder)
        ds = train_dataset(data, cfg.data.augment(), cfg.batch_size, seed=0, log=lambda *a: None)

        vae_config, params = _init_params(cfg)  # the preset's weights, as fvae train loads them
        trainer = Trainer(r, vae_config)
        state = trainer.init_state(params, jax.random.PRNGKey(1), image_size=cfg.data.crop)
        del params
        phase = trainer.phase_for_step(r.disc_start)
        state = state.replace(step=jnp.asarray(r.disc_start, jnp.int32))
        lp = trainer.step_lpips(cfg.lpips_net, cfg.data.crop)
        size = activation_elements(vae_config, cfg.micro_batch, cfg.data.crop)  # as fvae_core.runs.train
        holder = {"state": state, "i": 0, "step": None}
        del state
        n = steps_per_call(cfg)  # as fvae train: n batches per compiled call

        def run(batches):
            images = [np.asarray(b["image"], np.float32) / 255.0 for b in batches]
            x = jax.device_put(images[0] if n == 1 else np.stack(images))
            inputs = trainer.host_step_inputs(holder["i"], n)  # the step inputs fvae train feeds
            args = (holder["state"], {"image": x, **inputs}, step_keys(jax.random.PRNGKey(0), holder["i"], n), lp)
            if holder["step"] is None:  # as fvae train: compiled at the first batch, then jax's caches dropped
                holder["step"] = compile_step(trainer.raw_call(phase, cfg.grad_accum, n), args, size,
                                              donate_argnums=(0,))
            holder["state"], m = holder["step"](*args)
            holder["i"] += n
            return {k: np.asarray(v) for k, v in jax.device_get(m).items()}

        with make_iterator(ds, workers=workers) as it:
            t = time.perf_counter()
            run([next(it) for _ in range(n)])
            compile_s = time.perf_counter() - t
            for _ in range(2):
                run([next(it) for _ in range(n)])
            cached = [next(it) for _ in range(max(args.cache, n))]
            times = {"loader": [], "memory": []}
            waits = []
            for rnd in range(args.rounds):
                for source in ("loader", "memory"):
                    for k in range(args.steps):
                        t0 = time.perf_counter()
                        if source == "loader":
                            b = [next(it) for _ in range(n)]
                            t1 = time.perf_counter()
                        else:
                            j = (rnd * args.steps + k) * n
                            b = [cached[(j + i) % len(cached)] for i in range(n)]
                            t1 = t0
                        run(b)
                        t2 = time.perf_counter()
                        if k >= args.settle:  # per step: a call of n steps, with its n batches
                            times[source].append((t2 - t0) / n)
                            if source == "loader":
                                waits.append((t1 - t0) / n)

    med = {s: statistics.median(v) for s, v in times.items()}
    ratio = med["loader"] / med["memory"]
    b = cfg.batch_size
    print(f"\n## Loader vs in-memory batches: {args.preset} (init {cfg.init or cfg.model}, batch {b}, "
          f"{cfg.data.crop}² crops, "
          f"phase {phase}, {r.compute_dtype})\n")
    print(f"jax {jax.__version__} ({jax.default_backend()}), {os.cpu_count()} CPUs; loader workers {workers} "
          f"(0 = in-process, grain's 2 read threads); OpenMoji first {args.svgs} SVGs prepared at "
          f"{cfg.data.render_size}² in {prep_s:.1f} s; step compile {compile_s:.1f} s; {n} step(s) per "
          f"compiled call, as `fvae train` (times are per step: a call and its {n} batch(es), divided by {n}). "
          f"Medians of {len(times['loader'])} calls per source over {args.rounds} alternating rounds. Host allocator (as "
          f"`fvae train`; its restart with huge pages for large steps is not done here): {host_allocator}.\n")
    print("| batches from | step (median) | img/s | of which waiting in next() (median / max) |")
    print("|---|---|---|---|")
    print(f"| loader | {1000 * med['loader']:.1f} ms | {b / med['loader']:.1f} | "
          f"{1000 * statistics.median(waits):.2f} / {1000 * max(waits):.2f} ms |")
    print(f"| memory | {1000 * med['memory']:.1f} ms | {b / med['memory']:.1f} | — |")
    print(f"\nloader / memory step time: {ratio:.3f} (goal <= 1.05)")
    for s in times:
        print(f"  {s:6s} " + " ".join(f"{1000 * x:.0f}" for x in times[s]) + " ms")


if __name__ == "__main__":
    main()
