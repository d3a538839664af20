"""Prepare: a folder of images or a synface folder -> a TFDS array_record dataset.

`prepare(src, out, image_size, crop, workers)` decodes every file once (in
parallel decoding threads, through the same readers as everything else:
`folders.read_image`, `folders.read_depth_png`, `folders.crop_resize`) and
writes a TFDS dataset in array_record format under `out/tfds/`:
  image uint8 SxSx3, name (text) and, when any split has depth, depth uint16
  SxS (Unsup3D's PNG value v * 65535; zeros in a split without), as raw bytes.
`out/manifest.json` is written last (its presence means the dataset is
complete) and records the source folder, its layout, the file count and bytes,
size and crop, and `source_hash`, a hash of the relative paths, sizes and
modification times of the files read, so a changed source is detected
(`source_changed`) rather than silently reused.

Layouts (as the loaders read them): DIR/{train,val,test}/{image,depth}/
(synface), DIR/{split}/[image/] images only, or a plain (nested) folder of
images, which becomes the split "train". Split folders go by their usual
names too (Training/, validation/, valid/, dev/, testing/, ...:
`folders.split_folders`); a folder named as a held-out split is never
trained on (refused inside a plain folder, `folders.check_not_held_out`).

TensorFlow is never imported: TFDS writes and reads array_record with numpy.
"""
from __future__ import annotations

import collections
import concurrent.futures as futures
import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import importlib.util
import io
import json
import logging
import os
import shutil
import sys
import time

import numpy as np

from scr_jax import cliutil, folders, jsonio
from scr_jax.errors import UserError

SPLITS = folders.SPLITS
MANIFEST = "manifest.json"
FORMAT = "scr_prepared/2"
NAME = "scr_prepared"
VERSION = "1.0.0"


# ----------------------------------------------------------------------------
# What a source folder holds
# ----------------------------------------------------------------------------

def scan(src: str) -> dict:
  """The files a source folder contributes, split by split.

  Returns dict(layout="synface" | "split-images" | "images", splits={split:
  [(name, image_path, depth_path or None), ...]}, notes={...}) with files
  sorted as the folder loaders sort them.
  Raises:
    UserError: missing folder, a file, no image, an image without its depth twin.
  """
  if os.path.isfile(src):
    raise UserError(f"{src}: is a file, not a folder of images")
  if not os.path.isdir(src):
    raise UserError(f"data folder {src} not found")
  notes, splits = {}, {}
  found = folders.split_folders(src, notes)  # train/ val/ test/ under their usual names
  if found:
    layout = "split-images"
    for split in SPLITS:
      root = found.get(split)
      if root is None:
        continue
      if os.path.isdir(os.path.join(root, "depth")):
        layout = "synface"
        splits[split] = folders.synface_pairs(src, split, notes, folder=root)
      else:
        imgs = os.path.join(root, "image")
        folder = imgs if os.path.isdir(imgs) else root
        files = folders.list_images(folder, True, notes)
        if split == "train":
          folders.check_not_held_out(folder, files)
        splits[split] = [(_name(f, folder), f, None) for f in files]
  else:
    layout = "images"
    files = folders.list_images(src, True, notes)
    folders.check_not_held_out(src, files)  # faces/celeba/test/... is never trained on
    splits["train"] = [(_name(f, src), f, None) for f in files]
  return dict(layout=layout, splits=splits, notes=notes)


def _name(path: str, folder: str) -> str:
  return os.path.splitext(os.path.relpath(path, folder))[0].replace(os.sep, "/")


def source_hash(src: str, listing: dict) -> tuple:
  """(hash, n_files, bytes) of the files in `listing` (`scan`): BLAKE2b over
  each file's path relative to src, size and mtime (ns), in listing order."""
  h, n, total = hashlib.blake2b(digest_size=16), 0, 0
  for split in sorted(listing["splits"]):
    for _, ip, dp in listing["splits"][split]:
      for p in (ip, dp) if dp else (ip,):
        st = os.stat(p)
        h.update(f"{split}\0{os.path.relpath(p, src)}\0{st.st_size}\0{st.st_mtime_ns}\n"
                 .encode())
        n, total = n + 1, total + st.st_size
  return h.hexdigest(), n, total


def read_manifest(out: str, current: bool = True):
  """The manifest of a prepared dataset folder, or None when there is none.

  current=True: a manifest of another format version is a UserError
  (prepare again); current=False returns it as it is."""
  path = os.path.join(out, MANIFEST)
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8-sig") as fh:
      man = json.load(fh)
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: unreadable manifest ({type(e).__name__}); prepare again") from None
  if current and man.get("format") != FORMAT:
    raise UserError(f"{path}: not a prepared dataset of this version ({man.get('format')!r}, "
                    f"want {FORMAT!r}); prepare again")
  return man


