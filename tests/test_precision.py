"""fp16 / bf16 per VAE (fvae_core.precision): per-layer maxima against diffusers' own activations, the
half-precision decodes, and the exact power-of-two rescale on an SDXL-shaped VAE made to overflow."""
from __future__ import annotations

import re

import jax
import numpy as np
import pytest
import torch

from conftest import PARITY_CONFIGS, make_torch_vae, torch_state_numpy
from fvae_core import weights as W
from fvae_core.autoencoder import AutoencoderKL, VAEConfig, init_params
from fvae_core.data import skimage_photo
from fvae_core.precision import FP16_MAX, inspect, layer_maxima, rescale_for_half

E, D = "DownEncoderBlock2D", "UpDecoderBlock2D"
#: SDXL's VAE architecture (4 levels, 2 layers per block, 32 groups, scaling 0.13025) at a quarter width.
SDXL_SHAPED = VAEConfig(block_out_channels=(32, 64, 128, 128), down_block_types=(E,) * 4, up_block_types=(D,) * 4,
                        layers_per_block=2, norm_num_groups=32, scaling_factor=0.13025)


def _images(n=2, size=64):
    out = [skimage_photo(name)[:size * 4:4, :size * 4:4] for name in ("astronaut", "coffee")[:n]]
    return np.stack(out).astype(np.float32) / 255.0


def test_layer_maxima_match_diffusers_activations():
    """Independent oracle: forward hooks on diffusers' AutoencoderKL with the same weights record each
    module's max |output| on the same images; ours agree for convs, resnets and the attention."""
    cfg = PARITY_CONFIGS["tiny-sd"]
    model = make_torch_vae(cfg, seed=3)
    params = W.params_from_diffusers_state_dict(torch_state_numpy(model), cfg)
    x01 = _images()
    layers, _ = layer_maxima(cfg, params, x01 * 2 - 1)
    ours = {m.name: m for m in layers}
    seen = {}

    def hook(name):
        def fn(mod, inp, out):
            out = out[0] if isinstance(out, tuple) else out
            seen[name] = max(seen.get(name, 0.0), float(out.detach().abs().max()))
        return fn

    for name, mod in model.named_modules():
        if name.count(".") and type(mod).__name__ in ("Conv2d", "ResnetBlock2D", "Attention"):
            mod.register_forward_hook(hook(name))
    with torch.no_grad():
        x = torch.from_numpy(x01 * 2 - 1).permute(0, 3, 1, 2)
        model.decode(model.encode(x).latent_dist.mode())
    checked = 0
    for tname, value in seen.items():  # diffusers' module names -> ours
        name = re.sub(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)", r"\1_\2_\3_\4", tname)
        name = re.sub(r"mid_block\.(resnets|attentions)\.(\d+)", r"mid_block/\1_\2", name)
        name = re.sub(r"(samplers_\d+)\.conv", r"\1_conv", name).replace(".", "/")
        if name in ours:
            assert ours[name].max_abs == pytest.approx(value, rel=2e-4), name
            checked += 1
    assert checked >= 20, (checked, sorted(seen)[:5], sorted(ours)[:5])
    assert {m.kind for m in layers} >= {"conv", "resnet", "norm+act", "attention", "linear"}


def _overflowing(seed=0):
    """SDXL-shaped random weights whose decoder streams are scaled by 2e4 (conv_in, every conv2 and the
    attention's output projection): the float32 decode is unchanged in shape, the fp16 one overflows."""
    params = jax.tree_util.tree_map(np.asarray, init_params(SDXL_SHAPED, seed))
    d = params["decoder"]
    big = 2e4
    for path in ["conv_in", "mid_block/attentions_0/to_out_0"] + [
            f"{r}/conv2" for r in ["mid_block/resnets_0", "mid_block/resnets_1"]
            + [f"up_blocks_{i}_resnets_{j}" for i in range(4) for j in range(3)]]:
        node = d
        for k in path.split("/"):
            node = node[k]
        node["kernel"] = node["kernel"] * big
        node["bias"] = node["bias"] * big + big * 0.1
    return params


def test_rescale_makes_an_overflowing_vae_finite_in_fp16_and_keeps_its_fp32_output():
    """The issue's demonstration: NaN/inf in the fp16 decode before, none after; the float32 decode changes
    by nothing beyond rounding (>= 40 dB asked; the rescale is exact up to GroupNorm's eps); every
    activation it rescales is under the limit afterwards, and the report says so."""
    params = _overflowing()
    x01 = _images()
    before = inspect(SDXL_SHAPED, params, x01)
    assert before.precision["float16"]["nonfinite_pixels"] > 0
    assert before.worst.max_abs > FP16_MAX
    fixed, factors = rescale_for_half(SDXL_SHAPED, params, before.layers, limit=2048.0)
    assert min(factors.values()) < 1 and all(np.log2(f) == int(np.log2(f)) for f in factors.values())
    after = inspect(SDXL_SHAPED, fixed, x01)
    assert after.precision["float16"]["nonfinite_pixels"] == 0
    assert after.precision["float16"]["psnr_db"] > 30
    m = AutoencoderKL(SDXL_SHAPED)
    z = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    dec = jax.jit(lambda p, z: m.apply({"params": p}, z, method=m.decode))
    y0, y1 = np.asarray(dec(params, z)), np.asarray(dec(fixed, z))
    mse = float(np.mean((np.clip(y0, -1, 1) - np.clip(y1, -1, 1)) ** 2))
    assert 10 * np.log10(4 / max(mse, 1e-30)) >= 40
    assert np.abs(y0 - y1).max() < 1e-3
    big = {l.name: l.max_abs for l in after.layers if l.kind in ("conv", "resnet", "attention")}
    assert max(v for n, v in big.items() if not n.endswith("conv_out")) <= 2048.0 * 1.01


