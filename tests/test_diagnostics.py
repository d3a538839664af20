"""Ground-truth sidecar, diagnostics, template baseline, `diagnose` and the
robustness benchmark on tiny data (16 px, test_tiny)."""
import csv
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import view_stats
from scr_jax import data, diagnostics as D, evaluator, metrics, model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = [sys.executable, os.path.join(ROOT, "experiments", "run.py")]
S = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("synface_gt"))
  data.export_synface(root, n_train=24, n_val=8, n_test=8, size=S, seed=3, verbose=False)
  return root


# ----------------------------------------------------------------------------
# Sidecar
# ----------------------------------------------------------------------------

def test_sidecar_round_trip(tiny):
  ref = data.generate_split(8, S, seed=3, split="val", with_canonical=True)
  d = data.load_synface(tiny, "val", S)
  gt = data.load_gt(tiny, "val", d["names"], S)
  np.testing.assert_array_equal(gt["view"], ref["views"])
  np.testing.assert_array_equal(gt["light"], ref["lights"])
  np.testing.assert_array_equal(gt["canon_mask"], ref["canon_mask"])
  # uint16 depth (3e-6 steps over 0.2) and uint8 albedo quantisation only.
  np.testing.assert_allclose(gt["canon_depth"], ref["canon_depth"], atol=2e-6)
  np.testing.assert_allclose(gt["canon_albedo"], ref["canon_albedo"], atol=0.5 / 255 + 1e-6)
  # Selected and ordered by name; unknown names / crops / no file give None.
  sub = data.load_gt(tiny, "val", ["000005", "000001"], S)
  np.testing.assert_array_equal(sub["view"], ref["views"][[5, 1]])
  assert data.load_gt(tiny, "val", ["999999"], S) is None
  assert data.load_gt(tiny, "val", d["names"], S, crop=12) is None
  assert data.load_gt(tiny, "nosuch", d["names"], S) is None
  # Resized with the images: a 32 px read of 16 px data.
  big = data.load_gt(tiny, "val", d["names"], 32)
  assert big["canon_depth"].shape == (8, 32, 32) and big["canon_albedo"].shape == (8, 32, 32, 3)


def test_sidecar_regenerated_without_rendering_is_identical(tiny, tmp_path):
  # Data exported before sidecars existed: write_missing_gt adds the same file.
  path = os.path.join(tiny, "test", data.GT_FILE)
  want = dict(np.load(path))
  moved = str(tmp_path / "gt_moved.npz")
  os.rename(path, moved)
  try:
    assert data.write_missing_gt(tiny, verbose=False) == ["test"]
    got = dict(np.load(path))
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert data.write_missing_gt(tiny, verbose=False) == []
  finally:
    os.replace(moved, path)


def test_variants_are_named_and_change_the_data():
  assert set(data.VARIANTS) >= {"default", "wide_pose", "harsh_light", "hires64", "albedo_alt"}
  with pytest.raises(data.UserError, match="unknown data variant"):
    data.get_variant("nope")
  wide = data.get_variant("wide_pose").gen
  views = np.stack([data.sample_params(data.sample_rng(0, "train", i), wide)["view"]
                    for i in range(200)])
  assert np.rad2deg(np.abs(views[:, 0]).max()) > 10  # pitch beyond the default +-5
  assert np.abs(views[:, 3]).max() > 0.01  # x shift
  # The alternative albedo family: same shape, other colours; default unchanged.
  base = data.canonical_face(data.sample_params(data.sample_rng(0, "train", 0), data.GenConfig()), S)
  alt_cfg = data.get_variant("albedo_alt").gen
  alt = data.canonical_face(data.sample_params(data.sample_rng(0, "train", 0), alt_cfg), S, alt_cfg)
  np.testing.assert_array_equal(base[0], alt[0])
  assert np.abs(base[1] - alt[1]).mean() > 0.05
  np.testing.assert_array_equal(alt[1], alt[1][:, ::-1])  # still symmetric
  assert data.get_variant("hires64").export_size == 64


NEW_FAMILIES = ("morph", "frame", "front_light", "cat", "car", "stress")


