"""The full decoder-finetune step on a GPU: fvae (JAX, bf16) vs the PyTorch step (bf16 autocast, eager and
``torch.compile``), sd-vae-ft-mse at batch 32, 256² crops: issue 8's goal 3 (MFU, 150k-step wall time).

A printed benchmark, not a test. The steps are the ones of ``benchmarks/train_step.py`` (same spec, same
``TorchStep``, same ``Trainer.raw_step("adversarial")`` jitted with the state donated); only the device, the
batch and the dtype differ:

* fvae: the recipe's ``compute_dtype="bfloat16"`` (params, losses, optimiser and EMA fp32);
* torch: fp32 params, ``torch.autocast(bfloat16)`` around the VAE, LPIPS and critic forwards (the pixel loss
  and the Oklab conversions in fp32), ``cudnn.benchmark`` on, TF32 allowed; eager, then with the encoder,
  decoder and LPIPS features under ``torch.compile`` (the critic's gradient penalty needs a double backward,
  which ``torch.compile`` does not support, so the critic stays eager).

Each variant runs in a child process of its own, so the GPU's memory and the peak-memory figure are its own.
Measured per variant: compile time (first call), the median of ``--reps`` single steps (each synchronised),
the time per step of ``--reps`` back-to-back steps (the throughput a training loop sees), peak device memory,
and the last step's losses. MFU = FLOPs per step / time per step / the bf16 matmul peak measured here
(8192³, JAX and torch, median of 10). FLOPs per step: fvae's loop-free lowering (XLA cost analysis, the
custom conv gradient off; see ``train_step._loop_free_flops``) and torch's ``FlopCounterMode`` (eager).
The card's run (150k steps at batch 32) is extrapolated from the back-to-back time per step.

fvae runs as the backend chooses (``fvae``), and in named configurations whatever the defaults (each child
records which of the choices it ran with):

* ``fvae-subpixel``: diffusers' ``Upsample2D`` as four 2x2 convs at the input's resolution
  (``fvae_core.autoencoder.SUBPIXEL_BACKENDS``, 4/9 of those convs' FLOPs), with the CPU's two memory
  devices on: each layer's input gradient tied to its parameter gradients
  (``fvae_core.autoencoder.GRADS_FIRST_BACKENDS``) and skipped updates as a ``lax.cond``
  (``fvae_core.train_steps.COND_UPDATE_BACKENDS``);
* ``fvae-subpixel-lean``: the same with those two off (the GPU's defaults since 2026-11-26);
* ``fvae-custom-grad``: ``fvae_core.conv``'s custom kernel gradient (the measurement behind
  ``fvae_core.conv.CUSTOM_GRAD_BACKENDS``);
* ``fvae-unpacked``: the backend's defaults with every optimiser leaf updated on its own
  (``fvae_core.train_steps.SMALL_LEAF_ELEMENTS`` = -1; the default packs the small leaves into one vector,
  a CPU-round change that also reaches the GPU).

FLOPs (counted on CPU as the GPU runs the step: no Winograd, remat or custom gradient): ``flops`` with the
upsample-then-conv form, ``flops-subpixel`` with the sub-pixel form; each row uses the one it ran.

Usage (on the GPU machine)::

    python benchmarks/gpu_step.py --out DIR          # everything, children in sequence
    python benchmarks/gpu_step.py --batch 4 --reps 3  # smaller (works on CPU too, slowly)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_step import (TorchStep, _flops, _fvae_setup, _fvae_trainer, _images,  # noqa: E402
                        _loop_free_flops, _spec, _to_torch)

CARD_STEPS = 150_000
PEAK_N = 8192
VARIANTS = ("peak", "flops", "flops-subpixel", "fvae", "torch", "fvae-subpixel", "fvae-subpixel-lean",
            "fvae-custom-grad", "fvae-unpacked", "torch-compile")
#: The timed variants (the rest measure the card's peak and count FLOPs).
TIMED = VARIANTS[3:]


def _spec_for(batch, size):
    spec = _spec("sd4", "vgg16", fvae_bf16=True)
    spec.update(name=f"sd{batch}", batch=batch, size=size)
    return spec


def _median_time(fn, n):
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), ts


def _time_steps(step, wait, reps):
    """First call (compile or warm-up), then the median of ``reps`` synced steps, then the time per step of
    ``reps`` steps dispatched back to back and waited for once. ``step(sync)`` runs one; ``wait()`` waits
    for the device."""
    t = time.perf_counter()
    step(True)
    first_s = time.perf_counter() - t
    step(True)
    med, ts = _median_time(lambda: step(True), reps)
    t = time.perf_counter()
    for _ in range(reps):
        step(False)
    wait()
    return {"first_step_s": first_s, "median_s": med, "times": ts, "pipelined_s": (time.perf_counter() - t) / reps}


def child_peak():
    import jax
    import jax.numpy as jnp
    import torch

    out = {}
    a = jax.random.normal(jax.random.PRNGKey(0), (PEAK_N, PEAK_N), jnp.bfloat16)
    mm = jax.jit(jnp.matmul)
    jax.block_until_ready(mm(a, a))
    med, _ = _median_time(lambda: jax.block_until_ready(mm(a, a)), 10)
    out["jax_bf16"] = 2 * PEAK_N**3 / med
    if torch.cuda.is_available():
        ta = torch.randn(PEAK_N, PEAK_N, device="cuda", dtype=torch.bfloat16)
        torch.mm(ta, ta)
        torch.cuda.synchronize()

        def run():
            torch.mm(ta, ta)
            torch.cuda.synchronize()

        med, _ = _median_time(run, 10)
        out["torch_bf16"] = 2 * PEAK_N**3 / med
        out["gpu"] = torch.cuda.get_device_name()
    out["jax_device"] = str(jax.devices()[0])
    out["jax"] = jax.__version__
    out["torch"] = torch.__version__
    return out


def _gpu_choices(subpixel):
    """Make this process's backend choose as the GPU does (each ``*_BACKENDS`` rule that changes the step's
    FLOPs, read for ``"gpu"``: today no Winograd, remat, grads-first ties or custom conv gradient), with the
    sub-pixel upsample if ``subpixel``; those choices are read at trace time."""
    import jax

    import fvae_core.autoencoder
    import fvae_core.conv

    here = (jax.default_backend(),)
    for mod, name in ((fvae_core.conv, "WINOGRAD_BACKENDS"), (fvae_core.conv, "CUSTOM_GRAD_BACKENDS"),
                      (fvae_core.autoencoder, "REMAT_BACKENDS"), (fvae_core.autoencoder, "GRADS_FIRST_BACKENDS")):
        setattr(mod, name, here if "gpu" in getattr(mod, name) else ())
    fvae_core.autoencoder.SUBPIXEL_BACKENDS = here if subpixel else ()


def child_flops(batch, size, subpixel=False):
    """fvae's FLOPs per step as the GPU runs it (``subpixel``: with the sub-pixel upsample), counted by
    XLA:CPU's cost analysis of the loop-free lowering (run with ``JAX_PLATFORMS=cpu``). On GPU, XLA's cost
    analysis gives nothing before compilation and, after it, counts the cuDNN convolution custom calls as 0
    FLOPs (it reported 0.83 TFLOP for a ~75 TFLOP step)."""
    import jax
    import jax.numpy as jnp

    from fvae_core.autoencoder import init_params
    from fvae_core.lpips import load_lpips

    assert jax.default_backend() == "cpu", jax.default_backend()
    _gpu_choices(subpixel)
    spec = _spec_for(batch, size)
    trainer = _fvae_trainer(spec)
    params = jax.eval_shape(lambda: init_params(trainer.vae_config))
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
    state = trainer.init_state(params, jax.random.PRNGKey(1), image_size=size)
    state = state.replace(step=jnp.asarray(spec["step"], jnp.int32))
    batch_ = {"image": jnp.zeros((batch, size, size, 3), jnp.float32)}
    return {"flops": _loop_free_flops(trainer, state, batch_, jax.random.PRNGKey(2), load_lpips("vgg16"))}


def child_fvae(batch, size, reps, custom_grad=False, subpixel=False, lean=False, unpacked=False):
    import jax

    import fvae_core.autoencoder
    import fvae_core.conv
    import fvae_core.train_steps
    from fvae_core.autoencoder import init_params

    here = (jax.default_backend(),)
    if custom_grad:  # the CPU choice, forced on for this backend too
        fvae_core.conv.CUSTOM_GRAD_BACKENDS = here
    if subpixel:  # likewise; with the CPU's memory devices (grads-first ties, skipped updates as a cond) on,
        # or off for -lean (each variant names one configuration, whatever the backend's defaults)
        fvae_core.autoencoder.SUBPIXEL_BACKENDS = here
        fvae_core.autoencoder.GRADS_FIRST_BACKENDS = () if lean else here
        fvae_core.train_steps.COND_UPDATE_BACKENDS = () if lean else here
    if unpacked:  # no leaf is small: each is its own optimiser leaf, as before the packing
        fvae_core.train_steps.SMALL_LEAF_ELEMENTS = -1
    spec = _spec_for(batch, size)
    params = init_params(_fvae_trainer(spec).vae_config)
    trainer, lp, state, batch_, rng, step_c, compile_s = _fvae_setup(spec, params)
    del params
    compiled_flops = _flops(step_c)  # on GPU this misses cuDNN's convs (custom calls count 0): see child_flops
    holder = {"state": state, "i": 0, "m": None}
    del state

    def wait():
        jax.block_until_ready((holder["state"], holder["m"]))

    def step(sync):
        holder["state"], holder["m"] = step_c(holder["state"], batch_, jax.random.fold_in(rng, holder["i"]), lp)
        holder["i"] += 1
        if sync:
            wait()

    timing = _time_steps(step, wait, reps)
    stats = jax.devices()[0].memory_stats() or {}
    m = {k: float(v) for k, v in holder["m"].items()}
    return {**timing, "compile_s": compile_s, "compiled_flops": compiled_flops,
            "peak_mem_gb": stats.get("peak_bytes_in_use", 0) / 1e9,
            "losses": {k: m[k] for k in ("loss/pixel", "loss/lpips", "adaptive_weight", "critic/loss",
                                         "gen/skipped", "critic/skipped")},
            "device": str(jax.devices()[0]), "backend": jax.default_backend(),
            "subpixel": fvae_core.autoencoder._subpixel_here(), "grads_first": fvae_core.autoencoder._grads_first_here(),
            "cond_update": fvae_core.train_steps._cond_update_here(),
            "small_leaf_elements": fvae_core.train_steps.SMALL_LEAF_ELEMENTS}


def child_torch(batch, size, reps, compile_):
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    spec = _spec_for(batch, size)
    tstep = TorchStep(spec, device=dev, autocast=torch.bfloat16)
    x01 = _to_torch(_images(spec)).to(dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    flops = None
    if not compile_:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            tstep.step(x01)
        flops = float(counter.get_total_flops())
    else:
        tstep.vae.encoder = torch.compile(tstep.vae.encoder)
        tstep.vae.decoder = torch.compile(tstep.vae.decoder)
        tstep.lpips.features = torch.compile(tstep.lpips.features)
    metrics = {}

    def step(do_sync):
        metrics.update(tstep.step(x01))
        if do_sync:
            sync()

    timing = _time_steps(step, sync, reps)
    peak = torch.cuda.max_memory_allocated() / 1e9 if dev == "cuda" else 0.0
    return {**timing, "compile_s": timing["first_step_s"] if compile_ else 0.0,
            "flops": flops, "peak_mem_gb": peak, "losses": metrics,
            "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu"}


def _report(res, batch, size):
    peak = res.get("peak", {})
    pk = peak.get("jax_bf16")
    print(f"\n## Full finetune step on {peak.get('gpu', peak.get('jax_device', '?'))}: sd-vae-ft-mse, B{batch}, "
          f"{size}², bf16, LPIPS-VGG16, WGAN-GP critic\n")
    if pk:
        tp = peak.get("torch_bf16")
        print(f"jax {peak.get('jax')}, torch {peak.get('torch')}. bf16 matmul peak measured here ({PEAK_N}³, "
              f"median of 10): JAX {pk / 1e12:.0f} TFLOP/s" + (f", torch {tp / 1e12:.0f} TFLOP/s" if tp else "")
              + ". MFU below is of the JAX figure, then of torch's.\n")
    flops = res.get("flops", {}).get("flops")
    flops_subpixel = res.get("flops-subpixel", {}).get("flops")
    torch_flops = res.get("torch", {}).get("flops")
    base = res.get("torch", {}).get("pipelined_s")
    print("| variant | compile / first step | step (median, synced) | step (back-to-back) | img/s | peak mem | "
          "MFU | 150k steps | vs torch eager |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in TIMED:
        r = res.get(name)
        if not r:
            print(f"| {name} | (not run: {res.get(name + '_error', 'skipped')}) | | | | | | | |")
            continue
        if name.startswith("fvae") and r.get("subpixel", name.startswith("fvae-subpixel")):
            f = flops_subpixel  # (results from before the field: only the -subpixel variants had it)
        else:
            f = flops if name.startswith("fvae") else (torch_flops or flops)
        t = r["pipelined_s"]
        tp = peak.get("torch_bf16")
        mfu = (f"{f / t / pk:.0%}" + (f" / {f / t / tp:.0%}" if tp else "")) if (f and pk) else "—"
        rel = f"{t / base:.2f}" if base else "—"
        print(f"| {name} | {r['compile_s']:.1f} s / {r['first_step_s']:.1f} s | {1000 * r['median_s']:.0f} ms | "
              f"{1000 * t:.0f} ms | {batch / t:.0f} | {r['peak_mem_gb']:.1f} GB | {mfu} | "
              f"{CARD_STEPS * t / 3600:.1f} h | {rel} |")
    if flops:
        print(f"\nFLOPs per step: fvae {flops / 1e12:.1f} TFLOP (XLA:CPU cost analysis of the loop-free lowering)"
              + (f", with the sub-pixel upsample {flops_subpixel / 1e12:.1f} TFLOP" if flops_subpixel else "")
              + (f", torch {torch_flops / 1e12:.1f} TFLOP (FlopCounterMode)" if torch_flops else ""))
    for name in TIMED:
        if name in res:
            print(f"  {name}: last step losses {json.dumps(res[name]['losses'])}")


def _run_variant(v, args):
    """Run one variant's child; (its JSON result, None) or (None, why it failed)."""
    print(f"[{v}] ...", file=sys.stderr, flush=True)
    t = time.perf_counter()
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", v, "--batch", str(args.batch),
           "--size", str(args.size), "--reps", str(args.reps)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    if v.startswith("flops"):
        env["JAX_PLATFORMS"] = "cpu"
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        print(f"[{v}] timed out after {args.timeout:.0f} s", file=sys.stderr, flush=True)
        return None, f"timed out after {args.timeout:.0f} s"
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode == 0 and lines:
        print(f"[{v}] {time.perf_counter() - t:.0f} s: {lines[-1][:400]}", file=sys.stderr, flush=True)
        return json.loads(lines[-1]), None
    print(f"[{v}] failed (exit {p.returncode}):\n{p.stderr[-3000:]}", file=sys.stderr, flush=True)
    return None, f"exit {p.returncode}"


