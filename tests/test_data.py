"""Tests of scr_jax.data (generator, synface folders, loaders) and the TFDS builder.

Tiny sizes (16x16, a handful of samples); every render shares one compiled
function (same camera, same chunk size).
"""
import dataclasses
import io
import json
import os

import numpy as np
from PIL import Image
import pytest

from scr_jax import data
from scr_jax.errors import UserError

S = 16


@pytest.fixture(scope="module")
def train5():
  return data.generate_split(5, S, seed=0, split="train", with_canonical=True)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("synface16"))
  data.export_synface(root, n_train=4, n_val=2, n_test=1, size=S, seed=3, verbose=False)
  return root


# ----------------------------------------------------------------------------
# Generator
# ----------------------------------------------------------------------------

def test_canonical_is_exactly_symmetric_by_default(train5):
  for key in ("canon_depth", "canon_albedo", "canon_mask"):
    x = train5[key]
    np.testing.assert_array_equal(x, x[:, :, ::-1], err_msg=key)


def test_asymmetry_knob_bounds_the_flip_difference():
  cfg = dataclasses.replace(data.GenConfig(), asymmetry=0.5)
  p = data.sample_params(data.sample_rng(0, "train", 1), cfg)
  depth, albedo, _ = data.canonical_face(p, S, cfg)
  d_err = np.abs(depth - depth[:, ::-1]).max()
  a_err = np.abs(albedo - albedo[:, ::-1]).max()
  assert 0 < d_err <= 2 * 0.01 * 0.5 + 1e-6
  assert 0 < a_err <= 2 * 0.15 * 0.5 + 1e-6


def test_depth_and_image_ranges(train5):
  cfg = data.GenConfig()
  cd, cm = train5["canon_depth"], train5["canon_mask"]
  assert cd.min() >= cfg.min_depth and cd.max() <= cfg.max_depth
  # Realistic relief: the nearest point (nose) well in front of the outline.
  relief = np.array([d[m].max() - d[m].min() for d, m in zip(cd, cm)])
  assert np.all((relief > 0.05) & (relief < 0.2)), relief
  depth, mask, img = train5["depth"], train5["mask"], train5["images"]
  assert depth.dtype == np.float32 and img.dtype == np.uint8
  assert img.shape == (5, S, S, 3) and depth.shape == (5, S, S)
  assert np.all(depth[~mask] == cfg.max_depth)
  assert depth[mask].min() >= cfg.min_depth and depth[mask].max() < cfg.max_depth
  assert np.all(img[~mask] == 0)  # black background
  assert np.all(mask.mean(axis=(1, 2)) > 0.3)  # the face fills much of the frame


def test_view_ranges_respected():
  cfg = data.GenConfig()
  views = np.stack([data.sample_params(data.sample_rng(1, "train", i), cfg)["view"]
                    for i in range(300)])
  deg = np.rad2deg(views[:, :3])
  assert np.abs(deg[:, 1]).max() <= 40 and np.abs(deg[:, 1]).max() > 35
  assert np.abs(deg[:, 0]).max() <= 5 and np.abs(deg[:, 2]).max() <= 3
  assert np.all(views[:, 3:] == 0)  # no translation by default
  narrow = dataclasses.replace(cfg, max_yaw_deg=10.0)
  yaws = [data.sample_params(data.sample_rng(1, "train", i), narrow)["view"][1]
          for i in range(100)]
  assert np.abs(np.rad2deg(yaws)).max() <= 10


def test_determinism_per_seed(train5):
  again = data.generate_split(5, S, seed=0, split="train")
  for key in ("images", "depth", "views", "lights"):
    np.testing.assert_array_equal(again[key], train5[key], err_msg=key)
  other = data.generate_split(5, S, seed=1, split="train")
  assert not np.array_equal(other["images"], train5["images"])
  assert not np.array_equal(other["depth"], train5["depth"])


