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
    loaded = W.load_vae(path)  # the config stored in the file's metadata
    assert loaded.config == cfg
    assert_params_identical(loaded.params, params)
    # A file without the stored config (as A1111 / ComfyUI write them): inferred from shapes.
    save_file(load_file(str(path)), str(tmp_path / "bare.safetensors"), metadata={"format": "pt"})
    notes = []
    if cfg.norm_num_groups == 32:  # shapes cannot tell norm groups; everything else is inferred
        inferred = W.load_single_file(tmp_path / "bare.safetensors", note=notes.append)
        assert_params_identical(inferred.params, params)
        for f in ("block_out_channels", "layers_per_block", "latent_channels", "use_quant_conv",
                  "use_post_quant_conv", "mid_block_add_attention", "in_channels", "out_channels"):
            assert getattr(inferred.config, f) == getattr(cfg, f), f
        assert len(notes) == 1 and "norm_num_groups=32" in notes[0] and "scaling_factor=" in notes[0]


#: Configs whose single files differ from the default in what shapes cannot tell (groups, scaling, shift)
#: or in what they can (latent channels, quant convs): the round trips issue 29 asks for.
ROUND_TRIP_CONFIGS = {
    "groups16": dict(norm_num_groups=16),
    "sdxl-scaling": dict(scaling_factor=0.13025),
    "sd3-like": dict(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                     use_post_quant_conv=False),
    "latent8-groups8": dict(latent_channels=8, norm_num_groups=8),
    "no-post-quant": dict(use_post_quant_conv=False),
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIP_CONFIGS))
def test_single_file_round_trip_keeps_the_config(name, tmp_path):
    """diffusers -> fvae single file -> fvae and -> diffusers' ``from_single_file`` (with a local config):
    the config comes back whole from the file's metadata (norm groups, scaling, shift included), the
    tensors are bit-identical and both decode the same latent alike. Before the metadata, a 16-group
    VAE came back as a 32-group one and decoded differently (max abs diff about 1.9), silently."""
    import torch
    from diffusers import AutoencoderKL as TorchVAE

    cfg = PARITY_CONFIGS["tiny-sd"].replace(**ROUND_TRIP_CONFIGS[name])
    model = make_torch_vae(cfg, seed=1)
    params = W.params_from_diffusers_state_dict(torch_state_numpy(model), cfg)
    path = W.save_single_file(tmp_path / "vae.safetensors", cfg, params)
    notes = []
    loaded = W.load_single_file(path, note=notes.append)
    assert loaded.config == cfg and notes == []
    assert_params_identical(loaded.params, params)
    # back to a diffusers folder, and into diffusers itself
    W.save_diffusers_folder(tmp_path / "back", loaded.config, loaded.params)
    again = TorchVAE.from_pretrained(str(tmp_path / "back")).eval()
    assert dict(again.config)["norm_num_groups"] == cfg.norm_num_groups
    assert again.config.scaling_factor == cfg.scaling_factor and again.config.shift_factor == cfg.shift_factor
    m2 = TorchVAE.from_single_file(str(path), config=str(tmp_path / "back")).eval()
    z = torch.randn(1, cfg.latent_channels, 4, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.decode(z).sample
        assert torch.equal(again.decode(z).sample, want) and torch.equal(m2.decode(z).sample, want)
    m = AutoencoderKL(loaded.config)
    ours = m.apply({"params": loaded.params}, z.numpy().transpose(0, 2, 3, 1), method=m.decode)
    np.testing.assert_allclose(np.asarray(ours), want.numpy().transpose(0, 2, 3, 1), atol=1e-4)


def test_single_file_without_a_stored_config_names_its_assumptions(tmp_path):
    """An A1111-style file of a 16-group VAE: loading it cannot know the groups, so the note on stderr names
    the assumed 32 (the decode then differs: shown, so the note is not about nothing); a config passed
    that differs from a stored one is named field by field; a broken stored config is one line."""
    cfg = PARITY_CONFIGS["tiny-sd"].replace(norm_num_groups=16, scaling_factor=0.13025)
    params = W.params_from_diffusers_state_dict(torch_state_numpy(make_torch_vae(cfg, seed=2)), cfg)
    path = W.save_single_file(tmp_path / "vae.safetensors", cfg, params)
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(path)), str(bare), metadata={"format": "pt"})
    proc = subprocess.run([sys.executable, "-c", f"from fvae_core.weights import load_vae; load_vae({str(bare)!r})"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.startswith("fvae:")]
    assert len(lines) == 1 and "norm_num_groups=32" in lines[0] and "scaling_factor=0.18215" in lines[0], proc.stderr
    guessed = W.load_single_file(bare, note=lambda m: None)
    assert guessed.config.norm_num_groups == 32
    z = np.random.default_rng(0).standard_normal((1, 4, 6, 4)).astype(np.float32)
    decode = lambda c, p: np.asarray(AutoencoderKL(c).apply({"params": p}, z, method=AutoencoderKL(c).decode))  # noqa: E731
    assert np.abs(decode(guessed.config, guessed.params) - decode(cfg, params)).max() > 0.1
    notes = []
    assert W.load_single_file(bare, config=cfg, note=notes.append).config == cfg and notes == []
    other = cfg.replace(scaling_factor=0.5)
    assert W.load_single_file(path, config=other, note=notes.append).config == other
    assert len(notes) == 1 and "scaling_factor" in notes[0] and "norm_num_groups" not in notes[0]
    broken = tmp_path / "broken.safetensors"
    save_file(load_file(str(path)), str(broken), metadata={"format": "pt", W.CONFIG_METADATA_KEY: '{"norm_num_groups": "x",'})
    with pytest.raises(W.WeightError, match="config in its metadata") as e:
        W.load_vae(broken)
    assert "\n" not in str(e.value)


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


def test_single_file_export_is_byte_identical_across_processes(tmp_path):
    """The header carries two metadata entries, which safetensors writes in a per-process hash order: the
    header is rewritten in a fixed order, so exports of the same weights are byte-identical (resume tests
    compare exports byte for byte). Four processes, so that a random order would show."""
    code = ("import sys; sys.path.insert(0, 'tests'); from conftest import PARITY_CONFIGS; "
            "from fvae_core import weights as W; from fvae_core.autoencoder import init_params; "
            "c = PARITY_CONFIGS['tiny-sd']; W.save_single_file(sys.argv[1], c, init_params(c, 0))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [tmp_path / f"{i}.safetensors" for i in range(4)]
    for p in paths:
        subprocess.run([sys.executable, "-c", code, str(p)], check=True, cwd=root)
    blobs = {p.read_bytes() for p in paths}
    assert len(blobs) == 1
    assert W.stored_config(paths[0]) == PARITY_CONFIGS["tiny-sd"]
    assert set(load_file(str(paths[0]))) == set(W.ldm_state_dict_from_diffusers(
        W.diffusers_state_dict_from_params(W.load_vae(paths[0]).params), PARITY_CONFIGS["tiny-sd"]))