def test_existing_variants_are_unchanged():
  # Sidecar arrays (views, lights, quantised canonical maps) of the variants
  # that existed before the new families: pinned, so adding families or
  # GenConfig fields cannot change data people have benchmarked on. Pinned to
  # a tolerance, not by hash: a byte hash of the same generator code came out
  # different on another machine (likely CPU-specific float32 exp / power
  # kernels: last-ulp differences that flip a few quantisation levels); any
  # real change (an extra rng draw, another shape) moves these numbers by
  # orders of magnitude more. The fixture holds the full views and
  # lights and per-image mean / std of each map (samples 0-5 of train, 32 px).
  with open(os.path.join(ROOT, "tests", "fixtures", "variant_gt_moments.json")) as fh:
    want = json.load(fh)
  assert set(want) == {"default", "wide_pose", "albedo_alt"}
  for name, w in want.items():
    g = data.canonical_gt(6, 32, 0, "train", data.get_variant(name).gen)
    np.testing.assert_allclose(g["view"], w["view"], rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(g["light"], w["light"], rtol=1e-5, atol=1e-6, err_msg=name)
    # Tolerances in the maps' own units: a few boundary pixels of 1024 may flip.
    for k, atol in (("canon_depth", 2.0), ("canon_albedo", 0.05), ("canon_mask", 3 / 1024)):
      a = g[k].reshape(6, -1).astype(np.float64)
      np.testing.assert_allclose(a.mean(1), w[k]["mean"], rtol=0, atol=atol, err_msg=f"{name} {k}")
      np.testing.assert_allclose(a.std(1), w[k]["std"], rtol=0, atol=2 * atol, err_msg=f"{name} {k}")
  # New fields at their defaults stay out of meta.json / TFDS config names.
  assert set(data.GenConfig().to_json()) == {
      "max_yaw_deg", "max_pitch_deg", "max_roll_deg", "max_shift", "asymmetry",
      "ambient_range", "diffuse_range", "max_light_dxy", "fov_deg", "min_depth",
      "max_depth", "albedo", "chunk"}
  cat = data.get_variant("cat").gen
  assert data.GenConfig.from_json(cat.to_json()) == cat


@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_new_variants_are_symmetric_objects_with_ground_truth(name):
  cfg = data.get_variant(name).gen
  base = data.canonical_face(data.sample_params(data.sample_rng(0, "train", 0), data.GenConfig()), 32)
  masks = []
  for i in range(6):
    depth, albedo, mask = data.canonical_face(data.sample_params(data.sample_rng(0, "train", i), cfg),
                                              32, cfg)
    np.testing.assert_array_equal(depth, depth[:, ::-1])
    np.testing.assert_array_equal(albedo, albedo[:, ::-1])
    np.testing.assert_array_equal(mask, mask[:, ::-1])
    assert D.relief(depth[None])[0] > 0  # convex, like every generated object
    assert 0.9 <= depth.min() and depth.max() <= 1.1
    masks.append(mask)
  masks = np.stack(masks)
  if cfg.shape != "head":  # another silhouette than the head family's
    assert np.mean(masks != base[2]) > 0.1
  if name == "frame":  # cut by the frame edges
    assert masks[:, :, 0].any() and masks[:, 0, :].any()
  g = data.generate_split(4, 32, seed=1, split="test", cfg=cfg, with_canonical=True)
  assert g["mask"].mean() > 0.2 and g["images"].max() > 100


def test_morph_family_is_a_linear_model_narrower_than_the_head():
  morph = data.get_variant("morph").gen
  p = data.sample_params(data.sample_rng(0, "train", 0), morph)
  assert p["m_coef"].shape == (20,)
  d0, _, m0 = data.canonical_face(p, 64, morph)
  # Doubling one random mode's coefficient moves the depth by the same field twice.
  k = 10
  steps = []
  for delta in (1.0, 2.0):
    q = dict(p, m_coef=p["m_coef"] + delta * (np.arange(20) == k))
    steps.append(data.canonical_face(q, 64, morph)[0] - d0)
  inside = m0 & (np.abs(steps[0]) > 1e-6)
  np.testing.assert_allclose(steps[1][inside], 2 * steps[0][inside], rtol=1e-3, atol=2e-6)
  head_mask = data.canonical_face(data.sample_params(data.sample_rng(0, "train", 0),
                                                     data.GenConfig()), 64)[2]
  assert m0.sum(axis=1).max() < 0.85 * head_mask.sum(axis=1).max()  # narrower in the frame


def test_generator_conventions_are_the_models():
  # The sidecar's factors, fed to the model's own renderer (model.render_factors:
  # view_from_raw / light_from_raw conventions, albedo in [-1, 1]), reproduce the
  # generated image (to its uint8 rounding) and depth: predicted and true
  # factors are directly comparable.
  g = data.generate_split(4, 32, seed=7, split="test", with_canonical=True,
                          cfg=data.get_variant("wide_pose").gen)
  light = jnp.asarray(g["lights"])
  f = model.Factors(depth_BxSxS=jnp.asarray(g["canon_depth"]),
                    albedo_BxSxSx3=model.to_model_range(jnp.asarray(g["canon_albedo"])),
                    ambient_B=light[:, 0], diffuse_B=light[:, 1], light_dxy_Bx2=light[:, 2:4],
                    view_Bx6=jnp.asarray(g["views"]))
  out, _ = model.render_factors(f, data.GenConfig().camera(32))
  inside = np.asarray(metrics.erode(g["mask"])) > 0
  assert inside.sum() > 1000
  rec = np.clip(np.asarray(out.recon_image()), 0, 1)
  assert np.abs(rec - g["images"] / 255.0)[inside].max() < 0.6 / 255
  assert np.abs(np.asarray(out.recon_depth_BxSxS) - g["depth"])[inside].max() < 1e-5


# ----------------------------------------------------------------------------
# Diagnostics (pure functions)
# ----------------------------------------------------------------------------

def _gt(tiny, split="val"):
  d = data.load_synface(tiny, split, S)
  return d, data.load_gt(tiny, split, d["names"], S)


def test_ground_truth_as_prediction_is_perfect(tiny):
  _, gt = _gt(tiny)
  diag = D.diagnose(gt, gt)
  for k in ("view_pitch_mae_deg", "view_yaw_mae_deg", "view_roll_mae_deg",
            "view_pitch_offset_deg", "light_ambient_mae", "light_diffuse_mae", "light_dir_deg"):
    assert abs(diag[k]) < 1e-9, (k, diag[k])
  for k in ("view_pitch_corr", "view_yaw_corr", "view_roll_corr"):
    assert diag[k] == pytest.approx(1.0, abs=1e-12)
  assert diag["depth_sign"] == 1.0 and diag["depth_sign_gt"] == 1.0
  assert diag["shape_spread_ratio"] == pytest.approx(1.0)
  assert diag["relief_ratio"] == pytest.approx(1.0)
  assert diag["light_oblique_slope"] == pytest.approx(1.0)
  assert diag["shape_spread_gt"] > 1e-3  # the faces do differ


def test_known_offsets_show_up(tiny):
  _, gt = _gt(tiny)
  pred = dict(gt)
  v = np.array(gt["view"], np.float64)
  v[:, 0] += np.deg2rad(7.0)  # a global pitch offset: reported, then removed
  v[:, 1] += np.deg2rad(3.0)  # a yaw bias: a 3 degree error, correlation 1
  v[:, 2] = -v[:, 2]  # mirrored roll: correlation -1
  pred["view"] = v
  diag = D.diagnose(pred, gt)
  assert diag["view_pitch_offset_deg"] == pytest.approx(7.0, abs=1e-4)
  assert diag["view_pitch_mae_deg"] == pytest.approx(0.0, abs=1e-4)
  assert diag["view_yaw_mae_deg"] == pytest.approx(3.0, abs=1e-4)
  assert diag["view_yaw_corr"] == pytest.approx(1.0, abs=1e-9)
  assert diag["view_roll_corr"] == pytest.approx(-1.0, abs=1e-9)
  want_roll = np.mean(np.abs(2 * np.rad2deg(gt["view"][:, 2].astype(np.float64))))
  assert diag["view_roll_mae_deg"] == pytest.approx(want_roll, rel=1e-5)
  # A collapsed view: zero correlation, not NaN.
  pred["view"] = np.zeros_like(v)
  assert D.diagnose(pred, gt)["view_yaw_corr"] == 0.0


def test_light_direction_angle():
  t = np.array([[0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 1.0, 0.0]])
  p = np.array([[0.6, 0.3, 1.0, 0.0], [0.5, 0.5, 0.0, 0.0]])  # 45 degrees both
  e = D.light_errors(p, t)
  assert e["light_dir_deg"] == pytest.approx(45.0, abs=1e-9)
  assert e["light_ambient_mae"] == pytest.approx(0.05)
  assert e["light_diffuse_mae"] == pytest.approx(0.1)


def test_light_oblique_slope_planted():
  ang = np.deg2rad(np.linspace(5.0, 45.0, 9))
  az = np.linspace(0.0, 2 * np.pi, 9, endpoint=False)  # any azimuth: only the angle counts
  light = lambda a: np.stack([np.full(9, .5), np.full(9, .5), np.tan(a) * np.cos(az),
                              np.tan(a) * np.sin(az)], 1)
  t = light(ang)
  np.testing.assert_allclose(D.light_obliqueness_deg(t), np.rad2deg(ang), atol=1e-9)
  assert D.light_errors(t, t)["light_oblique_slope"] == pytest.approx(1.0)
  assert D.light_errors(light(ang / 2), t)["light_oblique_slope"] == pytest.approx(0.5)
  assert D.light_errors(light(np.full(9, 0.3)), t)["light_oblique_slope"] == pytest.approx(0.0)
  assert np.isnan(D.light_errors(t, light(np.full(9, 0.3)))["light_oblique_slope"])


def test_fault_kinds_on_planted_diagnostics(tiny):
  """diagnostics.fault names the first failure in causal order; the truth
  (and a slightly noisy truth) has none."""
  _, gt = _gt(tiny)
  assert D.fault(D.diagnose(gt, gt), mad=1.0, avg_gt_mad=20.0) == ""
  diag = D.diagnose(gt, gt)
  assert diag["light_intensity"] == pytest.approx(np.mean(gt["light"][:, 0] + gt["light"][:, 1]))
  assert diag["view_yaw_std_ratio"] == pytest.approx(1.0)
  dark = dict(gt, light=np.concatenate([np.zeros((len(gt["light"]), 2)), gt["light"][:, 2:]], 1),
              view=np.zeros_like(gt["view"]))
  d = D.diagnose(dark, gt)
  assert d["light_intensity"] == 0.0 and d["view_yaw_std_ratio"] == 0.0
  assert D.fault(d) == "black render"
  assert D.fault(dict(diag, view_yaw_std_ratio=0.05)) == "constant view"
  assert D.fault(dict(diag, depth_sign=0.3, view_yaw_corr=-0.9)) == "concave"
  assert D.fault(dict(diag, view_yaw_corr=-0.9)) == "mirrored yaw"
  assert D.fault(dict(diag, view_yaw_corr=0.8)) == "weak yaw"
  assert D.fault(diag, mad=25.0, avg_gt_mad=20.0) == "MAD >= avg-GT"
  # keys an older result lacks are skipped, NaN too
  assert D.fault({"view_yaw_corr": 0.95, "light_intensity": float("nan")}) == ""
  assert D.headline(d).endswith("FAILED: black render") and "FAILED" not in D.headline(diag)


def test_relief_ratio_planted():
  rng = np.random.default_rng(0)
  truth = 1.0 + 0.02 * rng.standard_normal((5, 8, 8))
  region = np.ones((8, 8), bool)
  assert D.relief_ratio(truth, truth, region) == pytest.approx(1.0)
  assert D.relief_ratio(1.03 + 2 * (truth - 1.0), truth, region) == pytest.approx(2.0)
  assert D.relief_ratio(np.ones_like(truth), truth, region) == 0.0  # flat
  assert np.isnan(D.relief_ratio(truth, np.ones_like(truth), region))


def test_depth_sign_and_template_collapse(tiny):
  _, gt = _gt(tiny)
  z = gt["canon_depth"]
  inverted = 2 * z.mean(axis=(1, 2), keepdims=True) - z
  assert D.depth_sign(inverted) == 0.0
  mixed = np.concatenate([z[:6], inverted[6:]])
  assert D.depth_sign(mixed) == pytest.approx(6 / 8)
  # A few extreme pixels cannot flip the sign (medians).
  spiky = z.copy()
  spiky[:, 7, 7] = 5.0
  assert D.depth_sign(spiky) == 1.0
  # One template for every image: zero spread.
  region = D.face_region(gt["canon_mask"])
  template = np.broadcast_to(z.mean(0), z.shape)
  assert D.shape_spread(template, region) < 1e-9
  pred = dict(gt, canon_depth=template)
  assert D.diagnose(pred, gt)["shape_spread_ratio"] < 1e-6


def test_shape_residual_corr_on_planted_predictions(tiny):
  _, gt = _gt(tiny)
  z, region = gt["canon_depth"], D.face_region(gt["canon_mask"])
  assert np.allclose(D.shape_residual_corr(z, z, region), 1.0)
  # The same shapes at another scale and level are still each image's own shape.
  assert np.allclose(D.shape_residual_corr(1.0 + 0.5 * (z - 1.0), z, region), 1.0)
  template = np.broadcast_to(z.mean(0), z.shape)
  assert np.all(D.shape_residual_corr(template, z, region) == 0.0)
  flipped = 2 * z.mean(0) - z  # every departure from the mean shape inverted
  assert np.allclose(D.shape_residual_corr(flipped, z, region), -1.0)
  # Half the residual buried in noise: in between, and diagnose reports its median.
  rng = np.random.default_rng(0)
  resid = z - z.mean(0)
  noisy = z.mean(0) + resid + rng.normal(size=z.shape) * resid[:, region].std()
  c = D.shape_residual_corr(noisy, z, region)
  assert np.all((c > 0.1) & (c < 0.95))
  diag = D.diagnose(dict(gt, canon_depth=noisy), gt)
  assert diag["shape_corr"] == pytest.approx(np.median(c))
  assert diag["shape_corr_q25"] <= diag["shape_corr"]
  assert D.diagnose(dict(gt, canon_depth=template), gt)["shape_corr"] == 0.0
  with pytest.raises(ValueError):
    D.shape_residual_corr(z[:3], z, region)


# ----------------------------------------------------------------------------
# Training logs them; `diagnose` prints them and draws the grid
# ----------------------------------------------------------------------------

def _run(*args, **kw):
  return subprocess.run(RUN + list(args), capture_output=True, text=True, cwd=ROOT, **kw)


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("diag_run"))
  r = _run("train", "--preset", "test_tiny", "--data", tiny, "--workdir", wd, "--steps", "2")
  assert r.returncode == 0, r.stderr[-2000:]
  return wd, r