def test_splits_sizes_and_independence(train5):
  splits = data.generate_splits(S, n_train=3, n_val=2, n_test=1, seed=0)
  assert [len(splits[s]["names"]) for s in data.SPLITS] == [3, 2, 1]
  assert splits["train"]["names"] == ["000000", "000001", "000002"]
  # A sample depends on (seed, split, index) only: not on any split's size.
  np.testing.assert_array_equal(splits["train"]["images"], train5["images"][:3])
  val4 = data.generate_split(4, S, seed=0, split="val")
  np.testing.assert_array_equal(splits["val"]["depth"], val4["depth"][:2])
  assert not np.array_equal(splits["val"]["depth"], train5["depth"][:2])
  assert not np.array_equal(splits["test"]["depth"][0], splits["val"]["depth"][0])
  # Generating from an offset gives the same samples.
  tail = data.generate_split(2, S, seed=0, split="train", start=3)
  np.testing.assert_array_equal(tail["images"], train5["images"][3:])
  assert tail["names"] == ["000003", "000004"]


def test_preview_grid(tmp_path, train5):
  path = data.preview_grid(train5["images"][:3], train5["depth"][:3], str(tmp_path / "p.png"))
  with Image.open(path) as im:
    assert im.size == (3 * 64, 2 * 64)  # 16 px tiles upscaled x4


# ----------------------------------------------------------------------------
# Synface folders
# ----------------------------------------------------------------------------

def test_export_import_round_trip_16bit(exported):
  with open(os.path.join(exported, "meta.json")) as f:
    meta = json.load(f)
  assert meta["size"] == S and meta["seed"] == 3 and meta["depth_bits"] == 16
  assert meta["counts"] == dict(train=4, val=2, test=1)
  gen = data.generate_split(2, S, seed=3, split="val")
  got = data.load_synface(exported, "val", image_size=S)
  assert got["names"] == ["000000", "000001"]
  assert got["images"].dtype == np.float32 and got["depth"].dtype == np.float32
  np.testing.assert_array_equal(np.round(got["images"] * 255).astype(np.uint8), gen["images"])
  assert np.abs(got["depth"] - gen["depth"]).max() < 1e-4
  with Image.open(os.path.join(exported, "val", "depth", "000000_depth.png")) as im:
    assert im.mode.startswith("I")  # 16-bit grayscale


def test_export_import_round_trip_8bit(tmp_path, capsys):
  root = str(tmp_path / "d8")
  data.export_synface(root, n_train=2, n_val=0, n_test=0, size=S, seed=3, depth_bits=8)
  assert "[export] train: 2 samples" in capsys.readouterr().out
  with Image.open(os.path.join(root, "train", "depth", "000001_depth.png")) as im:
    assert im.mode == "RGB"  # like Unsup3D's files
  gen = data.generate_split(2, S, seed=3, split="train")
  got = data.load_synface(root, "train", image_size=S)
  step = 0.2 / 255
  assert np.abs(got["depth"] - gen["depth"]).max() <= step / 2 + 1e-6


def test_depth_png_mapping():
  z = np.array([0.9, 1.0, 1.1])
  np.testing.assert_allclose(data.depth_to_png_value(z), [1.0, 0.5, 0.0], atol=1e-9)
  np.testing.assert_allclose(data.png_value_to_depth([1.0, 0.5, 0.0]), z, atol=1e-6)


def test_crop_and_resize(exported):
  got = data.load_synface(exported, "train", image_size=8, crop=12)
  assert got["images"].shape == (4, 8, 8, 3) and got["depth"].shape == (4, 8, 8)
  assert got["depth"].min() >= 0.9 - 1e-6 and got["depth"].max() <= 1.1 + 1e-6
  imgs = data.load_image_folder(os.path.join(exported, "train", "image"), 10, crop=14)
  assert imgs["images"].shape == (4, 10, 10, 3)
  assert imgs["names"][0] == "000000_image"
  assert 0.0 <= imgs["images"].min() and imgs["images"].max() <= 1.0