def source_changed(man: dict):
  """Why the manifest's source no longer matches its files (a one-line
  reason), or None when it matches or the source is gone (moved datasets
  stay usable)."""
  src = man["source"]
  if not os.path.isdir(src):
    return None
  try:
    listing = scan(src)
  except UserError as e:
    return str(e)
  digest, n, total = source_hash(src, listing)
  if digest == man["source_hash"]:
    return None
  return (f"{src} changed since it was prepared ({man['n_files']} files, {man['bytes']} bytes "
          f"then; {n} files, {total} bytes now, or newer files)")


# ----------------------------------------------------------------------------
# Decoding (worker processes)
# ----------------------------------------------------------------------------

def _decode(item, image_size, crop):
  """(name, image_path, depth_path|None) -> (name, image u8, depth u16|None, notes)."""
  name, ip, dp = item
  notes = {}
  if dp is None:
    img, z = folders.read_folder_image(ip, image_size, crop, notes), None
  else:
    img, z = folders.read_synface_pair(ip, dp, image_size, crop, notes)
  u8 = np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
  u16 = None
  if z is not None:
    u16 = np.round(folders.depth_to_png_value(z) * 65535.0).astype(np.uint16)
  return name, u8, u16, notes


def _decode_chunk(items, image_size, crop):
  return [_decode(it, image_size, crop) for it in items]


def _decoded(items, image_size, crop, workers: int, chunk: int = 16):
  """Decoded items in order; with workers > 1, in a thread pool with a bounded
  number of chunks in flight (memory stays flat at any N). Threads, not
  processes: Pillow's decoders and resampling and numpy release the GIL, and a
  thread pool needs no `if __name__ == "__main__"` guard in the caller's
  script nor a fresh interpreter per worker (measured on 2 busy cores: 2
  threads 412 img/s, 2 spawned processes 370, inline 351; 178x218 JPEG -> 64 px)."""
  if workers <= 1:
    for it in items:
      yield _decode(it, image_size, crop)
    return
  with futures.ThreadPoolExecutor(workers, thread_name_prefix="prepare") as pool:
    pending = collections.deque()
    for i in range(0, len(items), chunk):
      pending.append(pool.submit(_decode_chunk, items[i:i + chunk], image_size, crop))
      if len(pending) >= 4 * workers:
        yield from pending.popleft().result()
    while pending:
      yield from pending.popleft().result()


class _Progress:
  """'[prepare] train: 1200/10000 (12%) 850 img/s, ETA 10s': live on a
  terminal, every 10 s in logs, and a final line."""

  def __init__(self, split: str, total: int, quiet: bool, summary: bool = True):
    self.split, self.total, self.quiet, self.summary = split, total, quiet, summary
    self.t0 = self.last = time.time()
    self.tty = sys.stderr.isatty()

  def line(self, done: int) -> str:
    dt = max(time.time() - self.t0, 1e-9)
    rate = done / dt
    eta = (self.total - done) / rate if rate > 0 else float("inf")
    return (f"[prepare] {self.split}: {done}/{self.total} ({100 * done // max(self.total, 1)}%) "
            f"{rate:.0f} img/s, ETA {eta:.0f}s")

  def update(self, done: int):
    now = time.time()
    if self.quiet or now - self.last < (0.5 if self.tty else 10.0):
      return
    self.last = now
    cliutil.log(("\r" if self.tty else "") + self.line(done), end="" if self.tty else "\n")

  def finish(self, done: int):
    if self.tty and not self.quiet and not self.summary:
      cliutil.log("\r\033[K", end="")  # clear the live line
    if not self.quiet and self.summary:
      cliutil.log(f"{chr(13) if self.tty else ''}[prepare] {self.split}: {done} images in "
                  f"{time.time() - self.t0:.1f}s ({done / max(time.time() - self.t0, 1e-9):.0f} "
                  "img/s)")


# ----------------------------------------------------------------------------
# The TFDS builder
# ----------------------------------------------------------------------------

def _tfds():
  """tensorflow_datasets, with two harmless absl warnings dropped."""
  import tensorflow_datasets as tfds  # heavy: only when preparing or reading

  class _DropNoise(logging.Filter):
    def filter(self, record):
      return not str(record.msg).startswith(("OpenCV is not installed",
                                             "Using custom data configuration"))
  logging.getLogger("absl").addFilter(_DropNoise())
  return tfds


def available_memory_bytes() -> int:
  """MemAvailable of /proc/meminfo (free pages elsewhere), in bytes."""
  with contextlib.suppress(OSError, ValueError):
    with open("/proc/meminfo") as fh:
      for line in fh:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def has_depth(splits: dict) -> bool:
  """Depth is stored when any split has it (zeros in the others); splits:
  split -> list of (name, image_path, depth_path|None)."""
  return any(v and v[0][2] is not None for v in splits.values())


