"""End to end: ``fvae eval`` on fake VAEs with a known effect, and on the committed tiny VAE through the CLI.

The identity "VAE" must measure as exactly that (every error zero, every ratio neutral); a Gaussian
blur "VAE" must be detected as smoother, with less high-band energy and a sharpness ratio below 1,
with CIs that exclude "no effect" and paired differences against the identity of the right sign.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from fvae_core.cli import main
from fake_vaes import Blur, Identity
from fvae_core.evaluate import EvalError, ResizeReconstructor, evaluate, gather_images, views_at

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def images():
    imgs, skipped = gather_images(["openmoji", "photos"], limit=6, log=lambda *a: None)
    assert {im.subset for im in imgs} == {"flat art", "photos"}
    return imgs


@pytest.fixture(scope="module")
def result(images):
    return evaluate([Identity(), Blur()], images, [64, 128], lpips_net="alexnet", log=lambda *a: None)


def test_identity_measures_as_identity(result):
    rows = result.select("identity")
    assert len(rows) == 2 * 12
    for r in rows:
        assert math.isinf(r["psnr"])
        assert r["ssim"] == pytest.approx(1.0, abs=1e-12)
        assert r["lpips"] == pytest.approx(0.0, abs=1e-6)
        for k in ("gmsd", "delta_e_ok_mean", "ciede2000_mean", "L_mae", "chroma_mae", "hue_mae",
                  "dhf_db@0.25_L", "dhf_db@0.0625_a"):
            assert r[k] == pytest.approx(0.0, abs=1e-12), k
        for k in ("overshoot_mean", "flat_noise"):  # NaN where the image has no edge / no flat region
            assert math.isnan(r[k]) or r[k] == pytest.approx(0.0, abs=1e-12), k
        if not math.isnan(r["sharpness_ratio"]):
            assert r["sharpness_ratio"] == pytest.approx(1.0, abs=1e-12)
        assert r["grid_peak_db_rec_L"] == pytest.approx(r["grid_peak_db_orig_L"], abs=1e-9)


def test_blur_is_detected_as_smoother(result):
    summ = result.summary(["dhf_db@0.25_L", "sharpness_ratio", "err_hf_share@0.25_L", "psnr", "overshoot_mean"])
    for res in (64, 128):
        s = summ["blur"][res]["all"]
        assert s["dhf_db@0.25_L"].hi < -3.0  # clearly less high-band energy than the original
        assert s["sharpness_ratio"].hi < 0.9
        assert s["overshoot_mean"].value == pytest.approx(0.0, abs=1e-9)  # a Gaussian never overshoots
        assert np.isfinite(s["psnr"].value) and s["psnr"].value > 15
    pairs = result.paired("identity", "blur", ["dhf_db@0.25_L", "sharpness_ratio", "ssim", "lpips"])
    for res in (64, 128):
        for g in ("all", "flat art", "photos"):
            p = pairs[res][g]
            assert p["dhf_db@0.25_L"].hi < 0 and p["sharpness_ratio"].hi < 0
            assert p["ssim"].hi < 0 and p["lpips"].lo > 0


def test_spectra_curves_and_ratio(result):
    f, ratio = result.spectrum_estimates("blur", 128, "ratio")
    hi = f > 0.25
    assert np.all(ratio.value[hi] < -3)  # a Gaussian of sigma 1.2 removes most of the top band
    f, ratio_id = result.spectrum_estimates("identity", 128, "ratio")
    assert np.allclose(ratio_id.value, 0.0, atol=1e-9)


def test_views_never_upsample(images):
    views, skipped = views_at(images, 600)
    assert all(min(v.rgb.shape[:2]) == 600 for v in views)
    assert {s["item"] for s in skipped} == {im.name for im in images if min(im.rgb.shape[:2]) < 600}
    assert all("not upsampled" in s["reason"] for s in skipped)


def test_bad_evaluation_input(images):
    with pytest.raises(EvalError, match="multiple of 8"):
        evaluate([Identity()], images, [60], lpips_net=None)
    with pytest.raises(EvalError, match="unique"):
        evaluate([Identity(), Identity()], images, [64], lpips_net=None)

    class Broken:
        name = "broken"

        def __call__(self, x):
            return np.full_like(x, np.nan)

    with pytest.raises(EvalError, match="non-finite"):
        evaluate([Broken()], images[:2], [64], lpips_net=None)
    with pytest.raises(EvalError, match="large enough"):
        evaluate([Identity()], images[:2], [4096], lpips_net=None, log=lambda *a: None)


def test_cli_eval_real_vae(tmp_path, capsys):
    """The committed tiny VAE twice: two names, every paired difference exactly zero; files complete."""
    vae = str(ROOT / "weights" / "tiny-cpu")
    out = tmp_path / "ev"
    rc = main(["eval", "--vae", vae, "--vae", vae, "--data", "photos", "--limit", "3", "--resolutions", "64",
               "--lpips", "alexnet", "--quiet", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Paired difference" in printed
    rows = list(csv.DictReader(open(out / "per_image.csv")))
    assert len(rows) == 6 and {r["vae"] for r in rows} == {"tiny-cpu#0", "tiny-cpu#1"}
    doc = json.loads((out / "summary.json").read_text())
    paired = doc["paired"]["tiny-cpu#1 - tiny-cpu#0"]["64"]["all"]
    assert paired["psnr"]["value"] == 0.0 and paired["lpips"]["value"] == 0.0
    psnr = doc["summary"]["tiny-cpu#0"]["64"]["all"]["psnr"]
    assert 8 < psnr["value"] < 30 and psnr["lo"] <= psnr["value"] <= psnr["hi"]
    assert (out / "spectra.npz").is_file() and (out / "summary.md").is_file()
    assert sorted(p.name for p in out.glob("*.png"))  # figures written
    assert not list(tmp_path.glob(".ev.*"))  # no temporary folder left behind
    # A second run into the same, now non-empty, folder is refused before any work.
    assert main(["eval", "--vae", vae, "--data", "photos", "--out", str(out), "--quiet"]) == 2
    assert "not empty" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--vae", "MISSING", "--data", "photos"], "does not exist"),
    (["--vae", "WEIGHTS", "--data", "photos", "--resolutions", "64,abc"], "comma-separated"),
    (["--vae", "WEIGHTS", "--data", "/no/such/dir"], "no such file or folder"),
    (["--vae", "WEIGHTS", "--data", "EMPTY"], "no usable images"),
    (["--vae", "bicubic:1", "--data", "photos"], "integer factor F from 2 to 64"),
    (["--vae", "bicubic:eight", "--data", "photos"], "integer factor F from 2 to 64"),
    (["--vae", "bicubic:16", "--data", "photos", "--limit", "1", "--resolutions", "40"], "not a multiple of 16"),
])
def test_cli_eval_errors(tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    argv = [a.replace("WEIGHTS", str(ROOT / "weights" / "tiny-cpu")).replace("EMPTY", str(tmp_path / "empty"))
            .replace("MISSING", str(tmp_path / "missing"))
            for a in argv]
    rc = main(["eval", *argv, "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def _resample(x, n_out, kernel, support, axis):
    """Separable resampling from the definitions (pixel centres at i + 1/2, the kernel widened by the
    downscale factor, truncated at the borders and renormalised): an oracle written apart from Pillow."""
    x = np.moveaxis(np.asarray(x, np.float64), axis, 0)
    n_in = x.shape[0]
    scale = n_in / n_out
    widen = max(scale, 1.0)
    rows = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = (i + 0.5) * scale
        lo, hi = max(int(centre - support * widen + 0.5), 0), min(int(centre + support * widen + 0.5), n_in)
        w = kernel((np.arange(lo, hi) - centre + 0.5) / widen)
        rows[i, lo:hi] = w / w.sum()
    return np.moveaxis(np.tensordot(rows, x, axes=1), 0, axis)


def _lanczos3(t):
    t = np.abs(t)
    return np.where(t < 3, np.sinc(t) * np.sinc(t / 3), 0.0)


def _keys_cubic(t, a=-0.5):
    t = np.abs(t)
    return np.where(t < 1, (a + 2) * t**3 - (a + 3) * t**2 + 1,
                    np.where(t < 2, a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a, 0.0))


def test_bicubic_reference_against_the_definitions(images):
    """``bicubic:F`` is Lanczos-3 (antialiased) down by F, the small image clipped to [0, 1], Keys cubic
    (a = -0.5) up: checked on real images against those definitions computed here in float64, and on
    analytic cases (a constant comes back exactly; so does a ramp, away from the borders)."""
    const = np.full((2, 64, 64, 3), 0.3, np.float32)
    np.testing.assert_allclose(ResizeReconstructor.parse("bicubic:8")(const), const, atol=1e-6)
    ramp = np.broadcast_to(np.linspace(0.1, 0.9, 64, dtype=np.float32)[None, :, None, None], (1, 64, 64, 3))
    rec = ResizeReconstructor.parse("bicubic:4")(np.ascontiguousarray(ramp))
    # Lanczos-3 at 4x reaches 12 px, then the cubic 2 more: exact to 1e-4 beyond 16 px from the edges.
    np.testing.assert_allclose(rec[:, 16:-16], ramp[:, 16:-16], atol=1e-4)
    # not square: height and width are not swapped anywhere
    wide = np.ascontiguousarray(np.broadcast_to(np.linspace(0.1, 0.9, 64, dtype=np.float32)[None, None, :, None],
                                                (1, 32, 64, 3)))
    rec = ResizeReconstructor.parse("bicubic:4")(wide)
    assert rec.shape == wide.shape
    np.testing.assert_allclose(rec[:, :, 16:-16], wide[:, :, 16:-16], atol=1e-4)

    views, _ = views_at(images, 64)
    x = np.stack([v.rgb for v in views]).astype(np.float32) / 255.0
    for f in (8, 4):
        got = ResizeReconstructor.parse(f"bicubic:{f}")(x)
        small = np.clip(_resample(_resample(x, 64 // f, _lanczos3, 3, 1), 64 // f, _lanczos3, 3, 2), 0, 1)
        ref = np.clip(_resample(_resample(small, 64, _keys_cubic, 2, 1), 64, _keys_cubic, 2, 2), 0, 1)
        np.testing.assert_allclose(got, ref, atol=1e-5)
        assert np.abs(got - x).mean() > 0.01  # it really lost detail


def test_bicubic_references_in_an_evaluation(images):
    """More pixels kept, better reconstruction: bicubic×4 beats bicubic×8 on every image, paired."""
    res = evaluate([ResizeReconstructor.parse("bicubic:8"), ResizeReconstructor.parse("bicubic:4")], images,
                   [64], lpips_net=None, log=lambda *a: None)
    assert res.vaes == ["bicubic×8", "bicubic×4"]
    p8 = {r["image"]: r["psnr"] for r in res.select("bicubic×8")}
    p4 = {r["image"]: r["psnr"] for r in res.select("bicubic×4")}
    assert p8.keys() == p4.keys() and all(p4[k] > p8[k] for k in p8)
    assert res.paired("bicubic×8", "bicubic×4", ["psnr"], n_boot=200)[64]["all"]["psnr"].lo > 0


def test_threaded_evaluation_equals_serial(images, result):
    """VAEs reconstruct (and get LPIPS) two at a time in threads by default; the rows must not depend on it,
    and each VAE's rows must stay its own (a swap of outputs between threads would show as Identity != 0)."""
    serial = evaluate([Identity(), Blur()], images, [64, 128], lpips_net="alexnet", log=lambda *a: None, threads=1)
    assert len(serial.rows) == len(result.rows)
    for a, b in zip(serial.rows, result.rows):
        assert a.keys() == b.keys()
        for k in a:  # NaN where a metric is undefined (the identity's error spectrum), equal elsewhere
            assert a[k] == b[k] or (isinstance(a[k], float) and math.isnan(a[k]) and math.isnan(b[k])), (k, a, b)
    for k in serial.spectra:
        for name in ("rec", "err"):
            np.testing.assert_array_equal(serial.spectra[k][name], result.spectra[k][name])