def test_image_folder_modes(tmp_path):
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (20, 24), np.uint8)).save(tmp_path / "a.png")
  Image.fromarray(rng.integers(0, 255, (20, 20, 4), np.uint8)).save(tmp_path / "b.PNG")
  Image.fromarray(rng.integers(0, 255, (30, 30, 3), np.uint8)).save(tmp_path / "c.jpg")
  (tmp_path / "notes.txt").write_text("ignored")
  got = data.load_image_folder(str(tmp_path), 8)
  assert got["names"] == ["a", "b", "c"]
  assert got["images"].shape == (3, 8, 8, 3)
  gray = got["images"][0]
  np.testing.assert_array_equal(gray[..., 0], gray[..., 2])  # gray -> RGB
  one = data.load_image_folder([str(tmp_path / "c.jpg")], None)
  assert one["images"].shape == (1, 30, 30, 3)


# ----------------------------------------------------------------------------
# Bad inputs: one UserError line naming the offending file
# ----------------------------------------------------------------------------

def _png_bytes(shape=(S, S, 3)):
  buf = io.BytesIO()
  Image.fromarray(np.full(shape, 128, np.uint8)).save(buf, format="png")
  return buf.getvalue()


def _tiny_synface(root):
  for sub in ("image", "depth"):
    os.makedirs(os.path.join(root, "train", sub), exist_ok=True)
  for name in ("000000", "000001"):
    with open(os.path.join(root, "train", "image", f"{name}_image.png"), "wb") as f:
      f.write(_png_bytes())
    with open(os.path.join(root, "train", "depth", f"{name}_depth.png"), "wb") as f:
      f.write(_png_bytes())
  return root


def _write(path, content):
  with open(path, "wb") as f:
    f.write(content)
  return path


def _case_missing_dir(root):
  return os.path.join(root, "nope"), dict(split="train"), "nope"


def _case_missing_split(root):
  return root, dict(split="val"), os.path.join("val", "image")


def _case_empty(root):
  for f in os.listdir(os.path.join(root, "train", "image")):
    os.remove(os.path.join(root, "train", "image", f))
  for f in os.listdir(os.path.join(root, "train", "depth")):
    os.remove(os.path.join(root, "train", "depth", f))
  return root, dict(split="train"), os.path.join("train", "image")


def _case_image_without_depth(root):
  p = _write(os.path.join(root, "train", "image", "000007_image.png"), _png_bytes())
  return root, dict(split="train"), p


def _case_depth_without_image(root):
  p = _write(os.path.join(root, "train", "depth", "000009_depth.png"), _png_bytes())
  return root, dict(split="train"), p


def _case_zero_byte(root):
  p = _write(os.path.join(root, "train", "image", "000001_image.png"), b"")
  return root, dict(split="train"), p


def _case_corrupt(root):
  p = _write(os.path.join(root, "train", "depth", "000001_depth.png"), b"\x89PNG garbage" * 9)
  return root, dict(split="train"), p


def _case_not_an_image(root):
  p = _write(os.path.join(root, "train", "image", "000000_image.png"), b"hello, I am text\n")
  return root, dict(split="train"), p


def _case_truncated(root):
  raw = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
  buf = io.BytesIO()
  raw.save(buf, format="png")
  p = _write(os.path.join(root, "train", "image", "000001_image.png"), buf.getvalue()[:400])
  # Its twin must match in size to reach the decode of the truncated file.
  _write(os.path.join(root, "train", "depth", "000001_depth.png"), _png_bytes((64, 64, 3)))
  return root, dict(split="train"), p


def _case_size_mismatch(root):
  p = _write(os.path.join(root, "train", "depth", "000001_depth.png"), _png_bytes((12, 12, 3)))
  return root, dict(split="train"), p


def _case_crop_too_large(root):
  p = os.path.join(root, "train", "image", "000000_image.png")
  return root, dict(split="train", crop=S + 1), p


@pytest.mark.parametrize("case", [
    _case_missing_dir, _case_missing_split, _case_empty, _case_image_without_depth,
    _case_depth_without_image, _case_zero_byte, _case_corrupt, _case_not_an_image,
    _case_truncated, _case_size_mismatch, _case_crop_too_large])