def _write_results(folder, res) -> None:
    """``folder/results.json``, replaced whole (a temp file renamed over it): never half written."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "results.json")
    with open(path + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(path + ".tmp", path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per child")
    ap.add_argument("--out", default=None, help="folder for results.json (written after every child)")
    ap.add_argument("--from-json", default=None,
                    help="report a saved results.json (from a GPU machine); adds the FLOP count here if missing "
                         "(and with --out writes the completed results.json there)")
    ap.add_argument("--_child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._child:
        v = args._child
        if v == "peak":
            out = child_peak()
        elif v.startswith("flops"):
            out = child_flops(args.batch, args.size, subpixel=v == "flops-subpixel")
        elif v.startswith("fvae"):
            out = child_fvae(args.batch, args.size, args.reps, custom_grad=v == "fvae-custom-grad",
                             subpixel=v.startswith("fvae-subpixel"), lean=v == "fvae-subpixel-lean",
                             unpacked=v == "fvae-unpacked")
        else:
            out = child_torch(args.batch, args.size, args.reps, compile_=v == "torch-compile")
        print(json.dumps(out), flush=True)
        return

    if args.from_json:
        with open(args.from_json) as f:
            res = json.load(f)
        for v in ("flops", "flops-subpixel"):
            if v not in res:
                res[v] = _run_variant(v, args)[0]
        if args.out:
            _write_results(args.out, res)
        _report(res, args.batch, args.size)
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variants {bad}; choose from {list(VARIANTS)}")
    res = {}
    for v in variants:
        out, err = _run_variant(v, args)
        res[v] = out
        if err:
            res.pop(v)
            res[v + "_error"] = err
        if args.out:
            _write_results(args.out, res)
    _report(res, args.batch, args.size)


if __name__ == "__main__":
    main()