def test_rescale_of_a_healthy_vae_changes_nothing():
    """Activations already under the limit: every factor is 1 and the params are bit-identical."""
    cfg = PARITY_CONFIGS["tiny-sd"]
    params = init_params(cfg, 0)
    layers, _ = layer_maxima(cfg, params, _images() * 2 - 1)
    fixed, factors = rescale_for_half(cfg, params, layers, limit=1e6)
    assert set(factors.values()) == {1.0}
    for a, b in zip(jax.tree_util.tree_leaves(fixed), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_cli_inspect_writes_the_report_and_the_rescaled_vae(tmp_path, capsys):
    """``fvae inspect`` on the overflowing VAE: the report (markdown, JSON, figure) before and after, the
    rescaled VAE written as a diffusers folder that loads and decodes fp16 without NaN; bad arguments are
    one-line usage errors."""
    from PIL import Image

    from fvae_core.cli import main

    W.save_diffusers_folder(tmp_path / "vae", SDXL_SHAPED, _overflowing())
    (tmp_path / "img").mkdir()
    for i, im in enumerate(_images()):
        Image.fromarray((im * 255).astype(np.uint8)).save(tmp_path / "img" / f"{i}.png")
    argv = ["inspect", "--vae", str(tmp_path / "vae"), "--data", str(tmp_path / "img"), "--size", "64"]
    assert main([*argv, "--out", str(tmp_path / "out"), "--rescale-out", str(tmp_path / "fixed")]) == 0
    out = capsys.readouterr().out
    assert "## as given" in out and "## rescaled" in out and "| float16 |" in out
    import json

    rep = json.loads((tmp_path / "out" / "inspect.json").read_text())
    assert rep["as given"]["precision"]["float16"]["nonfinite_pixels"] > 0
    assert rep["rescaled"]["precision"]["float16"]["nonfinite_pixels"] == 0
    assert (tmp_path / "out" / "00_inspect_headroom.png").stat().st_size > 1000
    fixed = W.load_vae(tmp_path / "fixed")
    assert fixed.config == SDXL_SHAPED
    for bad, msg in ((["--size", "30"], "--size"), (["--limit", "0"], "--limit"), (["--rescale-limit", "1e6"], "--rescale-limit")):
        assert main([*argv, *bad]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["tiny-sd", "groups8-noattn-gelu"])
def test_rescale_is_exact_up_to_groupnorm_eps(name, monkeypatch):
    """A healthy VAE rescaled by small factors (a third of its streams' peaks as the limit), so that every
    bias is as large as the activations: with GroupNorm's eps set to 0 the rescaled encode and decode equal
    the original ones (powers of two: measured bit-identical), so a bias left unscaled (a shortcut's, a
    stage conv's) or a wrong kernel ratio at a stage boundary would show. With the real eps (1e-6) the
    difference is what eps does to this random-init VAE's small variances (1.2e-3 at tiny-sd), and is
    reported, not hidden: the rescale is exact in the function it reparametrises, not in eps."""
    from fvae_core import autoencoder as A

    cfg = PARITY_CONFIGS[name]
    params = jax.tree_util.tree_map(np.asarray, init_params(cfg, 2))
    x = _images(size=32) * 2 - 1
    layers, z = layer_maxima(cfg, params, x)
    peak = max(m.max_abs for m in layers if m.kind in ("resnet", "attention"))
    fixed, factors = rescale_for_half(cfg, params, layers, limit=peak / 3)
    assert any(f < 1 for k, f in factors.items() if "stage" in k)
    real = A._group_norm_act
    monkeypatch.setattr(A, "_group_norm_act", lambda x, s, b, groups, eps, act, dtype: real(x, s, b, groups, 0.0, act, dtype))
    jax.clear_caches()
    m = AutoencoderKL(cfg)
    for method, inp in ((m.decode, z), (lambda mod, v: mod.encode(v).mean, x)):
        y0 = np.asarray(m.apply({"params": params}, inp, method=method))
        y1 = np.asarray(m.apply({"params": fixed}, inp, method=method))
        assert np.abs(y0 - y1).max() <= 1e-6 * max(1.0, float(np.abs(y0).max())), np.abs(y0 - y1).max()
    jax.clear_caches()