def test_bad_synface_inputs_raise_user_error(tmp_path, case):
  root = _tiny_synface(str(tmp_path / "sf"))
  path, kwargs, culprit = case(root)
  with pytest.raises(UserError) as err:
    data.load_synface(path, image_size=S, **kwargs)
  msg = str(err.value)
  assert culprit in msg, msg
  assert "\n" not in msg


def test_bad_image_folder_inputs_raise_user_error(tmp_path):
  with pytest.raises(UserError, match="not found"):
    data.load_image_folder(str(tmp_path / "missing"), S)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(UserError, match="no \\*.png"):
    data.load_image_folder(str(empty), S)
  bad = _write(str(tmp_path / "x.jpg"), b"\xff\xd8\xff garbage")
  with pytest.raises(UserError) as err:
    data.load_image_folder([bad], S)
  assert bad in str(err.value) and "\n" not in str(err.value)
  small = _write(str(tmp_path / "small.png"), _png_bytes((8, 8, 3)))
  with pytest.raises(UserError, match="crop 9 is larger"):
    data.load_image_folder([small], S, crop=9)


# ----------------------------------------------------------------------------
# TFDS (array_record, no TensorFlow)
# ----------------------------------------------------------------------------

def test_tfds_build_and_data_source_round_trip(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  pytest.importorskip("array_record")
  builder = data.build_tfds(str(tmp_path), size=S, n_train=3, n_val=1, n_test=1, seed=2)
  assert builder.name == "scr_synface"
  gen = data.generate_split(3, S, seed=2, split="train")
  got = data.load_tfds(builder, "train")
  assert got["names"] == gen["names"]
  np.testing.assert_array_equal(np.round(got["images"] * 255).astype(np.uint8), gen["images"])
  np.testing.assert_array_equal(got["depth"], gen["depth"])
  # Reopened from the folder alone (no generator code needed), then resized.
  again = data.load_tfds(str(tmp_path), "test", image_size=8)
  assert again["images"].shape == (1, 8, 8, 3) and again["depth"].shape == (1, 8, 8)
  with pytest.raises(UserError, match="no split"):
    data.load_tfds(builder, "holdout")


def test_export_refuses_to_mix_with_old_files(exported):
  with pytest.raises(UserError, match="overwrite=True"):
    data.export_synface(exported, n_train=1, n_val=0, n_test=0, size=S, verbose=False)


def test_export_overwrite_replaces_old_files(tmp_path):
  root = str(tmp_path / "ow")
  data.export_synface(root, n_train=3, n_val=0, n_test=0, size=S, verbose=False)
  data.export_synface(root, n_train=1, n_val=0, n_test=0, size=S, verbose=False,
                      overwrite=True)
  assert data.load_synface(root, "train", S)["names"] == ["000000"]


# ----------------------------------------------------------------------------
# The one image reader (train, eval, predict): EXIF, transparency, formats,
# depth PNGs; folder listing (nested layouts, skipped files named)
# ----------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# User-report inputs (issue 12), beside the repository as ../shared; tests that
# need them are skipped where they are absent.
from conftest import user_case as _case  # noqa: E402


def _asym_rgb(h=6, w=10):
  """An image that no flip or rotation maps onto itself."""
  return (np.arange(h * w * 3).reshape(h, w, 3) * 7 % 251).astype(np.uint8)


# What each EXIF orientation asks the viewer to do to the stored pixels.
_UPRIGHT = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1],
            4: lambda a: a[::-1], 5: lambda a: np.transpose(a, (1, 0, 2)),
            6: lambda a: np.rot90(a, -1), 7: lambda a: np.transpose(a, (1, 0, 2))[::-1, ::-1],
            8: lambda a: np.rot90(a, 1)}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_read_image_applies_exif_orientation(tmp_path, orientation):
  stored = _asym_rgb()
  exif = Image.Exif()
  exif[0x0112] = orientation
  path = str(tmp_path / f"o{orientation}.png")
  Image.fromarray(stored).save(path, exif=exif)
  notes = {}
  got = data.read_image(path, notes)
  np.testing.assert_array_equal(np.round(got * 255).astype(np.uint8),
                                _UPRIGHT[orientation](stored))
  assert bool(notes) == (orientation != 1)


