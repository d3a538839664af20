"""`predict` on arbitrary photos (issue 12): inference preprocessing, face
detection, unreadable inputs, output names, and the exports (depth as
numbers and 16-bit PNG, albedo, light/view JSON, textured mesh, MP4).

One tiny model (preset test_tiny, 16 px, 1 step, trained with --set crop=24 on
32 px images) serves every test; refusals use a workdir that has a config but
no checkpoint, so an error about the input proves it came before any model
work."""
import json
import os
import shutil
import sys

import numpy as np
from PIL import Image
import pytest

from conftest import user_case as _case
from scr_jax import cli, data, detect, export
from scr_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S = 16


def _cli(capfd, *argv):
  """Runs run.py in-process; returns (exit code, stderr lines)."""
  capfd.readouterr()
  code, stderr = 0, sys.stderr
  try:
    cli.main(list(argv))
  except SystemExit as e:
    code = e.code
  finally:
    sys.stderr = stderr  # cliutil.fail silences stderr after its one line
  return code, [x for x in capfd.readouterr().err.splitlines() if x.strip()]


@pytest.fixture(scope="module")
def faces():
  return data.generate_split(4, 64, seed=0, split="test")["images"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, faces):
  root = tmp_path_factory.mktemp("predict")
  imgs = root / "train_imgs"
  imgs.mkdir()
  for i, im in enumerate(data.generate_split(8, 32, seed=1, split="train")["images"]):
    Image.fromarray(im).save(imgs / f"{i:03d}.png")
  wd = str(root / "wd")
  cli.main(["train", "--preset", "test_tiny", "--data", str(imgs), "--workdir", wd,
            "--steps", "1", "--set", "crop=24"])
  return wd


@pytest.fixture()
def no_ckpt(tmp_path, workdir):
  """A workdir with the trained run's settings and no checkpoint."""
  wd = tmp_path / "no_ckpt"
  wd.mkdir()
  for f in ("config.json", "adjacency.json"):
    shutil.copy(os.path.join(workdir, f), wd / f)
  return str(wd)


def _face_photo(face_64, h=240, w=320, at=(60, 150)):
  """A 128 px face pasted into a larger grey photo (top, left = at)."""
  big = np.asarray(Image.fromarray(face_64).resize((128, 128), Image.BILINEAR))
  photo = np.full((h, w, 3), 40, np.uint8)
  photo[at[0]:at[0] + 128, at[1]:at[1] + 128] = big
  return photo


# ----------------------------------------------------------------------------
# Output names (no CLI)
# ----------------------------------------------------------------------------

def test_unique_stems():
  assert export.unique_stems(["/x/a.png", "/x/b.jpg"]) == ["a", "b"]
  assert export.unique_stems(["/x/in/a.png", "/x/in/a.jpg", "/x/other/a.png"]) == [
      "in_a_png", "a_jpg", "other_a_png"]
  # Names that differ only in case clash on macOS / Windows: kept apart.
  assert export.unique_stems(["/x/A.png", "/x/a.png"]) == ["x_A_png", "x_a_png_2"]
  assert export.unique_stems(["/x/a.png", "/x/a.png"]) == ["x_a_png", "x_a_png_2"]


def test_face_crop_box_is_unsup3ds_rule():
  # side = 1.1 * mean(w, h) = 88; centre (140, 90 + 0.075 * 88 = 96.6)
  assert detect.face_crop_box((100, 50, 80, 80)) == (96, 53, 88)
  # side 44, centre (20, 20 + 3.3): reaches 2 px past the left edge
  assert detect.face_crop_box((0, 0, 40, 40)) == (-2, 1, 44)


