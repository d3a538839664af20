"""Prepared datasets (scr_jax.prepare) and the grain batches (scr_jax.dataset)."""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from scr_jax import config, dataset, folders, prepare, synthetic
from scr_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def synface(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("syn") / "src")
  synthetic.export_synface(root, 20, 6, 6, size=16, verbose=False)
  return root


def _cfg(size=16, crop=0):
  return config.override(config.get_config("test_tiny"), [f"image_size={size}", f"crop={crop}"])


def test_prepare_round_trip_is_the_direct_reader(synface, tmp_path):
  # No resize: the stored uint8 / uint16 give back exactly what the reader gives.
  man = prepare.prepare(synface, str(tmp_path / "ds"), 16, quiet=True)
  assert man["splits"] == dict(train=dict(n=20, has_depth=True), val=dict(n=6, has_depth=True),
                               test=dict(n=6, has_depth=True))
  prep = dataset.Prepared(str(tmp_path / "ds"), man)
  got = dataset.read_split(prep, "test", True)
  want = folders.load_synface(synface, "test", 16)
  assert got["names"] == want["names"]
  np.testing.assert_array_equal(got["images"].astype(np.float32) / 255.0, want["images"])
  np.testing.assert_array_equal(got["depth"], want["depth"])


def test_split_above_tfds_memory_buffer_is_written_without_tensorflow(synface, tmp_path,
                                                                     monkeypatch):
  # TFDS spills a split above its in-memory cap (1 GB) through tf.io.gfile, which
  # needs TensorFlow (not installed here): 200k images at 64 px crashed after the
  # whole decode. A cap of 1 KB makes this tiny split take that path.
  from tensorflow_datasets.core import shuffle
  monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 1024)
  man = prepare.prepare(synface, str(tmp_path / "ds"), 16, quiet=True)
  assert shuffle.MAX_MEM_BUFFER_SIZE == 1024  # restored after the write
  got = dataset.read_split(dataset.Prepared(str(tmp_path / "ds"), man), "train", True)
  want = folders.load_synface(synface, "train", 16)
  assert got["names"] == want["names"]
  np.testing.assert_array_equal(got["images"].astype(np.float32) / 255.0, want["images"])


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None,
                    reason="with TensorFlow, TFDS spills to disk: no memory limit to check")
def test_split_too_large_for_memory_is_refused_before_work(monkeypatch):
  from tensorflow_datasets.core import shuffle
  monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 1024)
  splits = dict(train=[("a", "a.png", None)] * 1000)
  need = prepare.split_buffer_bytes(splits, 64, with_depth=False)
  assert need >= 1000 * 64 * 64 * 3
  prepare.check_writer_memory(need, available=10 * need)  # fits: no error
  with pytest.raises(UserError, match="GB of memory"):
    prepare.check_writer_memory(need, available=need)


def test_prepare_resized_folder_in_parallel(tmp_path):
  # A nested image folder, JPEG, resized 40x30 -> 12 with two worker processes:
  # within half a grey level of the direct reader (uint8 storage), names kept.
  src = tmp_path / "imgs"
  rng = np.random.default_rng(0)
  for i in range(6):
    (src / f"sub{i % 2}").mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), np.uint8)).save(
        src / f"sub{i % 2}" / f"{i}.jpg")
  man = prepare.prepare(str(src), str(tmp_path / "ds"), 12, workers=2, quiet=True)
  assert man["layout"] == "images" and man["splits"]["train"] == dict(n=6, has_depth=False)
  got = dataset.read_split(dataset.Prepared(str(tmp_path / "ds"), man), "train", False)
  want = folders.load_image_folder(str(src), 12)
  assert got["names"] == want["names"] == ["sub0/0", "sub0/2", "sub0/4", "sub1/1", "sub1/3",
                                           "sub1/5"]
  err = np.abs(got["images"].astype(np.float32) / 255.0 - want["images"])
  assert err.max() <= 0.5 / 255 + 1e-6


def test_changed_source_is_detected_not_reused(synface, tmp_path, capfd):
  src = str(tmp_path / "src")
  synthetic.export_synface(src, 6, 2, 2, size=16, verbose=False)
  cfg = _cfg()
  prep = dataset.open_prepared(src, cfg)  # first use: prepared into the cache beside it
  assert prep.path == dataset.cache_dir(src, 16) and os.path.isdir(prep.path)
  assert "prepared" in capfd.readouterr().err
  again = dataset.open_prepared(src, cfg)  # reused, no note
  assert again.manifest["created_at"] == prep.manifest["created_at"]
  assert "prepared" not in capfd.readouterr().err
  assert prepare.source_changed(prep.manifest) is None
  # One image replaced by another (same name, other pixels and size).
  path = os.path.join(src, "train", "image", "000001_image.png")
  Image.fromarray(np.zeros((16, 16, 3), np.uint8) + 200).save(path)
  os.utime(path, ns=(1, 1))
  why = prepare.source_changed(prep.manifest)
  assert why and src in why
  with pytest.raises(UserError, match="changed since it was prepared"):
    dataset.open_prepared(prep.path, cfg)  # the prepared dataset itself: refused
  fresh = dataset.open_prepared(src, cfg)  # the source: prepared again, with a note
  assert "changed since it was prepared" in capfd.readouterr().err
  d = dataset.read_split(fresh, "train", False)
  assert (d["images"][1] == 200).all()


def test_prepared_at_another_size_is_one_line(synface, tmp_path):
  prepare.prepare(synface, str(tmp_path / "ds"), 8, quiet=True)
  with pytest.raises(UserError, match="prepared at 8 px.*--image-size 16"):
    dataset.open_prepared(str(tmp_path / "ds"), _cfg(16))