def test_validation_logs_diagnostics(trained):
  wd, r = trained
  with open(os.path.join(wd, "metrics.csv")) as fh:
    rows = {(int(s), k): float(v) for s, k, v in list(csv.reader(fh))[1:]}
  for key in ("view_yaw_mae_deg", "view_yaw_corr", "view_pitch_offset_deg", "light_dir_deg",
              "depth_sign", "shape_spread", "shape_spread_ratio"):
    assert (2, f"val/{key}") in rows, key
  assert rows[(2, "val/depth_sign_gt")] == 1.0
  assert 0.0 <= rows[(2, "val/depth_sign")] <= 1.0
  assert "yaw err" in r.stderr  # the validation line shows the headline
  assert os.listdir(os.path.join(wd, "tb"))


def test_diagnose_command_prints_and_writes_png(trained, tiny, tmp_path):
  wd, _ = trained
  out = str(tmp_path / "diag")
  r = _run("diagnose", "--workdir", wd, "--data", tiny, "--split", "val", "--rows", "3",
           "--out", out)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "yaw err" in r.stdout and "convex" in r.stdout and "MAD" in r.stdout
  with open(out + ".json") as fh:
    res = json.load(fh)
  assert res["n"] == 8 and res["step"] == 2 and res["depth_sign_gt"] == 1.0
  from PIL import Image
  im = Image.open(out + ".png")
  # 3 rows x 9 columns of 16 px tiles with 1 px gaps, scaled x3.
  assert im.size == (3 * (9 * S + 8), 3 * (3 * S + 2))