def test_perturbed_reconstructor(images, monkeypatch):
    """σ = 0 is the plain reconstruction; the noise is the same for every VAE (paired) and for every call,
    and grows the error with σ."""
    from fvae_core.evaluate import PerturbedReconstructor, VAEReconstructor

    vae = VAEReconstructor.load(str(ROOT / "weights" / "small-cpu"), "base")
    x = np.stack([v.rgb for v in views_at(images[:4], 64)[0]]).astype(np.float32) / 255.0
    np.testing.assert_allclose(PerturbedReconstructor(vae, 0.0, 5.0)(x), vae(x), atol=2e-5)
    # Another decoder (same encoder, as every finetune has): the latents it is handed must carry the same
    # noise, z + 0.25 * 5 * N(0, 1), and the same noise on every call.
    import jax

    from fvae_core import reconstruct

    other = dataclasses.replace(vae, name="other", params={**vae.params, "decoder": jax.tree_util.tree_map(
        lambda w: w * 1.01, vae.params["decoder"])})
    seen = []
    real_decode = reconstruct.decode_latents

    def spy(config, params, z, **kw):
        seen.append(np.asarray(z))
        return real_decode(config, params, z, **kw)

    monkeypatch.setattr(reconstruct, "decode_latents", spy)
    a = PerturbedReconstructor(vae, 0.25, 5.0, name="a")
    b = PerturbedReconstructor(other, 0.25, 5.0, name="b")
    ya, yb, ya2 = a(x), b(x), a(x)
    monkeypatch.undo()
    assert a.name == "a" and PerturbedReconstructor(vae, 0.5, 5.0).name == "base@σ0.5"
    z = reconstruct.encode_latents(vae.config, vae.params, x)
    noise = [(s - z) / 1.25 for s in seen]
    np.testing.assert_allclose(noise[0], noise[1], atol=1e-5)
    np.testing.assert_array_equal(seen[0], seen[2])
    assert abs(float(np.std(noise[0])) - 1) < 0.1 and abs(float(np.mean(noise[0]))) < 0.1
    np.testing.assert_array_equal(ya, ya2)
    assert not np.array_equal(ya, yb)  # the other decoder really decoded
    err = [float(np.mean((PerturbedReconstructor(vae, s, 5.0)(x) - x) ** 2)) for s in (0.0, 0.25, 1.0)]
    assert err[0] < err[1] < err[2]
    with pytest.raises(EvalError, match="sigma"):
        PerturbedReconstructor(vae, -1.0, 5.0)