def test_exif_rotated_phone_photo_matches_the_upright_reference():
  root = _case("exif-rotated")
  got = data.read_image(os.path.join(root, "phone.jpg"))
  want = data.read_image(os.path.join(root, "expected_upright.png"))
  assert got.shape == want.shape
  err = np.abs(got - want).mean()
  assert err < 0.01, err  # JPEG vs PNG of the same picture
  assert np.abs(got[::-1, ::-1] - want).mean() > 10 * err  # the turn is not a no-op
  # The loaders use the same reader: the photo comes out upright there too.
  loaded = data.load_image_folder([os.path.join(root, "phone.jpg")], None)
  np.testing.assert_array_equal(loaded["images"][0], data.crop_resize(got, None))


def test_training_background_is_the_generators(train5):
  bg = np.round(np.asarray(data.TRAIN_BACKGROUND_RGB) * 255).astype(np.uint8)
  img, mask = train5["images"], train5["mask"]
  assert (~mask).any()
  assert np.all(img[~mask] == bg)


def test_transparency_is_composited_on_the_training_background(tmp_path, capfd):
  bg = np.asarray(data.TRAIN_BACKGROUND_RGB, np.float32)
  rgb = np.array([200, 40, 90], np.uint8)
  alpha = np.array([[0, 128, 255]], np.uint8)
  rgba = np.concatenate([np.broadcast_to(rgb, (1, 3, 3)), alpha[..., None]], -1)
  Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
  a = alpha[0, :, None] / 255.0
  want = rgb / 255.0 * a + bg * (1 - a)
  got = data.read_image(str(tmp_path / "rgba.png"))[0]
  np.testing.assert_allclose(got, want, atol=1e-6)
  # Gray + alpha, and a palette image whose entry 1 is transparent.
  la = np.stack([np.full((1, 3), 100, np.uint8), alpha], -1)
  Image.fromarray(la, "LA").save(tmp_path / "la.png")
  got = data.read_image(str(tmp_path / "la.png"))[0]
  np.testing.assert_allclose(got, (100 / 255.0 * a + bg * (1 - a)), atol=1e-6)
  pal = Image.fromarray(np.array([[0, 1, 0]], np.uint8), "P")
  pal.putpalette([10, 20, 30, 250, 250, 250] + [0] * 762)
  pal.save(tmp_path / "p.png", transparency=1)
  got = data.read_image(str(tmp_path / "p.png"))[0]
  np.testing.assert_allclose(got[1], bg, atol=1e-6)  # not the white under it
  np.testing.assert_allclose(got[0], np.array([10, 20, 30]) / 255.0, atol=1e-6)
  # The loaders name the composited files.
  capfd.readouterr()
  data.load_image_folder(str(tmp_path), None)
  err = capfd.readouterr().err
  for name, mode in (("la", "LA"), ("p", "P"), ("rgba", "RGBA")):
    assert f"{name}.png: mode {mode}, transparent pixels composited" in err, err


def test_every_format_pillow_reads_is_listed_and_read(tmp_path):
  exts = data.image_extensions()
  for e in (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".tga"):
    assert e in exts, e
  assert ".h5" not in exts and ".mpeg" not in exts  # identify-only / not pictures
  img = _asym_rgb(8, 8)
  Image.fromarray(img).save(tmp_path / "a.webp", lossless=True)
  for ext in ("bmp", "tiff", "ppm", "tga"):
    Image.fromarray(img).save(tmp_path / f"{ext}_img.{ext}")
  (tmp_path / "notes.json").write_text("{}")
  got = data.load_image_folder(str(tmp_path), None)
  assert got["names"] == ["a", "bmp_img", "ppm_img", "tga_img", "tiff_img"]
  for x in got["images"]:  # all lossless: the same pixels from each format
    np.testing.assert_array_equal(np.round(x * 255).astype(np.uint8), img)