def split_buffer_bytes(splits: dict, image_size: int, with_depth: bool) -> int:
  """Serialized size of the largest split (bytes, an estimate: raw uint8
  image, uint16 depth, name and record overhead per example)."""
  per = image_size * image_size * (3 + (2 if with_depth else 0)) + 128
  return max((len(v) for v in splits.values()), default=0) * per


def _writes_from_memory(need_bytes: int) -> bool:
  """Whether TFDS will hold the split in memory past its own 1 GB cap (no
  TensorFlow to spill with; see `writer_buffer_for`)."""
  from tensorflow_datasets.core import shuffle  # optional dependency
  return need_bytes > shuffle.MAX_MEM_BUFFER_SIZE and importlib.util.find_spec("tensorflow") is None


def check_writer_memory(need_bytes: int, available=None):
  """Raises UserError (before any work) when a split that must be written
  from memory (`writer_buffer_for`) needs over 80% of the available memory."""
  if not _writes_from_memory(need_bytes):
    return
  available = available_memory_bytes() if available is None else available
  if need_bytes > 0.8 * available:
    raise UserError(
        f"prepare: the largest split needs about {need_bytes / 2**30:.1f} GB of memory while "
        f"it is written (TFDS without TensorFlow writes a split from memory) and "
        f"{available / 2**30:.1f} GB are available; use a smaller --image-size, split the "
        "folder into several datasets, or install tensorflow (TFDS then spills to disk)")


@contextlib.contextmanager
def writer_buffer_for(need_bytes: int):
  """TFDS's writer keeps a split in memory up to its MAX_MEM_BUFFER_SIZE (1 GB)
  and beyond that spills to disk through tf.io.gfile, which needs TensorFlow
  (not a dependency: 200,000 images at 64 px crashed there with "No module
  named 'tensorflow'" after the whole decode). Without TensorFlow the split is
  therefore written from memory: the cap is raised to fit `need_bytes` for
  the duration of the write (`check_writer_memory` first)."""
  from tensorflow_datasets.core import shuffle  # optional dependency
  if not _writes_from_memory(need_bytes):
    yield
    return
  old = shuffle.MAX_MEM_BUFFER_SIZE
  shuffle.MAX_MEM_BUFFER_SIZE = int(need_bytes * 1.25) + (1 << 20)
  try:
    yield
  finally:
    shuffle.MAX_MEM_BUFFER_SIZE = old


@dataclasses.dataclass
class _Plan:
  """What one prepare writes: sizes and the decoded-example streams."""
  size: int
  splits: dict  # split -> list of (name, image_path, depth_path|None)
  crop: int | None
  workers: int
  quiet: bool
  notes: dict
  summary: bool = True

  @property
  def with_depth(self) -> bool:
    return has_depth(self.splits)