def test_diagnose_without_sidecar_is_one_line(trained, tiny, tmp_path):
  wd, _ = trained
  import shutil
  old = str(tmp_path / "old")  # exported before sidecars: they are added on use
  shutil.copytree(tiny, old)
  os.remove(os.path.join(old, "test", data.GT_FILE))
  r = _run("diagnose", "--workdir", wd, "--data", old, "--out", str(tmp_path / "d"))
  assert r.returncode == 0, r.stderr[-2000:]
  assert os.path.exists(os.path.join(old, "test", data.GT_FILE))
  bare = str(tmp_path / "bare")  # not ours (no meta.json): no ground truth
  shutil.copytree(tiny, bare)
  os.remove(os.path.join(bare, "test", data.GT_FILE))
  os.remove(os.path.join(bare, "meta.json"))
  r = _run("diagnose", "--workdir", wd, "--data", bare)
  assert r.returncode == 2
  assert r.stderr.strip().startswith("error:") and "sidecar" in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------
# Template baseline
# ----------------------------------------------------------------------------

def test_template_of_a_samples_own_canonical_depth_is_its_gt():
  cam = data.GenConfig().camera(32)
  g = data.generate_split(3, 32, seed=5, split="test", with_canonical=True)
  for i in range(3):  # a "train split" of that one sample: the mean is its depth
    pred, valid = evaluator.template_depth_baseline(g["canon_depth"][i], g["views"][i:i + 1], cam)
    r = metrics.evaluate_depth(jnp.asarray(pred), jnp.asarray(valid),
                               jnp.asarray(g["depth"][i:i + 1]), cam)
    assert float(r["n_pixels"][0]) > 200
    assert float(r["mad"][0]) < 0.05 and float(r["side"][0]) < 1e-3
  # Someone else's face in the same view is clearly worse.
  pred, valid = evaluator.template_depth_baseline(g["canon_depth"][1], g["views"][:1], cam)
  r = metrics.evaluate_depth(jnp.asarray(pred), jnp.asarray(valid), jnp.asarray(g["depth"][:1]), cam)
  assert float(r["mad"][0]) > 1.0