def _depth_folder(root, depth_png):
  for sub in ("image", "depth"):
    os.makedirs(os.path.join(root, "test", sub), exist_ok=True)
  Image.fromarray(np.zeros((S, S, 3), np.uint8)).save(
      os.path.join(root, "test", "image", "000000_image.png"))
  depth_png.save(os.path.join(root, "test", "depth", "000000_depth.png"))
  return root


def test_colour_mapped_depth_is_refused_gray_rgb_and_16bit_are_read(tmp_path):
  import matplotlib
  v = np.linspace(0, 1, S * S).reshape(S, S)
  cmap = (matplotlib.colormaps["viridis"](v)[..., :3] * 255).round().astype(np.uint8)
  root = _depth_folder(str(tmp_path / "cm"), Image.fromarray(cmap))
  with pytest.raises(UserError) as err:
    data.load_synface(root, "test", None)
  msg = str(err.value)
  assert "000000_depth.png" in msg and "colour-mapped" in msg and "grayscale" in msg
  assert "R = G = B" in msg and "\n" not in msg
  # RGB with equal channels (Unsup3D's own files) is channel 0.
  q = np.round(v * 255).astype(np.uint8)
  root = _depth_folder(str(tmp_path / "gray_rgb"), Image.fromarray(np.repeat(q[..., None], 3, -1)))
  np.testing.assert_allclose(data.load_synface(root, "test", None)["depth"][0],
                             data.png_value_to_depth(q / 255.0), atol=1e-6)
  # 16-bit keeps its precision: every level maps to its own depth.
  k = np.arange(S * S, dtype=np.uint16).reshape(S, S) * 37 + 1000
  root = _depth_folder(str(tmp_path / "d16"), Image.fromarray(k))
  z = data.load_synface(root, "test", None)["depth"][0]
  np.testing.assert_allclose(z, 1.1 - 0.2 * k / 65535.0, atol=2e-7)
  assert len(np.unique(z)) == S * S  # 37 levels apart = 1.1e-4 apart: none merged


def test_16bit_rgb_depth_keeps_its_precision(tmp_path):
  cv2 = pytest.importorskip("cv2")
  k = np.arange(S * S, dtype=np.uint16).reshape(S, S) * 37 + 1000
  root = str(tmp_path / "rgb16")
  _depth_folder(root, Image.fromarray(np.zeros((S, S), np.uint8)))
  path = os.path.join(root, "test", "depth", "000000_depth.png")
  cv2.imwrite(path, np.repeat(k[..., None], 3, -1))  # 48-bit PNG: Pillow would give 8 bits
  with Image.open(path) as im:
    assert im.mode == "RGB"
  z = data.load_synface(root, "test", None)["depth"][0]
  np.testing.assert_allclose(z, 1.1 - 0.2 * k / 65535.0, atol=2e-7)
  unequal = np.stack([k, k, k + 1], -1)
  cv2.imwrite(path, unequal)
  with pytest.raises(UserError, match="colour-mapped depth \\(16-bit"):
    data.load_synface(root, "test", None)


def test_colour_mapped_depth_case_refused_16bit_case_read():
  root = _case("colour-mapped-depth")
  with pytest.raises(UserError, match="colour-mapped"):
    data.load_synface(os.path.join(root, "syn_colormap"), "test", 32)
  ok = data.load_synface(os.path.join(root, "syn16bit"), "test", 32)
  with Image.open(os.path.join(root, "syn16bit", "test", "depth", "000000_depth.png")) as im:
    raw = np.asarray(im, np.float64)
  np.testing.assert_allclose(ok["depth"][0], 1.1 - 0.2 * raw / 65535.0, atol=2e-7)
  # Its train split is 16-bit too and still loads (only the bad file is refused).
  assert data.load_synface(os.path.join(root, "syn_colormap"), "train", 32)["depth"].shape[0] == 4