def test_perturbed_encode_memo_is_keyed_by_content(images):
    """The shared memo: the base and a decoder-only finetune at two σ encode once and decode exactly what
    they would without it; a different encoder, or different images, is encoded afresh (a memo keyed by
    name, or by the decoder, would hand them the base's latents)."""
    import jax

    from fvae_core.evaluate import EncodeMemo, PerturbedReconstructor, VAEReconstructor

    vae = VAEReconstructor.load(str(ROOT / "weights" / "small-cpu"), "base")
    x = np.stack([v.rgb for v in views_at(images[:3], 64)[0]]).astype(np.float32) / 255.0
    scaled = lambda tree: jax.tree_util.tree_map(lambda w: w * 1.01, tree)  # noqa: E731
    finetune = dataclasses.replace(vae, name="ft", params={**vae.params, "decoder": scaled(vae.params["decoder"])})
    memo = EncodeMemo()
    for v in (vae, finetune):
        for sigma in (0.1, 0.5):
            np.testing.assert_array_equal(PerturbedReconstructor(v, sigma, 5.0, encodings=memo)(x),
                                          PerturbedReconstructor(v, sigma, 5.0)(x))
    assert memo.encodes == 1
    other_encoder = dataclasses.replace(vae, name="base", params={**vae.params, "encoder": scaled(vae.params["encoder"])})
    np.testing.assert_array_equal(PerturbedReconstructor(other_encoder, 0.1, 5.0, encodings=memo)(x),
                                  PerturbedReconstructor(other_encoder, 0.1, 5.0)(x))
    assert memo.encodes == 2
    PerturbedReconstructor(vae, 0.1, 5.0, encodings=memo)(x[:2])
    assert memo.encodes == 3