def test_template_beats_average_gt_with_varied_poses():
  cam = data.GenConfig().camera(32)
  gen = data.get_variant("wide_pose").gen
  trn = data.generate_split(48, 32, seed=1, split="train", cfg=gen, with_canonical=True)
  tst = data.generate_split(16, 32, seed=1, split="test", cfg=gen)
  base = evaluator.baseline_summaries(tst["depth"], trn["depth"], cam, batch=16,
                                    test_views_Nx6=tst["views"],
                                    train_canon_depth_MxHxW=trn["canon_depth"])
  assert set(base) == {"constant null depth", "average GT depth", metrics.TEMPLATE}
  assert base[metrics.TEMPLATE]["n"] == 16
  assert base[metrics.TEMPLATE]["mad_mean"] < 0.8 * base["average GT depth"]["mad_mean"]
  # Without the sidecar arguments: only the two classic rows.
  assert set(evaluator.baseline_summaries(tst["depth"], trn["depth"], cam, batch=16)) == {
      "constant null depth", "average GT depth"}


def test_eval_prints_the_three_baselines(trained, tiny):
  wd, _ = trained
  r = _run("eval", "--workdir", wd, "--data", tiny, "--split", "test")
  assert r.returncode == 0, r.stderr[-2000:]
  res = json.loads(r.stdout)
  assert set(res["baselines"]) == {"constant null depth", "average GT depth", metrics.TEMPLATE}
  assert res["baselines"][metrics.TEMPLATE]["n"] == 8
  assert f"baseline {metrics.TEMPLATE}" in r.stderr