def _cat_layout(root):
  rng = np.random.default_rng(1)
  for sub in ("CAT_00", "CAT_01"):
    os.makedirs(os.path.join(root, sub))
    for i in range(3):
      p = os.path.join(root, sub, f"{i:04d}.jpg")
      Image.fromarray(rng.integers(0, 255, (12, 10, 3), np.uint8)).save(p)
      with open(p + ".cat", "w") as fh:
        fh.write("9 1 1 2 2 3 3 4 4 5 5 6 6 7 7 8 8 9 9\n")
  Image.fromarray(rng.integers(0, 255, (12, 10, 3), np.uint8)).save(
      os.path.join(root, "stray.jpg"))
  os.makedirs(os.path.join(root, ".ipynb_checkpoints"))
  return root


def test_nested_folders_are_read_and_skips_are_named(tmp_path, capfd):
  root = _cat_layout(str(tmp_path / "cats"))
  capfd.readouterr()
  got = data.load_image_folder(root, 8)
  err = capfd.readouterr().err
  assert got["names"] == ["CAT_00/0000", "CAT_00/0001", "CAT_00/0002", "CAT_01/0000",
                          "CAT_01/0001", "CAT_01/0002", "stray"]
  assert got["images"].shape == (7, 8, 8, 3)
  np.testing.assert_array_equal(got["images"][3], data.crop_resize(
      data.read_image(os.path.join(root, "CAT_01", "0000.jpg")), 8))
  cat = os.path.join(root, "CAT_00", "0000.jpg.cat")
  assert f"note: {cat} and 5 more: not an image" in err, err
  assert os.path.join(root, ".ipynb_checkpoints") in err  # hidden folder: named too
  # Recursion off: the top level only, and the images left out are counted.
  flat = data.load_image_folder(root, 8, recursive=False)
  err = capfd.readouterr().err
  assert flat["names"] == ["stray"]
  first = os.path.join(root, "CAT_00", "0000.jpg")
  assert f"note: {first} and 5 more: image in a sub-folder, not read" in err, err


def test_linked_folders_are_read_once_and_excluded_folders_named(tmp_path):
  root = _cat_layout(str(tmp_path / "cats"))
  os.symlink(os.path.join(root, "CAT_00"), os.path.join(root, "CAT_link"))
  os.symlink(root, os.path.join(root, "CAT_00", "loop"))  # a cycle: must end
  notes = {}
  got = data.list_images(root, notes=notes, exclude=[os.path.join(root, "CAT_01")])
  assert [os.path.relpath(p, root) for p in got] == [
      "CAT_00/0000.jpg", "CAT_00/0001.jpg", "CAT_00/0002.jpg", "stray.jpg"]
  assert notes["the output folder, not read"] == [os.path.join(root, "CAT_01")]
  assert notes["a link to a folder already read, not read twice"] == [
      os.path.join(root, "CAT_00", "loop"), os.path.join(root, "CAT_link")]


def test_nested_cat_folders_case():
  root = os.path.join(_case("nested-cat-folders"), "cats")
  got = data.load_image_folder(root, 16)
  assert len(got["names"]) == 7 and "CAT_01/0002" in got["names"]


def test_folder_errors_say_what_is_wrong(tmp_path):
  f = _write(str(tmp_path / "one.png"), _png_bytes())
  with pytest.raises(UserError, match="is a file, not a folder"):
    data.load_image_folder(f, S)


def test_crop_box_resize_replicates_the_border():
  a = np.arange(16, dtype=np.float32).reshape(4, 4)
  got = data.crop_box_resize(a, -1, 2, 3, None)  # 1 column left of, 1 row below the image
  np.testing.assert_array_equal(got, [[8, 8, 9], [12, 12, 13], [12, 12, 13]])
  np.testing.assert_array_equal(data.crop_box_resize(a, 1, 1, 2, None), a[1:3, 1:3])
