"""Weight interop: strict ports, diffusers/single-file export and import, safety, atomic writes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from fvae_core import weights as W
from fvae_core.autoencoder import AutoencoderKL
from conftest import PARITY_CONFIGS, make_torch_vae, torch_state_numpy


@pytest.fixture(scope="module")
def sd_like():
    cfg = PARITY_CONFIGS["tiny-sd"]
    model = make_torch_vae(cfg)
    state = torch_state_numpy(model)
    return cfg, model, state, W.params_from_diffusers_state_dict(state, cfg)


def _leaves(p):
    return jax.tree_util.tree_flatten_with_path(p)[0]


def assert_params_identical(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert [k for k, _ in la] == [k for k, _ in lb]
    for (k, x), (_, y) in zip(la, lb):
        assert np.array_equal(np.asarray(x), np.asarray(y)), k


def test_exported_diffusers_folder_loads_in_diffusers_and_decodes_identically(sd_like, tmp_path):
    from diffusers import AutoencoderKL as TorchVAE

    cfg, model, state, params = sd_like
    W.save_diffusers_folder(tmp_path / "vae", cfg, params)
    reloaded = TorchVAE.from_pretrained(str(tmp_path / "vae")).eval()
    for k, v in model.state_dict().items():  # the tensors diffusers loads are exactly the originals
        assert torch.equal(reloaded.state_dict()[k], v), k
    z = torch.randn(1, 4, 5, 7, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded.decode(z).sample, model.decode(z).sample)
    m = AutoencoderKL(cfg)
    ours = m.apply({"params": params}, z.numpy().transpose(0, 2, 3, 1), method=m.decode)
    np.testing.assert_allclose(ours, reloaded.decode(z).sample.detach().numpy().transpose(0, 2, 3, 1), atol=1e-4)
    # And back into fvae bit-identically.
    assert_params_identical(W.load_vae(tmp_path / "vae").params, params)
    # A pipeline folder (vae/ subfolder) is accepted too.
    assert W.load_vae(tmp_path).config == cfg


@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
def test_single_file_roundtrip_bit_identical_with_inferred_config(name, tmp_path):
    cfg = PARITY_CONFIGS[name]
    params = W.params_from_diffusers_state_dict(torch_state_numpy(make_torch_vae(cfg)), cfg)
    path = W.save_single_file(tmp_path / "vae.safetensors", cfg, params)
    keys = set(load_file(str(path)))
    assert "encoder.down.0.block.0.conv1.weight" in keys
    if cfg.mid_block_add_attention:
        assert load_file(str(path))["decoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 conv, as LDM
    loaded = W.load_vae(path) if cfg.norm_num_groups == 32 else W.load_vae(path, config=cfg)
    assert_params_identical(loaded.params, params)
    if cfg.norm_num_groups == 32:  # shapes cannot tell norm groups; everything else is inferred
        inferred = loaded.config
        for f in ("block_out_channels", "layers_per_block", "latent_channels", "use_quant_conv",
                  "use_post_quant_conv", "mid_block_add_attention", "in_channels", "out_channels"):
            assert getattr(inferred, f) == getattr(cfg, f), f


def test_single_file_keys_match_diffusers_own_ldm_converter(sd_like, tmp_path):
    """Independent oracle for the LDM key layout: diffusers' converter maps our file back exactly."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    cfg, model, state, params = sd_like
    path = W.save_single_file(tmp_path / "vae.safetensors", cfg, params)
    ldm = {k: torch.from_numpy(v) for k, v in load_file(str(path)).items()}
    converted = convert_ldm_vae_checkpoint(ldm, cfg.to_dict())
    assert set(converted) == set(state)
    for k in state:
        assert torch.equal(converted[k].reshape(state[k].shape), torch.from_numpy(state[k])), k
    # Decoder level order: LDM up.0 is the highest resolution = diffusers' last up block.
    n = len(cfg.block_out_channels)
    np.testing.assert_array_equal(load_file(str(path))["decoder.up.0.block.0.conv1.weight"],
                                  state[f"decoder.up_blocks.{n - 1}.resnets.0.conv1.weight"])


def test_single_file_loads_in_diffusers_from_single_file_offline(sd_like, tmp_path):
    from diffusers import AutoencoderKL as TorchVAE

    cfg, model, state, params = sd_like
    W.save_diffusers_folder(tmp_path / "cfg", cfg, params)
    path = W.save_single_file(tmp_path / "vae.safetensors", cfg, params)
    m2 = TorchVAE.from_single_file(str(path), config=str(tmp_path / "cfg"))
    for k, v in model.state_dict().items():
        assert torch.equal(m2.state_dict()[k], v), k


def test_first_stage_model_prefix_tolerated(sd_like, tmp_path):
    cfg, _, state, params = sd_like
    ldm = W.ldm_state_dict_from_diffusers(W.diffusers_state_dict_from_params(params), cfg)
    full = {"first_stage_model." + k: v for k, v in ldm.items()}
    full["model.diffusion_model.input_blocks.0.0.weight"] = np.zeros((2, 2), np.float32)  # a UNet key
    save_file(full, str(tmp_path / "sd.safetensors"))
    assert_params_identical(W.load_vae(tmp_path / "sd.safetensors").params, params)


def test_fp16_export_loads_as_fp32(sd_like, tmp_path):
    cfg, _, _, params = sd_like
    W.save_single_file(tmp_path / "h.safetensors", cfg, params, dtype="fp16")
    assert load_file(str(tmp_path / "h.safetensors"))["encoder.conv_in.weight"].dtype == np.float16
    loaded = W.load_vae(tmp_path / "h.safetensors")
    for (k, a), (_, b) in zip(_leaves(loaded.params), _leaves(params)):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, np.asarray(b).astype(np.float16).astype(np.float32))