# ----------------------------------------------------------------------------
# Robustness benchmark, end to end
# ----------------------------------------------------------------------------

def test_bench_quality_end_to_end_and_resumable(tmp_path):
  bench = [sys.executable, os.path.join(ROOT, "experiments", "bench_quality.py"),
           "--preset", "test_tiny", "--steps", "2", "--seeds", "0,1",
           "--variants", "default,hires64", "--counts", "16,8,8",
           "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "bench")]
  r = subprocess.run(bench + ["--jobs", "2"], capture_output=True, text=True, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-3000:]
  out = tmp_path / "bench"
  # hires64: stored at 64 px, trained and evaluated at the preset's 16 px.
  with open(tmp_path / "data" / "builtin_hires64_s64_seed0" / "meta.json") as fh:
    assert json.load(fh)["size"] == 64
  for v in ("default", "hires64"):
    for s in (0, 1):
      with open(out / f"{v}_s{s}" / "result.json") as fh:
        res = json.load(fh)
      assert res["steps"] == 2 and res["n_test"] == 8 and res["status"] == "done"
      assert 0 <= res["depth_sign"] <= 1 and np.isfinite(res["mad"])
      assert -1 <= res["view_yaw_corr"] <= 1
  with open(out / "table.csv") as fh:
    rows = list(csv.reader(fh))
  head = rows[0]
  assert "template MAD" in head and "yaw corr" in head and "convex" in head
  labels = [(r[0], r[1]) for r in rows[1:]]
  assert labels == [("default", "0"), ("default", "1"), ("default", "median"),
                    ("default", "worst"), ("hires64", "0"), ("hires64", "1"),
                    ("hires64", "median"), ("hires64", "worst")]
  mad = head.index("MAD deg")
  d0, d1, med, worst = (float(rows[i][mad]) for i in (1, 2, 3, 4))
  assert med == pytest.approx((d0 + d1) / 2) and worst == max(d0, d1)
  assert float(rows[1][head.index("template MAD")]) < float(rows[1][head.index("avg-GT MAD")])
  assert "| default | 0 |" in r.stdout and "Goals (issue 20" in r.stdout
  assert "shape corr" in head and "MAD / template" in head
  # Rerun: nothing to train. A run without its result (interrupted after
  # training) resumes from its checkpoint and is only evaluated.
  os.remove(out / "default_s1" / "result.json")
  r2 = subprocess.run(bench, capture_output=True, text=True, cwd=ROOT)
  assert r2.returncode == 0, r2.stderr[-3000:]
  assert "3 of 4 runs done, 1 to go" in r2.stderr
  with open(out / "default_s1" / "log.txt") as fh:
    assert "already at step 2" in fh.read()  # the checkpoint is reused, not retrained
  with open(out / "default_s1" / "result.json") as fh:
    assert json.load(fh)["steps"] == 2
  # Other settings in the same folder are refused (one line).
  r3 = subprocess.run(bench + ["--set", "lr=1e-3"], capture_output=True, text=True, cwd=ROOT)
  assert r3.returncode == 2 and r3.stderr.startswith("error:") and "other settings" in r3.stderr
  # One variant's own seeds (--seeds-of): the table and what is missing follow each list.
  r4 = subprocess.run(bench + ["--seeds", "0", "--seeds-of", "hires64=0,1,2", "--report"],
                      capture_output=True, text=True, cwd=ROOT)
  assert r4.returncode == 0, r4.stderr[-3000:]
  assert "| hires64 | 1 |" in r4.stdout and "| default | 1 |" not in r4.stdout
  assert "Not finished yet: hires64_s2\n" in r4.stdout
  r5 = subprocess.run(bench + ["--seeds-of", "cat=0", "--report"], capture_output=True,
                      text=True, cwd=ROOT)
  assert r5.returncode == 2 and r5.stderr.startswith("error: --seeds-of 'cat=0'")


def test_tfds_carries_the_sidecar(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  builder = data.build_tfds(str(tmp_path), size=S, n_train=3, n_val=1, n_test=2, seed=2)
  got = data.load_tfds(builder, "test")
  ref = data.generate_split(2, S, seed=2, split="test", with_canonical=True)
  np.testing.assert_array_equal(got["gt"]["view"], ref["views"])
  np.testing.assert_allclose(got["gt"]["canon_depth"], ref["canon_depth"], atol=2e-6)
  assert "gt" in data.load_tfds(str(tmp_path), "train")


def test_bench_table_median_worst_and_goals(tmp_path):
  from experiments import bench_quality as B
  out = str(tmp_path)
  B._write_json(os.path.join(out, "baselines_v.json"), {
      "constant null depth": dict(mad=40.0, side=1.3), "average GT depth": dict(mad=20.0, side=1.8),
      "template depth, true view": dict(mad=9.0, side=0.4)})
  runs = {0: dict(mad=8.0, depth_sign=1.0, view_yaw_corr=0.99),
          1: dict(mad=10.0, depth_sign=0.9, view_yaw_corr=0.97),
          2: dict(mad=30.0, depth_sign=0.2, view_yaw_corr=-0.5)}  # a failed run
  for s, r in runs.items():
    os.makedirs(os.path.join(out, f"v_s{s}"))
    B._write_json(os.path.join(out, f"v_s{s}", "result.json"),
                  dict(r, variant="v", seed=s, side=1.0, status="done"))
  text, rows = B.table(out, ["v"], {"v": [0, 1, 2, 3]})
  head = rows[0]
  med = next(r for r in rows if r[1] == "median")
  worst = next(r for r in rows if r[1] == "worst")
  assert med[head.index("MAD deg")] == 10.0 and worst[head.index("MAD deg")] == 30.0
  assert worst[head.index("yaw corr")] == -0.5 and worst[head.index("convex")] == 0.2
  assert med[head.index("MAD / avg-GT")] == pytest.approx(0.5)
  assert "no failed run NO (2/3)" in text
  assert "median MAD / avg-GT 0.50 <= 0.50 yes" in text
  assert "median MAD < template NO (1.11x)" in text  # 10 > 9
  assert med[head.index("MAD / template")] == pytest.approx(10 / 9)
  assert "shape corr" not in text.split("Goals")[1]  # no run reported it
  assert "Not finished yet: v_s3" in text
  # A run whose yaw correlation is below 0.9 fails even with a good MAD.
  B._write_json(os.path.join(out, "v_s1", "result.json"),
                dict(runs[1], view_yaw_corr=0.85, shape_corr=0.6, variant="v", seed=1,
                     side=1.0, status="done"))
  text, _ = B.table(out, ["v"], {"v": [0, 1]})
  assert "no failed run NO (1/2)" in text and "median shape corr 0.60 >= 0.5 yes" in text
  assert "[failed: s1 weak yaw]" in text
  # The fault column names the kind (a black render first: it also leaves the view constant).
  B._write_json(os.path.join(out, "v_s1", "result.json"),
                dict(runs[1], light_intensity=0.01, view_yaw_std_ratio=0.0, view_yaw_corr=0.0,
                     variant="v", seed=1, side=1.0, status="done"))
  text, rows = B.table(out, ["v"], {"v": [0, 1, 2]})
  head = rows[0]
  kinds = {r[1]: r[head.index("fault")] for r in rows[1:]}
  assert kinds == {0: "", 1: "black render", 2: "concave", "median": "", "worst": ""}
  assert "[failed: s1 black render, s2 concave]" in text


def test_view_stats_pose_matrix_names_what_each_output_tracks():
  rng = np.random.default_rng(0)
  true = rng.normal(size=(200, 6))
  true[:, 5] = 0.0
  pred = np.zeros_like(true)
  pred[:, 1] = 0.5 * true[:, 1]  # yaw at half scale
  pred[:, 3] = true[:, 1]  # the x shift tracks the true yaw
  text = view_stats.pose_matrix(pred, true)
  rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]]
          for r in text.splitlines() if r.startswith("| ") and "predicted" not in r}
  assert rows["yaw"][1] == "+1.00" and rows["x shift"][1] == "+1.00"
  assert rows["pitch"] == ["-"] * 5  # a constant output: no correlation to report
  assert "predicted yaw = 0.50 x true yaw" in text