def _builder_class(tfds):
  """The GeneratorBasedBuilder (defined on first use: TFDS is imported lazily)."""
  if hasattr(_builder_class, "cls"):
    return _builder_class.cls

  class Prepared(tfds.core.GeneratorBasedBuilder):
    """Images (and depth) decoded, cropped and resized once by scr_jax.prepare."""
    VERSION = tfds.core.Version(VERSION)
    name = NAME
    plan: _Plan = None

    def _info(self):
      s, raw = self.plan.size, tfds.features.Encoding.BYTES
      return tfds.core.DatasetInfo(
          builder=self,
          description="scr_jax.prepare: uint8 images, uint16 depth PNG values, names.",
          features=tfds.features.FeaturesDict(dict(
              # Raw bytes, not TFDS's default int64 varints: 2.5x faster to read.
              image=tfds.features.Tensor(shape=(s, s, 3), dtype=np.uint8, encoding=raw),
              name=tfds.features.Text(),
              **({"depth": tfds.features.Tensor(shape=(s, s), dtype=np.uint16, encoding=raw)}
                 if self.plan.with_depth else {}))),
          disable_shuffling=True,  # record i is file i of the sorted listing
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      return {s: self._generate_examples(s) for s in self.plan.splits}

    def _generate_examples(self, split):
      p = self.plan
      items = p.splits[split]
      bar = _Progress(split, len(items), p.quiet, p.summary)
      zero = np.zeros((p.size,) * 2, np.uint16)
      for i, (name, u8, u16, notes) in enumerate(_decoded(items, p.size, p.crop, p.workers)):
        for k, v in notes.items():
          p.notes.setdefault(k, []).extend(v)
        ex = dict(image=u8, name=name)
        if p.with_depth:
          ex["depth"] = zero if u16 is None else u16
        yield f"{i:09d}", ex
        bar.update(i + 1)
      bar.finish(len(items))

  _builder_class.cls = Prepared
  return Prepared


@contextlib.contextmanager
def exclusive(out: str):
  """Holds an exclusive lock on `out` (the file `out`.lock beside it) for the
  block: one process prepares a folder while others block, then see its
  manifest. Where the lock file cannot be made (a read-only place) it runs
  unlocked and `prepare` reports the real error."""
  path = os.path.abspath(out).rstrip(os.sep) + ".lock"
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fh = open(path, "a")
  except OSError:
    yield
    return
  with fh:
    fcntl.flock(fh, fcntl.LOCK_EX)  # released when fh closes
    yield


def tfds_dir(out: str, man: dict) -> str:
  return os.path.join(out, man["tfds_dir"])


def prepare(src: str, out: str, image_size: int = 64, crop=None, workers=None,
            quiet: bool = False, overwrite: bool = False, summary: bool = True,
            out_flag: str = "--out") -> dict:
  """Decodes `src` once into the prepared dataset `out`; returns its manifest.

  Args:
    src: a synface folder, a folder with split sub-folders, or a folder of images.
    out: the dataset folder (created; an existing prepared dataset there is
      replaced only with overwrite=True, any other non-empty folder is refused).
    image_size: side of the stored square images (px).
    crop: centre square crop in source pixels before resizing (None: the
      largest centred square).
    workers: decoding threads (None: the CPU count, at most 8; 1: inline).
    summary: False: no per-split and closing summary lines (the caller says
      what happened; a bad source's one-line error stands alone).
    out_flag: how errors about `out` name it.
  Raises:
    UserError: bad source, unreadable file (the first one, one line), `out`
      not ours or not writable, a split too large to write in the memory
      available (`check_writer_memory`).
  """
  t0 = time.time()
  if int(image_size) < 4:
    raise UserError(f"--image-size must be >= 4, got {image_size}")
  crop = None if not crop else int(crop)
  src, out = os.path.abspath(src), os.path.abspath(out)
  if out == src or out.startswith(src + os.sep):
    raise UserError(f"{out_flag} {out} is inside the source folder {src}: it would be read "
                    "as data")
  listing = scan(src)
  digest, n_files, total = source_hash(src, listing)
  if os.path.isdir(out) and os.listdir(out):
    if read_manifest(out, False) is None and not os.path.isdir(os.path.join(out, "tfds")):
      raise UserError(f"{out_flag} {out} is not empty and not a prepared dataset; give "
                      "another folder")
    if read_manifest(out, False) is not None and not overwrite:
      raise UserError(f"{out_flag} {out} already holds a prepared dataset (replace it with "
                      "--overwrite, or give another --out)")
  need = split_buffer_bytes(listing["splits"], int(image_size), has_depth(listing["splits"]))
  check_writer_memory(need)
  with contextlib.suppress(FileNotFoundError):
    os.remove(os.path.join(out, MANIFEST))
  shutil.rmtree(os.path.join(out, "tfds"), ignore_errors=True)
  try:
    os.makedirs(out, exist_ok=True)
  except OSError as e:
    raise UserError(f"{out_flag} {out}: cannot create it ({e.strerror})") from None
  workers = min(os.cpu_count() or 1, 8) if workers is None else max(int(workers), 1)
  tfds = _tfds()
  cls = _builder_class(tfds)
  plan = _Plan(int(image_size), listing["splits"], crop, workers, quiet, dict(listing["notes"]),
               summary=summary)
  config = f"s{int(image_size)}_c{crop or 'full'}"
  builder = cls.__new__(cls)
  builder.plan = plan
  cls.__init__(builder, data_dir=os.path.join(out, "tfds"), config=None,
               file_format="array_record")
  tfds.display_progress_bar(False)
  try:
    with writer_buffer_for(need), \
        contextlib.redirect_stdout(io.StringIO()):
      builder.download_and_prepare()
  finally:
    tfds.display_progress_bar(True)
  folders._report(plan.notes)
  man = dict(
      format=FORMAT, source=src, layout=listing["layout"], image_size=int(image_size),
      crop=crop, config=config, tfds_dir=os.path.relpath(builder.data_dir, out),
      splits={s: dict(n=len(v), has_depth=bool(v) and v[0][2] is not None)
              for s, v in listing["splits"].items()},
      n_files=n_files, bytes=total, source_hash=digest,
      created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      seconds=round(time.time() - t0, 2))
  jsonio.write_json(os.path.join(out, MANIFEST), man)
  if not quiet and summary:
    counts = ", ".join(f"{s} {v['n']}" for s, v in man["splits"].items())
    cliutil.log(f"[prepare] {counts} images at {image_size}px in {man['seconds']:.1f}s -> {out}")
  return man
