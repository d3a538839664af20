"""experiments/probe_shape.py: the signal probe's losses on generated faces."""
import numpy as np

from experiments import probe_shape
from scr_jax import config, model, synthetic


def _faces(n=6, size=32):
  d = synthetic.generate_split(n, size, seed=3, split="test", with_canonical=True)
  return d, model.camera(config.get_config("cpu_small"))


def test_probe_shading_is_the_generators():
  d, cam = _faces()
  mine = d["canon_albedo"] * probe_shape._shading(d["canon_depth"], d["lights"], cam)[..., None]
  unclipped = mine <= 1.0
  np.testing.assert_allclose(mine[unclipped], d["canon_image"][unclipped], atol=1e-4)


def test_signal_rows_truth_zero_template_positive_refit_in_between():
  d, cam = _faces()
  tmpl = d["canon_depth"].mean(0)
  rows = probe_shape.signal_rows(d["canon_depth"], d["canon_albedo"], d["lights"],
                                 d["canon_mask"], d["views"], tmpl, d["depth"], cam)
  # the default generator's faces are symmetric: the truth (and its re-fit) cost nothing
  assert np.all(rows["truth (true albedo)"] < 1e-6)
  assert np.all(rows[probe_shape.REFIT_TRUTH] < 1e-3)
  # the template costs something, less once the albedo absorbs the symmetric part of it
  full, refit = rows["template, true albedo"], rows[probe_shape.REFIT]
  assert np.all(full > 1e-3)
  assert np.all(refit > 1e-4) and np.all(refit < full)
  assert np.all(rows[probe_shape.YAW] > 0)
  assert np.all(rows[probe_shape.LIGHT] > 1e-3)


def test_rotate_light_turns_the_direction_about_the_vertical_axis():
  light = np.array([[0.5, 0.5, 0.3, 0.0], [0.4, 0.6, -0.5, 0.0], [0.4, 0.6, -0.5, 0.4]])
  unit = lambda l: np.concatenate([l[:, 2:4], np.ones((len(l), 1))], 1) / np.linalg.norm(
      np.concatenate([l[:, 2:4], np.ones((len(l), 1))], 1), axis=1, keepdims=True)
  cos = np.sum(unit(light) * unit(probe_shape._rotate_light(light, 10.0)), 1)
  angle = np.rad2deg(np.arccos(np.clip(cos, -1, 1)))
  np.testing.assert_allclose(angle[:2], 10.0, atol=1e-5)  # in the horizontal plane: exactly
  assert 0 < angle[2] < 10.0  # tilted up: less, as the vertical component is kept
  np.testing.assert_allclose(probe_shape._rotate_light(light, 0.0), light)


def test_sign_rows_the_truths_own_depth_prefers_the_true_pose():
  """With each image's own canonical depth as the scaffold and the true light,
  the true pose renders the image (nearly) exactly and the mirrored one does not;
  a mirrored pose of a turned face is what `_mirrored` gives."""
  d, cam = _faces(n=8)
  imgs = d["images"].astype(np.float32) / 255.0
  rows = probe_shape.sign_rows(imgs, d["canon_albedo"], d["lights"], d["views"],
                               {"truth": d["canon_depth"]}, cam)
  frac, diff = rows[("truth", "true light")]
  assert frac > 0.5 and diff > 1e-3
  assert ("truth", "frontal light") in rows
  v = probe_shape._mirrored(d["views"])
  np.testing.assert_allclose(v[:, [1, 2, 3]], -d["views"][:, [1, 2, 3]])
  np.testing.assert_allclose(v[:, [0, 4, 5]], d["views"][:, [0, 4, 5]])