def _discs(yaw_N, shift_per_rad, size=32):
  """Grey discs on a black ground whose centre column moves
  shift_per_rad half-widths per radian of yaw."""
  t = np.linspace(-1, 1, size)
  u, v = np.meshgrid(t, t)
  cx = shift_per_rad * np.asarray(yaw_N)[:, None, None]
  disc = ((u[None] - cx) ** 2 + v[None] ** 2) < 0.4 ** 2
  return np.repeat(disc[..., None], 3, axis=-1).astype(np.float32) * 0.7


@pytest.mark.parametrize("k", [0.3, -0.12])
def test_silhouette_parallax_reads_the_outline_shift_and_its_sign(k):
  yaw = np.linspace(-0.7, 0.7, 41)
  par = D.silhouette_parallax(_discs(yaw, k), yaw)
  assert par["corr"] == pytest.approx(np.sign(k), abs=0.02)
  assert par["slope"] == pytest.approx(k, rel=0.1)  # pixel quantisation
  # uint8 images give the same answer
  par8 = D.silhouette_parallax((_discs(yaw, k) * 255).astype(np.uint8), yaw)
  assert par8["slope"] == pytest.approx(par["slope"], abs=1e-6)


def test_silhouette_parallax_rejects_mismatched_inputs():
  with pytest.raises(ValueError, match="N yaws"):
    D.silhouette_parallax(_discs(np.zeros(4), 0.1), np.zeros(3))


def test_view_stats_parallax_cli(tiny):
  out = subprocess.run(RUN[:1] + [os.path.join(ROOT, "experiments", "view_stats.py"),
                                  "--parallax", "--data", tiny],
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert "half-widths per radian of yaw" in out.stdout
  bad = subprocess.run(RUN[:1] + [os.path.join(ROOT, "experiments", "view_stats.py"),
                                  "--parallax", "--data", tiny, "some_workdir"],
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and "give no workdirs" in bad.stderr