def test_vae_reconstructors_sharing_encodes(images):
    """Reconstructors sharing an EncodeMemo (what fvae eval and the suite's evaluation do) encode each image
    set once per encoder and reconstruct what each would alone (the same jitted encode and decode as one
    fused call: equal to float32 rounding, bit-identical as measured); another encoder is encoded afresh."""
    import jax

    from fvae_core.evaluate import EncodeMemo, VAEReconstructor

    vae = VAEReconstructor.load(str(ROOT / "weights" / "small-cpu"), "base", batch_size=2)
    x = np.stack([v.rgb for v in views_at(images[:3], 64)[0]]).astype(np.float32) / 255.0
    scaled = lambda tree: jax.tree_util.tree_map(lambda w: w * 1.01, tree)  # noqa: E731
    finetune = dataclasses.replace(vae, name="ft", params={**vae.params, "decoder": scaled(vae.params["decoder"])})
    other = dataclasses.replace(vae, name="other", params={**vae.params, "encoder": scaled(vae.params["encoder"])})
    memo = EncodeMemo()
    outs = {}
    for v in (vae, finetune, other):
        alone = v(x)
        outs[v.name] = dataclasses.replace(v, encodings=memo)(x)
        np.testing.assert_allclose(outs[v.name], alone, atol=1e-6)
    assert memo.encodes == 2  # the base and the finetune share one encode; the other encoder has its own
    assert np.max(np.abs(outs["ft"] - outs["base"])) > 1e-3 and np.max(np.abs(outs["other"] - outs["base"])) > 1e-3


def test_large_images_are_evaluated_in_exact_tiles(images, monkeypatch):
    """Above the size threshold (lowered here) the evaluation's VAE reconstructs image by image in exact
    tiles: the same reconstruction as in one piece, to float32 summation order."""
    from fvae_core import reconstruct, tiling
    from fvae_core.evaluate import VAEReconstructor

    vae = VAEReconstructor.load(str(ROOT / "weights" / "small-cpu"), "base")
    x = np.stack([v.rgb for v in views_at(images[:2], 64)[0]]).astype(np.float32) / 255.0
    whole = vae(x)
    calls = []
    real = tiling.tiled_decode
    monkeypatch.setattr(tiling, "tiled_decode", lambda *a, **k: calls.append(k["band_bytes"]) or real(*a, **k))
    monkeypatch.setattr(reconstruct, "AUTO_TILE_BYTES", 1000)
    monkeypatch.setattr(reconstruct, "AUTO_TILE_ROWS", 8)
    tiled = vae(x)
    row = 64 * vae.config.block_out_channels[0] * 4
    assert calls == [8 * row, 8 * row]  # one call per image, in bands of 8 rows of 64
    np.testing.assert_allclose(tiled, whole, atol=2e-5)