def test_bad_file_is_one_line_error(tmp_path):
  src = tmp_path / "imgs"
  src.mkdir()
  for i in range(3):
    Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(src / f"{i}.png")
  (src / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
  for workers in (1, 2):
    with pytest.raises(UserError, match=r"1\.png: not a readable image") as e:
      prepare.prepare(str(src), str(tmp_path / f"ds{workers}"), 8, workers=workers, quiet=True)
    assert "\n" not in str(e.value)
    assert prepare.read_manifest(str(tmp_path / f"ds{workers}")) is None


def test_prepare_cli_bad_file_one_line(tmp_path):
  src = tmp_path / "imgs"
  src.mkdir()
  (src / "a.jpg").write_bytes(b"not a jpeg")
  res = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "run.py"), "prepare",
                        "--data", str(src), "--out", str(tmp_path / "ds"), "--image-size", "8"],
                       capture_output=True, text=True, timeout=120)
  assert res.returncode == 2
  assert res.stderr.strip().count("\n") == 0 and "a.jpg: not a readable image" in res.stderr


@pytest.mark.parametrize("in_memory", [True, False])
def test_batches_deterministic_and_resumable(synface, tmp_path, in_memory, monkeypatch):
  if not in_memory:
    monkeypatch.setattr(dataset, "IN_MEMORY_BYTES", 0)
  prep = dataset.open_prepared(synface, _cfg(), cache=str(tmp_path / "cache"))
  ts = dataset.train_split(prep)
  assert (ts.images is None) == (not in_memory)
  workers = 0 if in_memory else 1
  b = dataset.Batches(ts, 4, seed=3, start=0, steps=12, workers=workers)
  run = [next(b) for _ in range(12)]
  b.close()
  # Each batch is the (seed, step) permutation of the records, as float32 / 255.
  arrays = dataset.read_split(prep, "train", False)["images"]
  for step, x in enumerate(run):
    want = arrays[dataset.batch_indices(20, 4, 3, step)].astype(np.float32) / 255.0
    np.testing.assert_array_equal(x, want)
  # Interrupted after 5 batches; a new loader from the saved state continues exactly.
  b = dataset.Batches(ts, 4, seed=3, start=0, steps=12, workers=workers)
  for _ in range(5):
    next(b)
  state = b.state()
  b.close()
  assert state["next_step"] == 5
  c = dataset.Batches(ts, 4, seed=3, start=5, steps=12, workers=workers, state=state)
  rest = list(c)
  c.close()
  assert len(rest) == 7
  for x, y in zip(rest, run[5:]):
    np.testing.assert_array_equal(x, y)
  assert c.state()["next_step"] == 12


def test_batches_shard_by_process(synface, tmp_path):
  prep = dataset.open_prepared(synface, _cfg(), cache=str(tmp_path / "cache"))
  ts = dataset.train_split(prep)
  full = dataset.Batches(ts, 4, 0, 0, 3)
  parts = [dataset.Batches(ts, 4, 0, 0, 3, shard=(i, 2)) for i in range(2)]
  for _ in range(3):
    x = next(full)
    np.testing.assert_array_equal(np.concatenate([next(p) for p in parts]), x)
  for it in [full] + parts:
    it.close()


def test_without_grain_the_same_batches_and_arrays(synface, tmp_path, monkeypatch):
  # The GPU check's machine has neither grain nor TFDS: folders are read
  # straight into memory and batched in-process, with the same values.
  cfg = _cfg()
  with_grain, val = dataset.load_train_data(synface, cfg, cache=str(tmp_path / "cache"))
  test = dataset.load_split(synface, "test", cfg, cache=str(tmp_path / "cache"))
  monkeypatch.setattr(dataset, "missing_packages", lambda: "blocked")
  plain, val2 = dataset.load_train_data(synface, cfg)
  assert isinstance(plain, dict) and not os.path.exists(dataset.cache_dir(synface, 16))
  np.testing.assert_array_equal(dataset.load_split(synface, "test", cfg)["depth"], test["depth"])
  np.testing.assert_array_equal(val2["images"], val["images"])
  assert dataset.fingerprint(plain) == dataset.fingerprint(with_grain)
  a = dataset.Batches(plain, 4, 1, 0, 6)
  run = list(a)
  b = dataset.Batches(plain, 4, 1, 0, 6)
  next(b), next(b)
  c = dataset.Batches(plain, 4, 1, 2, 6, state=b.state())
  monkeypatch.undo()
  g = dataset.Batches(with_grain, 4, 1, 0, 6)
  for x, y in zip(run, g):
    np.testing.assert_array_equal(x, y)
  g.close()
  for x, y in zip(c, run[2:]):
    np.testing.assert_array_equal(x, y)


def test_two_runs_at_once_prepare_one_cache(synface, tmp_path):
  # A seed sweep starts runs on one raw folder at the same moment: one prepares
  # the cache, the other waits for it (without the lock both wrote the same
  # TFDS files and one crashed).
  src = str(tmp_path / "src")
  synthetic.export_synface(src, 60, 6, 6, size=16, verbose=False)
  code = ("import sys; from scr_jax import config, dataset\n"
          "cfg = config.override(config.get_config('test_tiny'), ['image_size=16'])\n"
          "p = dataset.open_prepared(sys.argv[1], cfg)\n"
          "print(len(dataset.read_split(p, 'train', True)['names']))\n")
  procs = [subprocess.Popen([sys.executable, "-c", code, src], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT) for _ in range(3)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err
    assert out.strip() == "60"
  notes = sum(err.count("note: prepared") for _, err in outs)
  assert notes == 1, [err for _, err in outs]