def test_detector_finds_a_face_and_none_in_a_blank(faces):
  found = [detect.find_face(_face_photo(f)) for f in faces]
  hits = [f for f in found if f is not None]
  assert hits, "the human cascade fired on none of 4 generated faces"
  for f in hits:
    x, y, w, h = f["box"]
    assert f["kind"] == "human"
    # The face occupies rows 60..188, columns 150..278 of the photo.
    assert abs(x + w / 2 - 214) < 20 and abs(y + h / 2 - 124) < 25 and 80 < w < 160, f
    left, top, side = f["crop"]
    assert left <= 160 and left + side >= 268 and top <= 70 and top + side >= 178, f
  assert detect.find_face(np.full((120, 160, 3), 0.5)) is None


def test_cat_and_human_cascades_are_bundled():
  cv2 = pytest.importorskip("cv2")
  assert cv2.__version__.startswith("4."), cv2.__version__
  for _, name in detect.CASCADES:
    assert os.path.isfile(os.path.join(cv2.data.haarcascades, name))


# ----------------------------------------------------------------------------
# Refusals before any model work (the workdir has no checkpoint)
# ----------------------------------------------------------------------------

def test_first_bad_file_stops_with_one_line_before_the_model(tmp_path, capfd, no_ckpt):
  ins = tmp_path / "in"
  ins.mkdir()
  # (a picture: a flat one would be skipped too, as a degenerate input)
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(
      ins / "a_good.png")
  (ins / "b_bad.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
  (ins / "c_empty.png").write_bytes(b"")
  out = tmp_path / "out"
  code, err = _cli(capfd, "predict", "--workdir", no_ckpt, "--images", str(ins),
                   "--out", str(out))
  assert code == 2 and len(err) == 1, err
  assert err[0].startswith("error: ") and "b_bad.jpg" in err[0] and "not a readable" in err[0]
  assert not out.exists()
  # --skip-bad names each bad file, then goes on (here to the missing checkpoint).
  code, err = _cli(capfd, "predict", "--workdir", no_ckpt, "--images", str(ins),
                   "--out", str(out), "--skip-bad")
  joined = "\n".join(err)
  assert "note: skipped " + str(ins / "b_bad.jpg") in joined
  assert "note: skipped " + str(ins / "c_empty.png") in joined
  assert code == 2 and "no checkpoint" in err[-1], err


def test_explicit_crop_larger_than_a_small_face_is_refused_default_is_not(
    tmp_path, capfd, no_ckpt):
  small = tmp_path / "small_20.png"
  Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(small)
  out = str(tmp_path / "out")
  code, err = _cli(capfd, "predict", "--workdir", no_ckpt, "--images", str(small),
                   "--out", out, "--crop", "train")
  assert code == 2 and len(err) == 1 and "crop 24 is larger than the image (20x20)" in err[0]
  code, err = _cli(capfd, "predict", "--workdir", no_ckpt, "--images", str(small),
                   "--out", out)  # default: no crop; gets as far as the (missing) weights
  assert "no checkpoint" in err[-1], err
  assert any("centre-cropped to 24 px" in x and "--crop train" in x for x in err), err
  code, err = _cli(capfd, "predict", "--workdir", no_ckpt, "--images", str(small),
                   "--out", out, "--crop", "zero")
  assert code == 2 and "--crop takes none, train or a positive number" in err[-1]


def test_outputs_never_overwrite_an_input(tmp_path, capfd, no_ckpt):
  d = tmp_path / "photos"
  (d / "input").mkdir(parents=True)
  victim = d / "input" / "input.png"  # would be OUT/<stem 'input'>/input.png with --out photos
  Image.fromarray(np.full((20, 20, 3), 7, np.uint8)).save(victim)
  before = victim.read_bytes()
  code, err = _cli(capfd, "predict", "--workdir", no_ckpt, "--images", str(victim),
                   "--out", str(d))
  assert code == 2 and len(err) == 1 and "would overwrite this input file" in err[0], err
  assert victim.read_bytes() == before
  f = tmp_path / "a_file"
  f.write_text("x")
  code, err = _cli(capfd, "predict", "--workdir", no_ckpt, "--images", str(victim),
                   "--out", str(f))
  # checked by the CLI's output-path check before the command runs
  assert code == 2 and len(err) == 1 and "is a file, not a folder" in err[0], err


def test_outputs_inside_the_input_folder_are_not_read_back(tmp_path, capfd, no_ckpt):
  photos = tmp_path / "photos"
  (photos / "out" / "a").mkdir(parents=True)
  Image.fromarray(np.full((20, 20, 3), 7, np.uint8)).save(photos / "a.png")
  Image.fromarray(np.full((32, 32, 3), 9, np.uint8)).save(photos / "out" / "a" / "input.png")
  code, err = _cli(capfd, "predict", "--workdir", no_ckpt, "--images", str(photos),
                   "--out", str(photos / "out"))
  assert any(str(photos / "out") in x and "the output folder, not read" in x for x in err), err
  assert "no checkpoint" in err[-1]  # one input (a.png) got as far as the weights


def test_no_face_falls_back_with_a_note_or_is_skipped(tmp_path, capfd, no_ckpt):
  blank = tmp_path / "blank.png"
  Image.fromarray(np.full((40, 30, 3), 128, np.uint8)).save(blank)
  code, err = _cli(capfd, "predict", "--workdir", no_ckpt, "--images", str(blank),
                   "--out", str(tmp_path / "o"), "--detect-faces")
  assert any(str(blank) in x and "no human or cat face found, used the largest centred "
             "square" in x for x in err), err
  assert "no checkpoint" in err[-1]  # fell back and went on
  code, err = _cli(capfd, "predict", "--workdir", no_ckpt, "--images", str(blank),
                   "--out", str(tmp_path / "o"), "--detect-faces", "--skip-bad")
  assert code == 2 and "no readable input" in err[-1] and "no human or cat face" in err[-1]


def test_video_size_must_be_even(tmp_path, capfd, no_ckpt):
  from scr_jax import visualize
  with pytest.raises(UserError, match="even width and height, got 34x17"):
    visualize.save_mp4(str(tmp_path / "odd.mp4"), np.zeros((2, 17, 34, 3)))
  code, err = _cli(capfd, "predict", "--workdir", no_ckpt, "--images", str(tmp_path),
                   "--out", str(tmp_path / "o"), "--video-size", "17")
  assert code == 2 and len(err) == 1 and "--video-size must be an even number" in err[0]


# ----------------------------------------------------------------------------
# Real predictions: exports, names, preprocessing
# ----------------------------------------------------------------------------

def _mp4_frames(path):
  cv2 = pytest.importorskip("cv2")
  cap = cv2.VideoCapture(path)
  assert cap.isOpened(), path
  n, shape = 0, None
  while True:
    ok, frame = cap.read()
    if not ok:
      break
    n, shape = n + 1, frame.shape
  cap.release()
  return n, shape


def test_predict_exports_and_unique_names(tmp_path, capfd, workdir, faces):
  ins, other = tmp_path / "in", tmp_path / "other"
  ins.mkdir()
  other.mkdir()
  # a.png + a.jpg and a second a.png: three distinct outputs (name-collision).
  photo = np.zeros((30, 40, 3), np.uint8)
  photo[:, 5:35] = faces[0][::2, ::2][1:31, 1:31]  # 30x40: the centre square is cols 5..35
  Image.fromarray(photo).save(ins / "a.png")
  Image.fromarray(faces[1]).save(ins / "a.jpg", quality=95)
  Image.fromarray(faces[2][:48, :48]).save(other / "a.png")
  before = {p: p.read_bytes() for p in (ins / "a.png", ins / "a.jpg", other / "a.png")}
  out = tmp_path / "out"
  code, err = _cli(capfd, "predict", "--workdir", workdir, "--images", str(ins), str(other),
                   "--out", str(out), "--video-size", "16")
  assert code == 0, err
  assert any("centre-cropped to 24 px" in x for x in err), err  # the train crop is not reused
  stems = sorted(os.listdir(out))
  assert stems == ["a_jpg", "in_a_png", "other_a_png"]
  files = export.video_plan(export.FILES)[0]  # (the videos this OpenCV writes)
  assert "turn.mp4" in files
  n_files = len(files)
  assert f"wrote {3 * n_files} files for 3 images" in err[-1], err
  for s in stems:
    assert sorted(os.listdir(out / s)) == sorted(files)
  # a batch: progress lines with the rate and ETA (after the first image, at the last)
  prog = [x for x in err if x.startswith("[predict] ")]
  assert prog[0].startswith("[predict] 1/3 images") and prog[-1].startswith("[predict] 3/3")
  assert all("s/image, ETA " in x for x in prog)
  assert all(p.read_bytes() == b for p, b in before.items())  # inputs untouched

  d = out / "in_a_png"
  # Default preprocessing: the largest centred square of the photo, resized; no crop.
  want = data.crop_resize(data.read_image(str(ins / "a.png")), S)
  with Image.open(d / "input.png") as im:
    got = np.asarray(im)[::2, ::2]
  np.testing.assert_array_equal(got, (np.clip(want, 0, 1) * 255 + 0.5).astype(np.uint8))
  meta = json.loads((d / "params.json").read_text())
  assert meta["source"]["method"] == "centre square" and meta["source"]["crop_px"] == [5, 0, 30]

  # Depth: numbers and 16-bit PNGs that round-trip within their quantisation.
  canon = np.load(d / "canon_depth.npy")
  assert canon.shape == (S, S) and canon.dtype == np.float32
  step = 0.2 / 65535
  assert np.abs(data.read_depth_png(str(d / "canon_depth.png")) - canon).max() <= step / 2 + 1e-6
  view_depth = np.load(d / "depth.npy")
  inside = (view_depth >= 0.9) & (view_depth <= 1.1)
  assert inside.mean() > 0.3
  back = data.read_depth_png(str(d / "depth.png"))
  assert np.abs(back - view_depth)[inside].max() <= step / 2 + 1e-6
  with Image.open(d / "canon_depth.png") as im:
    assert im.mode.startswith("I;16")
  with Image.open(d / "albedo.png") as im:
    assert im.size == (S, S) and im.mode == "RGB"

  # Light and view with units.
  light, view = meta["light"], meta["view"]
  assert abs(np.linalg.norm(light["direction"]) - 1) < 1e-5
  assert 0 <= light["ambient"] <= 1 and 0 <= light["diffuse"] <= 1
  assert set(view["rotation_deg"]) == {"x_pitch", "y_yaw", "z_roll"}
  assert all(abs(v) <= 60 for v in view["rotation_deg"].values())  # xyz_rotation_range
  assert meta["camera"]["fov_deg"] == 10.0 and meta["camera"]["image_size_px"] == S

  # Mesh: loads back with trimesh, one vertex per pixel, textured, facing the viewer.
  trimesh = pytest.importorskip("trimesh")
  mesh = trimesh.load(str(d / "mesh.obj"), process=False)
  assert mesh.vertices.shape == (S * S, 3) and mesh.faces.shape == (2 * (S - 1) ** 2, 3)
  assert mesh.visual.kind == "texture" and mesh.visual.material.image.size == (S, S)
  assert np.median(mesh.face_normals[:, 2]) > 0.9
  np.testing.assert_allclose(np.sort(1.0 - mesh.vertices[:, 2]), np.sort(canon.ravel()),
                             atol=1e-5)  # z_obj = rot_center_depth - z

  # Turn-tables: the MP4 has every frame, [textured | shape] at --video-size;
  # the WebM (browsers play it) too, where this OpenCV writes one.
  n, shape = _mp4_frames(str(d / "turn.mp4"))
  assert n == 48 and shape == (16, 32, 3)
  codecs = meta["video_codecs"]
  assert codecs["turn.mp4"] in ("H.264", "MPEG-4 Part 2")
  if codecs["turn.mp4"] != "H.264":  # said, not silent
    assert any("turn.mp4 is MPEG-4 Part 2" in x and "browsers" in x for x in err), err
  if "turn.webm" in files:
    assert codecs["turn.webm"] in ("VP8", "VP9")
    assert _mp4_frames(str(d / "turn.webm")) == (48, (16, 32, 3))
  with Image.open(d / "turn.gif") as im:
    assert im.n_frames == 24 and im.size == (3 * S, 3 * S)


def test_predict_detect_faces_crops_around_the_face(tmp_path, capfd, workdir, faces):
  photos = [_face_photo(f) for f in faces]
  hit = next((p for p in photos if detect.find_face(p) is not None), None)
  assert hit is not None
  Image.fromarray(hit).save(tmp_path / "photo.jpg", quality=95)
  Image.fromarray(np.full((50, 60, 3), 90, np.uint8)).save(tmp_path / "wall.png")
  (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
  out = tmp_path / "out"
  code, err = _cli(capfd, "predict", "--workdir", workdir, "--images",
                   str(tmp_path / "photo.jpg"), str(tmp_path / "wall.png"),
                   str(tmp_path / "broken.png"), "--out", str(out), "--detect-faces",
                   "--skip-bad", "--video-size", "16")
  assert code == 0, err
  joined = "\n".join(err)
  assert "note: skipped " + str(tmp_path / "wall.png") + ": no human or cat face" in joined
  assert "note: skipped " + str(tmp_path / "broken.png") in joined
  assert "human face at" in joined and "skipped 2 (named above)" in err[-1]
  assert os.listdir(out) == ["photo"]
  meta = json.loads((out / "photo" / "params.json").read_text())
  src = meta["source"]
  assert src["method"] == "face" and src["face"]["kind"] == "human"
  box = detect.find_face(data.read_image(str(tmp_path / "photo.jpg")))
  assert src["crop_px"] == list(box["crop"])
  left, top, side = src["crop_px"]
  want = data.crop_box_resize(data.read_image(str(tmp_path / "photo.jpg")), left, top, side, S)
  with Image.open(out / "photo" / "input.png") as im:
    got = np.asarray(im)[::2, ::2]
  np.testing.assert_array_equal(got, (np.clip(want, 0, 1) * 255 + 0.5).astype(np.uint8))


def test_user_report_cases(tmp_path, capfd, workdir):
  """train-crop-at-predict: a 64 px face and a 640x480 photo are predicted
  whole (no crop); name-collision: 3 inputs, 3 output folders."""
  crop_case = _case("train-crop-at-predict")
  names = _case("name-collision")
  out = tmp_path / "out"
  code, err = _cli(capfd, "predict", "--workdir", workdir, "--images",
                   os.path.join(crop_case, "predict_in"), os.path.join(names, "in"),
                   os.path.join(names, "other"), "--out", str(out), "--video-size", "16")
  assert code == 0, err
  assert sorted(os.listdir(out)) == ["a_jpg", "in_a_png", "other_a_png", "small_64",
                                     "webcam_640x480"]
  meta = json.loads((out / "webcam_640x480" / "params.json").read_text())
  assert meta["source"]["crop_px"] == [80, 0, 480]
  assert f"wrote {5 * len(export.video_plan(export.FILES)[0])} files for 5 images" in err[-1]


# ----------------------------------------------------------------------------
# Issue 23: degenerate model inputs, choosing the outputs
# ----------------------------------------------------------------------------

def _degenerate_inputs(folder, faces):
  """Inputs whose crop (the model's input) is no picture, and one that is."""
  rng = np.random.default_rng(1)
  wide = np.full((80, 400, 3), 200, np.uint8)  # faces at the sides, an empty centre square
  wide[:64, :64], wide[:64, -64:] = faces[0], faces[1]
  cases = dict(
      black=np.zeros((48, 64, 3), np.uint8),  # a frame of padding
      white_noise_wall=np.clip(180 + rng.normal(0, 2, (40, 40, 3)), 0, 255).astype(np.uint8),
      wide_empty_centre=wide,
      letterbox=np.pad(np.full((4, 60, 3), 90, np.uint8), ((28, 28), (0, 0), (0, 0))),
  )
  for name, a in cases.items():
    Image.fromarray(a).save(folder / f"{name}.png")
  Image.fromarray(faces[2]).save(folder / "face.png")
  return sorted(cases)


def test_flat_image_check():
  """The built-in data's faces (and its cats and cars, on black) are pictures;
  blank, constant and nearly-constant crops are not."""
  for variant in ("default", "cat", "car", "frame"):
    imgs = data.generate_split(16, 32, seed=0, split="test",
                               cfg=data.get_variant(variant).gen)["images"]
    assert all(data_flat(im / 255.0) is None for im in imgs), variant
  assert "blank or nearly constant" in data_flat(np.full((16, 16, 3), 0.5))
  assert "flat colour" in data_flat(np.pad(np.ones((3, 3, 3)), ((7, 6), (7, 6), (0, 0))))


def data_flat(x):
  from scr_jax import folders
  return folders.flat_image(x)


def test_degenerate_inputs_are_named_or_skipped(tmp_path, capfd, workdir, faces):
  """Kind 4: a crop that is blank, constant or nearly so gets a note naming
  the input before the model runs (and params.json says so); --skip-bad
  skips it, named. A real face gets neither."""
  ins = tmp_path / "in"
  ins.mkdir()
  bad = _degenerate_inputs(ins, faces)
  out = tmp_path / "out"
  code, err = _cli(capfd, "predict", "--workdir", workdir, "--images", str(ins), "--out",
                   str(out), "--outputs", "depth", "--crop", "none")
  assert code == 0, err
  (line,) = [x for x in err if "blank or nearly one flat colour" in x]
  assert line.startswith("note: ") and f"and {len(bad) - 1} more" in line, line
  for name in bad:
    meta = json.loads((out / name / "params.json").read_text())
    assert meta["source"]["input_check"], name
  assert "input_check" not in json.loads((out / "face" / "params.json").read_text())["source"]
  code, err = _cli(capfd, "predict", "--workdir", workdir, "--images", str(ins), "--out",
                   str(tmp_path / "out2"), "--outputs", "depth", "--skip-bad")
  assert code == 0, err
  assert os.listdir(tmp_path / "out2") == ["face"]
  for name in bad:
    assert any(x.startswith(f"note: skipped {ins / name}.png: the model's input") for x in err)
  assert f"skipped {len(bad)} (named above)" in err[-1]


def test_outputs_choose_what_is_written(tmp_path, capfd, workdir, faces):
  """--outputs depth,normal,mesh and --no-video write only those (params.json
  always); a name it does not know is one line before any model work."""
  ins = tmp_path / "in"
  ins.mkdir()
  for i in range(2):
    Image.fromarray(faces[i]).save(ins / f"f{i}.png")
  out = tmp_path / "out"
  code, err = _cli(capfd, "predict", "--workdir", workdir, "--images", str(ins), "--out",
                   str(out), "--outputs", "depth,normal,mesh")
  assert code == 0, err
  want = sorted(export.OUTPUTS["depth"] + export.OUTPUTS["mesh"] + ("normal.png", "params.json"))
  assert sorted(os.listdir(out / "f0")) == want
  assert json.loads((out / "f0" / "params.json").read_text())["files"] == [
      f for f in export.FILES if f in want]
  code, err = _cli(capfd, "predict", "--workdir", workdir, "--images", str(ins / "f0.png"),
                   "--out", str(tmp_path / "nv"), "--no-video")
  assert code == 0, err
  got = set(os.listdir(tmp_path / "nv" / "f0"))
  assert got == set(export.FILES) - {"turn.mp4", "turn.webm"}
  code, err = _cli(capfd, "predict", "--workdir", workdir, "--images", str(ins), "--out",
                   str(tmp_path / "bad"), "--outputs", "depth,pointcloud")
  assert code == 2 and len(err) == 1 and "unknown pointcloud" in err[0] and "mesh" in err[0]
  assert not (tmp_path / "bad").exists()