# ---- strictness ---------------------------------------------------------------------------------------
def test_strict_port_lists_unknown_missing_and_misshaped(sd_like):
    cfg, _, state, _ = sd_like
    bad = dict(state)
    del bad["decoder.conv_out.bias"]
    bad["decoder.extra.weight"] = np.zeros(3, np.float32)
    bad["encoder.conv_in.weight"] = np.zeros((1, 2, 3, 3), np.float32)
    with pytest.raises(W.WeightError) as e:
        W.params_from_diffusers_state_dict(bad, cfg)
    msg = str(e.value)
    assert "unknown keys (1): decoder.extra.weight" in msg
    assert "missing keys (1): decoder.conv_out.bias" in msg
    assert "encoder.conv_in.weight: file (1, 2, 3, 3)" in msg
    assert "\n" not in msg


def test_wrong_config_for_weights_is_refused(sd_like, tmp_path):
    cfg, _, _, params = sd_like
    W.save_diffusers_folder(tmp_path / "vae", cfg, params)
    d = json.loads((tmp_path / "vae" / "config.json").read_text())
    d["layers_per_block"] = 2
    (tmp_path / "vae" / "config.json").write_text(json.dumps(d))
    with pytest.raises(W.WeightError, match="missing keys"):
        W.load_vae(tmp_path / "vae")


def test_non_finite_weights_refused_on_load_and_export(sd_like, tmp_path):
    cfg, _, state, params = sd_like
    bad = dict(state)
    bad["decoder.conv_out.bias"] = bad["decoder.conv_out.bias"].copy()
    bad["decoder.conv_out.bias"][0] = np.nan
    with pytest.raises(W.WeightError, match="non-finite"):
        W.params_from_diffusers_state_dict(bad, cfg)
    p = jax.tree_util.tree_map(np.array, params)
    p["decoder"]["conv_out"]["bias"][0] = np.inf
    with pytest.raises(W.WeightError, match="non-finite"):
        W.save_single_file(tmp_path / "x.safetensors", cfg, p)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_pickle_refused_unless_allowed(sd_like, tmp_path):
    cfg, model, state, params = sd_like
    ldm = W.ldm_state_dict_from_diffusers(state, cfg)
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in ldm.items()}}, tmp_path / "vae.ckpt")
    with pytest.raises(W.WeightError, match="refusing to load pickle"):
        W.load_vae(tmp_path / "vae.ckpt")
    assert_params_identical(W.load_vae(tmp_path / "vae.ckpt", allow_pickle=True).params, params)


@pytest.mark.parametrize("content", [b"", b"\x00" * 7, b"garbage that is not safetensors" * 10])
def test_corrupt_safetensors_one_line_error(tmp_path, content):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(content)
    with pytest.raises(W.WeightError) as e:
        W.load_vae(p)
    assert "bad.safetensors" in str(e.value) and "\n" not in str(e.value)


def test_truncated_safetensors_one_line_error(sd_like, tmp_path):
    cfg, _, _, params = sd_like
    p = W.save_single_file(tmp_path / "vae.safetensors", cfg, params)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(W.WeightError, match="vae.safetensors"):
        W.load_vae(p)


def test_missing_sources_and_bad_config(tmp_path):
    with pytest.raises(W.WeightError, match="does not exist"):
        W.load_vae(tmp_path / "nope.safetensors")
    with pytest.raises(W.WeightError, match="not a diffusers VAE folder"):
        W.load_vae(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(W.WeightError, match="cannot read VAE config"):
        W.load_vae(tmp_path)
    with pytest.raises(W.WeightError, match="neither an existing path nor a hub id"):
        W.load_vae("no such thing")


def test_hub_id_offline_gives_one_line_error_naming_id_and_local_path():
    code = ("import os; os.environ['HF_HUB_OFFLINE']='1'\n"
            "from fvae_core.weights import load_vae, WeightError\n"
            "try:\n load_vae('stabilityai/sd-vae-ft-mse')\n"
            "except WeightError as e: print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    line = out.strip()
    assert line.startswith("ERR") and "\n" not in line
    assert "stabilityai/sd-vae-ft-mse" in line and "local folder" in line


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "x.safetensors"
    target.write_bytes(b"old")

    def boom(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        W._atomic_write(target, boom)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_core_does_not_import_torch():
    code = ("import sys, fvae_core.autoencoder, fvae_core.weights, fvae_core.reconstruct, fvae_core.cli, "
            "fvae_core.demo; from fvae_core.weights import load_vae; "
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "ok", r.stderr


def test_fp16_overflow_is_refused_not_written_as_inf(sd_like, tmp_path):
    cfg, _, _, params = sd_like
    p = jax.tree_util.tree_map(np.array, params)
    p["decoder"]["conv_out"]["bias"][0] = 1e5  # finite in fp32, inf in fp16
    with pytest.raises(W.WeightError, match="non-finite weights \\(as fp16\\)"):
        W.save_single_file(tmp_path / "h.safetensors", cfg, p, dtype="fp16")
    assert not any(tmp_path.iterdir())
    W.save_single_file(tmp_path / "f.safetensors", cfg, p, dtype="fp32")  # fine in fp32


def test_exported_files_follow_the_umask_not_0600(sd_like, tmp_path):
    cfg, _, _, params = sd_like
    old = os.umask(0o022)
    try:
        W.save_diffusers_folder(tmp_path / "vae", cfg, params)
    finally:
        os.umask(old)
    for name in ["config.json", "diffusion_pytorch_model.safetensors"]:
        assert (tmp_path / "vae" / name).stat().st_mode & 0o777 == 0o644


def test_mistyped_local_folder_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(W.WeightError, match="models/myvae does not exist"):
        W.load_vae("models/myvae")
