"""Half precision, answered per VAE: where fp16 overflows, whether an fp16 or bf16 decode matches fp32, and
an exact rescale that keeps the activations inside fp16.

:func:`inspect` runs real images through the model in float32 and records every layer's largest absolute
activation (convs, linears, norms with their activation, resnet and attention blocks), the headroom to
fp16's largest finite value, 65504, and compares decodes in float16 and bfloat16 with the float32 one
(PSNR, and how many pixels are NaN or infinite).

:func:`rescale_for_half` is the exact part of madebyollin's ``sdxl-vae-fp16-fix`` (which finetuned the SDXL
VAE so that its activations shrink while its outputs stay): a GroupNorm does not see the scale of its input
(up to its ``eps``), and everything else that reads the residual stream is linear. So, per resolution stage,
the stream can be scaled by a power of two (exact in floating point): the conv that starts the stage (the
decoder's ``conv_in`` or an up/down-sampling conv), every resnet's ``conv2``, the shortcut convs' biases and
the attention's output projection take the stage's factor; each ``conv1`` (read only by ``norm2``) takes its
own. With the norms' ``eps`` at 0 the rescaled network is the same function bit for bit (powers of two;
tested); with the real ``eps`` (1e-6) a factor ``a`` turns a norm's ``var + eps`` into ``a² var + eps``, which
matters only where ``a² var`` comes near 1e-6: the SDXL-shaped overflow case's fp32 decode moved by less than
1e-3, a random-init tiny VAE scaled by 1/4 by 1.2e-3. What scaling cannot fix is a norm's *output* or a layer whose output no norm reads (the final
``conv_out``): :func:`inspect` reports those too.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fvae_core.autoencoder import (AttentionBlock, AutoencoderKL, Conv, GroupNorm, Linear, ResnetBlock,
                                   VAEConfig)

__all__ = ["FP16_MAX", "LayerMax", "InspectReport", "inspect", "layer_maxima", "rescale_for_half",
           "report_markdown"]

FP16_MAX = 65504.0
_KINDS = ((ResnetBlock, "resnet"), (AttentionBlock, "attention"), (GroupNorm, "norm+act"), (Conv, "conv"),
          (Linear, "linear"))


@dataclasses.dataclass(frozen=True)
class LayerMax:
    name: str  # "decoder/up_blocks_0_resnets_1/conv1"
    kind: str  # conv, linear, norm+act, resnet, attention
    max_abs: float

    @property
    def headroom(self) -> float:
        """How many times larger the activation could grow before fp16 overflows (< 1: it overflows)."""
        return FP16_MAX / self.max_abs if self.max_abs > 0 else math.inf


def _kind(mdl) -> str | None:
    return next((k for cls, k in _KINDS if isinstance(mdl, cls)), None)


def _keep(mdl, method_name: str) -> bool:
    return method_name == "__call__" and _kind(mdl) is not None


def layer_maxima(config: VAEConfig, params, x: np.ndarray) -> tuple[list[LayerMax], np.ndarray]:
    """Every layer's max |activation| over the float32 encode (posterior mean) and decode of NHWC [-1, 1]
    images ``x``, and the latents. Modules are named by their path in the params tree."""
    model = AutoencoderKL(config)
    kinds: dict[str, str] = {}

    def record(mdl, method_name):
        keep = _keep(mdl, method_name)
        if keep:
            kinds["/".join(mdl.path)] = _kind(mdl)
        return keep

    def run(mdl, x):
        z = mdl.encode(x).mode()
        return mdl.decode(z), z

    @jax.jit
    def f(params, x):
        (y, z), state = model.apply({"params": params}, x, method=run, capture_intermediates=record,
                                    mutable=["intermediates"])
        flat = jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]
        out = {}
        for path, leaf in flat:
            keys = [str(getattr(p, "key", getattr(p, "idx", p))) for p in path]
            name = "/".join(k for k in keys if k not in ("__call__",) and not k.isdigit())
            m = jnp.max(jnp.abs(leaf.astype(jnp.float32)))
            out[name] = jnp.maximum(out[name], m) if name in out else m
        return out, z

    maxima, z = f(params, jnp.asarray(x, jnp.float32))
    maxima = jax.device_get(maxima)
    layers = [LayerMax(n, kinds.get(n, "?"), float(v)) for n, v in maxima.items()]
    order = {n: i for i, n in enumerate(kinds)}
    return sorted(layers, key=lambda m: order.get(m.name, len(order))), np.asarray(z)


@dataclasses.dataclass
class InspectReport:
    layers: list[LayerMax]
    precision: dict  # dtype -> {"psnr_db": float, "nonfinite_pixels": int, "pixels": int}
    images: int

    @property
    def worst(self) -> LayerMax:
        return max(self.layers, key=lambda m: m.max_abs)


def _decode(config: VAEConfig, params, z, dtype) -> np.ndarray:
    model = AutoencoderKL(config, dtype=dtype)
    return np.asarray(jax.jit(lambda p, z: model.apply({"params": p}, z, method=model.decode))(
        params, jnp.asarray(z)), np.float32)


def inspect(config: VAEConfig, params, images01: np.ndarray, dtypes: Sequence[str] = ("float16", "bfloat16")
            ) -> InspectReport:
    """:func:`layer_maxima` of NHWC [0, 1] ``images01``, and each of ``dtypes``' decode of the same latents
    against the float32 decode: PSNR over the finite pixels' images clipped to [0, 1] (NaN when none is
    finite) and the count of pixels with a NaN or infinite channel."""
    from fvae_core.metrics import psnr

    x = np.asarray(images01, np.float32) * 2.0 - 1.0
    layers, z = layer_maxima(config, params, x)
    ref = (np.clip(_decode(config, params, z, jnp.float32), -1, 1) + 1) / 2
    precision = {}
    for dt in dtypes:
        y = _decode(config, params, z, jnp.dtype(dt))
        bad = ~np.all(np.isfinite(y), axis=-1)
        yc = (np.clip(np.nan_to_num(y, nan=0.0, posinf=1.0, neginf=-1.0), -1, 1) + 1) / 2
        value = float(np.mean([psnr(r, c, data_range=1.0) for r, c in zip(ref, yc)]))
        precision[dt] = {"psnr_db": value, "nonfinite_pixels": int(bad.sum()), "pixels": int(bad.size)}
    return InspectReport(layers, precision, len(x))


def report_markdown(report: InspectReport, top: int = 12) -> str:
    """The report as markdown: the verdict per dtype, then the ``top`` layers by max |activation|."""
    lines = [f"{report.images} image(s). Largest activation {report.worst.max_abs:.4g} at `{report.worst.name}` "
             f"(fp16 headroom {report.worst.headroom:.3g}x).", "",
             "| dtype | decode PSNR vs fp32 (dB) | NaN/inf pixels |", "|---|---|---|"]
    for dt, r in report.precision.items():
        lines.append(f"| {dt} | {r['psnr_db']:.1f} | {r['nonfinite_pixels']} of {r['pixels']} |")
    lines += ["", "| layer | kind | max abs | fp16 headroom |", "|---|---|---|---|"]
    for m in sorted(report.layers, key=lambda m: -m.max_abs)[:top]:
        lines.append(f"| `{m.name}` | {m.kind} | {m.max_abs:.4g} | {m.headroom:.3g}x |")
    return "\n".join(lines) + "\n"


# ---- the exact rescale ---------------------------------------------------------------------------------
def _pow2_at_most(ratio: float) -> float:
    """The largest power of two <= ``ratio`` (and <= 1): multiplying by it is exact in floating point."""
    return 1.0 if ratio >= 1 else 2.0 ** math.floor(math.log2(ratio))


def _stages(config: VAEConfig, part: str) -> list[dict]:
    """The residual-stream stages of the encoder or decoder: the conv that starts each (and how), and the
    resnets and attention that add to it. Mirrors :class:`fvae_core.autoencoder.Encoder`/``Decoder``."""
    n = len(config.block_out_channels)
    if part == "decoder":
        out = [{"start": ("conv_in", None), "resnets": ["mid_block/resnets_0", "mid_block/resnets_1"]
                + [f"up_blocks_0_resnets_{j}" for j in range(config.layers_per_block + 1)],
                "attention": "mid_block/attentions_0" if config.mid_block_add_attention else None}]
        for i in range(1, n):
            out.append({"start": (f"up_blocks_{i - 1}_upsamplers_0_conv", i - 1),
                        "resnets": [f"up_blocks_{i}_resnets_{j}" for j in range(config.layers_per_block + 1)],
                        "attention": None})
        return out
    out = [{"start": ("conv_in", None), "resnets": [f"down_blocks_0_resnets_{j}" for j in range(config.layers_per_block)],
            "attention": None}]
    for i in range(1, n):
        out.append({"start": (f"down_blocks_{i - 1}_downsamplers_0_conv", i - 1),
                    "resnets": [f"down_blocks_{i}_resnets_{j}" for j in range(config.layers_per_block)],
                    "attention": None})
    out[-1]["resnets"] += ["mid_block/resnets_0", "mid_block/resnets_1"]
    out[-1]["attention"] = "mid_block/attentions_0" if config.mid_block_add_attention else None
    return out


def _get(tree: dict, path: str) -> dict:
    for k in path.split("/"):
        tree = tree[k]
    return tree


def rescale_for_half(config: VAEConfig, params, layers: Sequence[LayerMax], limit: float = 2048.0,
                     parts: Sequence[str] = ("decoder", "encoder")) -> tuple[dict, dict]:
    """Params whose residual streams and ``conv1`` outputs are scaled by powers of two so that every one of
    them measured in ``layers`` (:func:`layer_maxima`) is at most ``limit`` (default 2048: 32x headroom to
    fp16 for inputs beyond the measured ones), and the factors used (``{"decoder/stage 0": 0.0625, ...}``).
    The function computed is the same up to the GroupNorms' ``eps`` (module docstring)."""
    peak = {m.name: m.max_abs for m in layers}
    p = jax.tree_util.tree_map(lambda a: np.array(a, np.float32), params)
    factors = {}

    def mx(name):
        return peak.get(name, 0.0)

    for part in parts:
        tree = p[part]
        prev = 1.0
        for s, stage in enumerate(_stages(config, part)):
            start, _ = stage["start"]
            names = [f"{part}/{start}"] + [f"{part}/{r}" for r in stage["resnets"]]
            names += [f"{part}/{r}/conv2" for r in stage["resnets"]] + [f"{part}/{r}/conv_shortcut" for r in stage["resnets"]]
            if stage["attention"]:
                names += [f"{part}/{stage['attention']}"]
            a = _pow2_at_most(limit / max(max(mx(n) for n in names), 1e-30))
            factors[f"{part}/stage {s}"] = a
            conv = _get(tree, start)  # input at scale `prev`, output to be at scale `a`
            conv["kernel"] *= a / prev
            conv["bias"] *= a
            for r in stage["resnets"]:
                block = _get(tree, r)
                c1 = _pow2_at_most(limit / max(mx(f"{part}/{r}/conv1"), 1e-30))
                factors[f"{part}/{r}/conv1"] = c1
                block["conv1"]["kernel"] *= c1
                block["conv1"]["bias"] *= c1
                block["conv2"]["kernel"] *= a
                block["conv2"]["bias"] *= a
                if "conv_shortcut" in block:  # linear in the stream: its input is already at scale a
                    block["conv_shortcut"]["bias"] *= a
            if stage["attention"]:
                out = _get(tree, stage["attention"])["to_out_0"]
                out["kernel"] *= a
                out["bias"] *= a
            prev = a
        # what reads the last stage is a GroupNorm (conv_norm_out): nothing to undo
    return p, factors
