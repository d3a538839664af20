"""The one data entry point of train, eval, search and reproduce.

`--data` may be 'builtin[:VARIANT]' (generated once by `synthetic`), a raw
folder (prepared on first use into a cache beside it, `prepare.prepare`), or a
prepared dataset (a folder with manifest.json). Everything is read from the
prepared array_record dataset:
  * `load_split`: a split as in-memory arrays (evaluation, val, baselines);
  * `load_train_data`: the training split as a `TrainSplit` handle, and val;
  * `Batches`: the training batches, streamed with grain: batch `step` is a
    pure function of (seed, step) (`batch_indices`), read by a grain
    MapDataset over the records, prefetched by threads or worker processes;
    its iterator state goes into each checkpoint, so a resumed run sees the
    batches an uninterrupted run would. With several processes (multi-host),
    each reads only its own slice of every global batch.
Small datasets (<= IN_MEMORY_BYTES of pixels) are read into memory once as
uint8 and batched in-process; larger ones stream from disk.

Imports `prepare`, `synthetic` and `folders`; nothing of theirs imports it.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time

import jax
import numpy as np

from scr_jax import cliutil, folders, model, prepare, synthetic
from scr_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILTIN_COUNTS = dict(n_train=4000, n_val=500, n_test=500)
IN_MEMORY_BYTES = 256 << 20  # uint8 pixels held in memory below this
CACHE_SUFFIX = ".prepared"


# ----------------------------------------------------------------------------
# Built-in data and --data resolution
# ----------------------------------------------------------------------------

def builtin_dir(size: int, seed: int = 0, variant: str = "default", data_root=None) -> str:
  name = f"builtin_s{size}_seed{seed}" if variant == "default" else \
      f"builtin_{variant}_s{size}_seed{seed}"
  return os.path.join(data_root or os.path.join(ROOT, "data"), name)


def ensure_builtin(size: int, seed: int = 0, variant: str = "default", counts=None,
                   data_root=None) -> str:
  """Generates the built-in synthetic dataset (of a named generator variant,
  synthetic.VARIANTS) once (synface layout + ground-truth sidecars) and reuses
  it afterwards; data made before sidecars existed gets them added. Training
  prepares it like any folder (`open_prepared`)."""
  gen = synthetic.get_variant(variant).gen
  path = builtin_dir(size, seed, variant, data_root)
  with prepare.exclusive(path):  # two runs started at once: one generates
    if not os.path.exists(os.path.join(path, "meta.json")):
      cliutil.log(f"generating built-in synthetic faces ({variant}) at {size}x{size} into {path} "
                  "(once)")
      synthetic.export_synface(path, size=size, seed=seed, overwrite=True, cfg=gen,
                               **(counts or BUILTIN_COUNTS))
    else:
      synthetic.write_missing_gt(path)
  return path


def resolve_data(spec: str, cfg) -> str:
  """'builtin', 'builtin:VARIANT' (generated once, at the variant's export
  size or the config's image size) or a folder path -> the folder."""
  if spec == "builtin" or spec.startswith("builtin:"):
    name = spec.split(":", 1)[1] if ":" in spec else "default"
    size = synthetic.get_variant(name).export_size or cfg.image_size
    return ensure_builtin(size, 0, name)
  return spec


@functools.lru_cache(maxsize=None)
def missing_packages():
  """None when prepared datasets work here (tensorflow-datasets, array_record
  and grain import), else why not. Without them (the GPU check's machine has
  neither) `load_split` / `load_train_data` read the folder straight into
  memory with the same readers, and `Batches` yields the same batches
  without grain."""
  try:
    import array_record.python.array_record_data_source  # noqa: F401
    import grain  # noqa: F401
    import tensorflow_datasets  # noqa: F401
  except ImportError as e:
    cliutil.log(f"note: prepared datasets need tensorflow-datasets, array_record and grain ({e}); "
                "reading data folders straight into memory instead")
    return str(e)
  return None


def has_depth(spec: str, cfg, split: str, cache=None) -> bool:
  """Whether `split` of `--data spec` has ground-truth depth."""
  split = folders.canonical_split(split)
  if missing_packages():
    root = resolve_data(spec, cfg)
    folder = folders.split_folders(root).get(split) if os.path.isdir(root) else None
    return folder is not None and os.path.isdir(os.path.join(folder, "depth"))
  return open_prepared(spec, cfg, cache).has_depth(split)


def cache_dir(src: str, image_size: int, crop=None, cache=None) -> str:
  """Where a raw folder is prepared on first use: `cache` (a folder the user
  names) or DIR.prepared/ beside it, one sub-folder per size and crop."""
  src = os.path.abspath(src)
  base = cache or (src.rstrip(os.sep) + CACHE_SUFFIX)
  return os.path.join(base, f"s{int(image_size)}_c{crop or 'full'}")


@dataclasses.dataclass
class Prepared:
  """A prepared dataset: its folder and manifest; records read on demand."""
  path: str
  manifest: dict

  @property
  def size(self) -> int:
    return int(self.manifest["image_size"])

  @property
  def source(self) -> str:
    return self.manifest["source"]

  def has_split(self, split: str) -> bool:
    return split in self.manifest["splits"]

  def has_depth(self, split: str) -> bool:
    return bool(self.manifest["splits"].get(split, {}).get("has_depth"))

  def data_source(self, split: str):
    """The TFDS array_record data source of a split (random access, picklable)."""
    tfds = prepare._tfds()
    builder = tfds.builder_from_directory(prepare.tfds_dir(self.path, self.manifest))
    return builder.as_data_source(split)


def open_prepared(spec: str, cfg, cache=None, workers=None, notes=None) -> Prepared:
  """The prepared dataset for `--data spec` at cfg.image_size / cfg.crop.

  A prepared dataset is checked against its source (when the source is still
  there); a raw folder is prepared into its cache (`cache_dir`) on first use,
  with a note (printed, or appended to the list `notes` for the caller to
  print once its own checks passed), and prepared again when its files changed.
  Raises:
    UserError: missing folder, bad file, a prepared dataset at another size
      or crop, or one whose source changed since.
  """
  root = resolve_data(spec, cfg)
  if not os.path.exists(root):
    raise UserError(f"data folder {root} not found")
  crop = cfg.crop or None
  man = prepare.read_manifest(root) if os.path.isdir(root) else None
  if man is not None:
    if (man["image_size"], man["crop"]) != (cfg.image_size, crop):
      raise UserError(f"{root}: prepared at {man['image_size']} px, crop {man['crop']}; the "
                      f"config wants {cfg.image_size} px, crop {crop}: prepare again with "
                      f"--image-size {cfg.image_size}" + (f" --crop {crop}" if crop else ""))
    why = prepare.source_changed(man)
    if why:
      raise UserError(f"{root}: {why}; run prepare again (or give the source folder as --data)")
    return Prepared(root, man)
  out = cache_dir(root, cfg.image_size, crop, cache)
  if jax.process_index() != 0:  # multi-host: process 0 prepares, the others wait
    return Prepared(out, _wait_for_prepared(out, root))
  # Two runs started at once on one raw folder (a seed sweep, `--jobs 2`) would
  # both write the same cache: the second waits here, then finds it prepared.
  with prepare.exclusive(out):
    man, why = _cached_manifest(out, root)
    if why is not None:
      man = prepare.prepare(root, out, cfg.image_size, crop, workers, overwrite=True,
                            summary=False,
                            out_flag="the prepared cache (name another with --cache DIR)")
      note = (f"note: prepared {root} once into {out} ({cfg.image_size} px"
              f"{f', crop {crop}' if crop else ''}, {man['seconds']:.1f}s): later runs read "
              "it from there" + (f"; {why}" if why else ""))
      if notes is None:
        cliutil.log(note)
      else:
        notes.append(note)
  return Prepared(out, man)


def _cached_manifest(out: str, root: str):
  """(manifest, None) when the cache `out` holds a current preparation of
  `root`; (None, why) otherwise, why = "" when there is none at all."""
  man = prepare.read_manifest(out, current=False) if os.path.isdir(out) else None
  if man is None or man.get("source") != os.path.abspath(root):
    return None, ""  # none, or a cache folder named by the user, last used for another source
  if man.get("format") != prepare.FORMAT:
    return None, "prepared by another version"
  why = prepare.source_changed(man)
  return (None, why) if why else (man, None)


def _wait_for_prepared(out: str, root: str, timeout_s: float = 6 * 3600) -> dict:
  """The manifest process 0 writes for `root` into `out` (polled)."""
  t0 = time.time()
  while time.time() - t0 < timeout_s:
    man = prepare.read_manifest(out) if os.path.isdir(out) else None
    if (man is not None and man["source"] == os.path.abspath(root)
        and prepare.source_changed(man) is None):
      return man
    time.sleep(2.0)
  raise UserError(f"{out}: process 0 did not finish preparing {root} in {timeout_s:.0f}s")


# ----------------------------------------------------------------------------
# Splits as arrays (evaluation) and the training handle
# ----------------------------------------------------------------------------

def _read(src, idx) -> list:
  idx = [int(i) for i in idx]
  return src.__getitems__(idx) if hasattr(src, "__getitems__") else [src[i] for i in idx]


def _images(records) -> np.ndarray:
  return np.stack([np.asarray(r["image"], np.uint8) for r in records])


def _depth(records) -> np.ndarray:
  u = np.stack([np.asarray(r["depth"], np.uint16) for r in records])
  return folders.png_value_to_depth(u.astype(np.float32) / 65535.0)


def _name(r) -> str:
  n = r["name"]
  return n.decode() if isinstance(n, bytes) else str(n)


def read_split(prep: Prepared, split: str, with_depth: bool, chunk: int = 1024) -> dict:
  """All records of a split: images uint8 NxSxSx3, depth float32 NxSxS metric
  (with_depth), names."""
  src = prep.data_source(split)
  n = len(src)
  imgs, deps, names = [], [], []
  for s in range(0, n, chunk):
    recs = _read(src, range(s, min(s + chunk, n)))
    imgs.append(_images(recs))
    if with_depth:
      deps.append(_depth(recs))
    names += [_name(r) for r in recs]
  out = dict(images=np.concatenate(imgs), names=names)
  if with_depth:
    out["depth"] = np.concatenate(deps)
  return out


def has_ground_truth(spec: str, split: str, cfg) -> bool:
  """Whether `--data spec` can give `split` the generator's ground truth (a
  `{split}/gt.npz` sidecar, or the generator's meta.json to rebuild it from);
  cheap: reads no images and prepares nothing. A prepared dataset is judged
  by the source folder its manifest names."""
  src = resolve_data(spec, cfg)
  man = os.path.join(src, "manifest.json")
  if os.path.isfile(man):
    try:
      with open(man, encoding="utf-8-sig") as fh:
        src = json.load(fh).get("source", src)
    except (OSError, ValueError):
      return False
  return (os.path.isfile(os.path.join(src, split, synthetic.GT_FILE))
          or os.path.isfile(os.path.join(src, "meta.json")))


def load_split(spec: str, split: str, cfg, need_depth: bool = True, with_gt: bool = True,
               cache=None) -> dict:
  """A split of `--data spec` in memory: images float32 NxSxSx3 in [0, 1],
  depth float32 NxSxS metric (when the split has depth), names; with d["gt"]
  (synthetic.load_gt) when the source has a ground-truth sidecar and with_gt.
  split: 'train', 'val', 'test' or a usual variant ('validation', 'testing')."""
  split = folders.canonical_split(split)
  if missing_packages():
    d, source = _read_folder(resolve_data(spec, cfg), split, cfg, need_depth)
  else:
    prep = open_prepared(spec, cfg, cache)
    source = prep.source
    where = prep.source if os.path.isdir(prep.source) else prep.path
    if not prep.has_split(split):
      raise UserError(f"{where}: no '{split}' split folder")
    if need_depth and not prep.has_depth(split):
      raise UserError(f"{where}/{split}: no depth/ folder, so no ground truth to evaluate "
                      "against")
    d = read_split(prep, split, prep.has_depth(split))
    d["images"] = d["images"].astype(np.float32) / 255.0
  if with_gt and "depth" in d and os.path.isdir(source):
    try:  # a folder this generator exported before sidecars existed: add them
      synthetic.write_missing_gt(source)
    except OSError as e:
      cliutil.log(f"note: {source}: cannot add the ground-truth sidecars ({e.strerror}); "
                  "no diagnostics")
    gt = synthetic.load_gt(source, split, d["names"], cfg.image_size, cfg.crop or None,
                           model.camera(cfg))
    if gt is not None:
      d["gt"] = gt
  return d


def _read_folder(root: str, split: str, cfg, need_depth: bool):
  """(split arrays, source) read with the folder readers, no prepared copy
  (only where the prepared-dataset packages are missing)."""
  crop = cfg.crop or None
  if not os.path.isdir(root):
    raise UserError(f"data folder {root} not found")
  found = folders.split_folders(root)  # the same split names as `prepare.scan`
  if not found:  # a plain folder: all of it is train
    if split != "train":
      raise UserError(f"{root}: no '{split}' split folder")
    folders.check_not_held_out(root, folders.list_images(root))
    return folders.load_image_folder(root, cfg.image_size, crop), root
  folder = found.get(split)
  if folder is None:
    raise UserError(f"{root}: no '{split}' split folder")
  if os.path.isdir(os.path.join(folder, "depth")):
    return folders.load_synface(root, split, cfg.image_size, crop, folder=folder), root
  if need_depth:
    raise UserError(f"{folder}: no depth/ folder, so no ground truth to evaluate against")
  imgs = os.path.join(folder, "image")
  imgs = imgs if os.path.isdir(imgs) else folder
  if split == "train":
    folders.check_not_held_out(imgs, folders.list_images(imgs))
  return folders.load_image_folder(imgs, cfg.image_size, crop), root


@dataclasses.dataclass
class TrainSplit:
  """The training split of a prepared dataset, as `train.fit` reads it.

  n: image count; shape: (S, S, 3); images: uint8 NxSxSx3 when the split is
  small enough to hold in memory (IN_MEMORY_BYTES), else None (streamed)."""
  prepared: Prepared
  split: str
  n: int
  images: np.ndarray | None = None

  @property
  def shape(self) -> tuple:
    return (self.prepared.size, self.prepared.size, 3)


def train_split(prep: Prepared, split: str = "train") -> TrainSplit:
  n = int(prep.manifest["splits"][split]["n"])
  ts = TrainSplit(prep, split, n)
  if n * prep.size * prep.size * 3 <= IN_MEMORY_BYTES:
    ts.images = read_split(prep, split, False)["images"]
  return ts


def load_train_data(spec: str, cfg, cache=None, workers=None, notes=None):
  """(the training images: a TrainSplit, or arrays where prepared datasets are
  unavailable; the val split as arrays, or None when it has no depth).
  notes: see `open_prepared`."""
  if missing_packages():
    root = resolve_data(spec, cfg)
    train = load_split(root, "train", cfg, need_depth=False, with_gt=False)
    return train, (load_split(root, "val", cfg) if has_depth(root, cfg, "val") else None)
  prep = open_prepared(spec, cfg, cache, workers, notes)
  if not prep.has_split("train"):
    raise UserError(f"{prep.source}: no 'train' split")
  val = load_split(spec, "val", cfg, cache=cache) if prep.has_depth("val") else None
  return train_split(prep), val


def sample_images(train_data, n: int = 512) -> np.ndarray:
  """Up to n training images spread evenly over the split, uint8 or float
  NxSxSx3 as stored (a TrainSplit streamed from disk reads only those)."""
  total = num_images(train_data)
  idx = np.unique(np.linspace(0, total - 1, min(n, total)).astype(np.int64))
  if isinstance(train_data, TrainSplit):
    if train_data.images is not None:
      return train_data.images[idx]
    return _images(_read(train_data.prepared.data_source(train_data.split), idx.tolist()))
  return np.asarray(train_data["images"])[idx]


def num_images(train_data) -> int:
  return train_data.n if isinstance(train_data, TrainSplit) else int(train_data["images"].shape[0])


def fingerprint(train_data) -> dict:
  """Image count, shape and content hash of the training images.

  Arrays and in-memory splits: BLAKE2b of the float32 pixels the model sees
  (after crop and resize; uint8 scaled to [0, 1]), computed in chunks. Streamed splits:
  the prepared dataset's source hash (reading every image would cost a pass
  over the data at each start)."""
  if not isinstance(train_data, TrainSplit):
    x = np.asarray(train_data["images"])
  elif train_data.images is not None:
    x = train_data.images
  else:
    man = train_data.prepared.manifest
    return dict(n_images=train_data.n, image_shape=list(train_data.shape),
                hash="prepared:" + man["source_hash"][:24])
  h = hashlib.blake2b(digest_size=12)
  for s in range(0, x.shape[0], 1024):
    c = x[s:s + 1024]
    c = c.astype(np.float32) / 255.0 if c.dtype == np.uint8 else c.astype(np.float32)
    h.update(np.ascontiguousarray(c).data)
  return dict(n_images=int(x.shape[0]), image_shape=list(x.shape[1:]), hash=h.hexdigest())


# ----------------------------------------------------------------------------
# The training batches (grain)
# ----------------------------------------------------------------------------

def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """Indices of the batch for `step`: a fresh permutation per epoch, derived
  from (seed, epoch) only, so a resumed run sees exactly the same batches."""
  per_epoch = max(n // batch_size, 1)
  epoch, k = divmod(step, per_epoch)
  perm = np.random.default_rng([seed, epoch]).permutation(n)
  if n < batch_size:  # tiny datasets: sample with wrap-around
    perm = np.resize(perm, batch_size)
  return perm[k * batch_size:(k + 1) * batch_size]


class _StepBatch:
  """grain map: step -> this process's slice of the global batch (uint8, or
  the caller's array dtype). Picklable (worker processes open the data
  source themselves)."""

  def __init__(self, train_data, batch_size: int, seed: int, shard=(0, 1)):
    self.batch_size, self.seed, self.shard = batch_size, seed, shard
    if isinstance(train_data, TrainSplit):
      self.n, self.array = train_data.n, train_data.images
      self.prep, self.split = train_data.prepared, train_data.split
    else:
      self.n, self.array = int(train_data["images"].shape[0]), train_data["images"]
      self.prep = self.split = None
    self._src = None

  def __getstate__(self):
    return dict(self.__dict__, _src=None)

  def __call__(self, step) -> np.ndarray:
    idx = batch_indices(self.n, self.batch_size, self.seed, int(step))
    i, count = self.shard
    per = self.batch_size // count
    idx = idx[i * per:(i + 1) * per]
    if self.array is not None:
      x = self.array[idx]
    else:
      if self._src is None:
        self._src = self.prep.data_source(self.split)
      x = _images(_read(self._src, idx))
    return x  # uint8 stays uint8 here: 4x less to pass between processes


class _StepIter:
  """grain's iterator protocol over map(range(start, stop)) in-process, for
  machines without grain (in-memory data only)."""

  def __init__(self, fn, start: int, stop: int):
    self.fn, self.next, self.stop = fn, start, stop

  def __iter__(self):
    return self

  def __next__(self):
    if self.next >= self.stop:
      raise StopIteration
    self.next += 1
    return self.fn(self.next - 1)

  def get_state(self) -> dict:
    return dict(next=self.next)

  def set_state(self, state: dict):
    self.next = int(state["next"])


def _grain():
  """grain, with absl flags marked parsed (grain reads its flags' defaults;
  the CLI never parses absl flags); None where it is not installed."""
  if missing_packages():
    return None
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  import grain
  return grain


class Batches:
  """Iterator over the batches of steps [start, steps) (grain DatasetIterator).

  state(): a JSON-able dict saved with each checkpoint; Batches(...,
  state=saved) continues exactly there. workers: 0 reads in the training
  process (with a prefetch thread); N > 0 uses N grain worker processes
  (streamed datasets: default 2). shard: (process index, process count): each
  process yields only its rows of the global batch.
  """

  def __init__(self, train_data, batch_size: int, seed: int, start: int, steps: int,
               workers=None, shard=(0, 1), state=None):
    grain = _grain()
    if batch_size % shard[1]:
      raise UserError(f"batch_size {batch_size} must divide over {shard[1]} processes")
    streamed = isinstance(train_data, TrainSplit) and train_data.images is None
    self.workers = (2 if streamed else 0) if workers is None else int(workers)
    if grain is None:
      self.workers = -1  # marks the state as the in-process iterator's
    if state is not None and (state.get("workers") != self.workers
                              or state.get("next_step") != start):
      state = None  # another worker count (or an old checkpoint): the same batches anyway
    self.start = start if state is None else int(state["start"])
    self.step = start
    fn = _StepBatch(train_data, batch_size, seed, tuple(shard))
    stop = max(steps, self.start)
    if grain is None:
      it = _StepIter(fn, self.start, stop)
    else:
      ds = grain.MapDataset.range(self.start, stop).map(fn)
      it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
      if self.workers:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers))
    self._it = iter(it)
    if state is not None:
      self._it.set_state(state["grain"])

  def __iter__(self):
    return self

  def __next__(self) -> np.ndarray:
    """The next batch, float32 BxSxSx3 in [0, 1] (arrays given as float: as given)."""
    x = next(self._it)
    self.step += 1
    return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x

  def state(self) -> dict:
    return dict(start=self.start, next_step=self.step, workers=self.workers,
                grain=self._it.get_state())

  def close(self):
    close = getattr(self._it, "close", None)
    if close is not None:
      close()
