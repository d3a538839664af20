"""TFDS builder of the procedural synface data (array_record, no TensorFlow).

Works with tensorflow-datasets + array_record alone: records are written as
array_record and read back with `builder.as_data_source(split)`, whose feature
decoding is numpy/PIL. Two TF-only paths are avoided on purpose:
  * `tfds.features.Image` encodes numpy arrays with tf.image.encode_png, so
    images are handed over as PNG bytes encoded here with PIL;
  * `dataset_info_from_configs` reads package metadata files, so `_info`
    builds `tfds.core.DatasetInfo` directly.
`as_dataset` (tf.data) is never used.

This module imports tensorflow_datasets at import time; `scr_jax.data`
imports it lazily. It imports the generator (`synthetic`) and the readers
(`folders`), never the other way round.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from scr_jax import folders, synthetic
from scr_jax.errors import UserError

NAME = "scr_synface"
VERSION = "1.0.0"


class _DropNoise(logging.Filter):
  """Drops two harmless absl warnings that would be printed on every run."""
  _PREFIXES = ("OpenCV is not installed", "Using custom data configuration")

  def filter(self, record):
    return not str(record.msg).startswith(self._PREFIXES)


logging.getLogger("absl").addFilter(_DropNoise())


@dataclasses.dataclass(eq=False)
class SynFaceConfig(tfds.core.BuilderConfig):
  """Image size, split counts, seed and generator parameters (GenConfig json)."""
  size: int = 64
  n_train: int = 800
  n_val: int = 100
  n_test: int = 100
  seed: int = 0
  gen: dict = dataclasses.field(default_factory=lambda: synthetic.GenConfig().to_json())


def config_name(size, n_train, n_val, n_test, seed, cfg=synthetic.GenConfig()) -> str:
  """Deterministic config name, e.g. 's64_n800-100-100_seed0' (+ '_g<hash>'
  when the generator parameters differ from the defaults)."""
  name = f"s{size}_n{n_train}-{n_val}-{n_test}_seed{seed}"
  if cfg != synthetic.GenConfig():
    blob = json.dumps(cfg.to_json(), sort_keys=True).encode()
    name += "_g" + hashlib.sha1(blob).hexdigest()[:8]
  return name


def make_config(size=64, n_train=800, n_val=100, n_test=100, seed=0,
                cfg: synthetic.GenConfig = synthetic.GenConfig()) -> SynFaceConfig:
  return SynFaceConfig(
      name=config_name(size, n_train, n_val, n_test, seed, cfg),
      version=VERSION, size=size, n_train=n_train, n_val=n_val, n_test=n_test,
      seed=seed, gen=cfg.to_json(),
      description=f"{size}x{size} procedural faces, {n_train}/{n_val}/{n_test}, seed {seed}")


def _png(img_HxWx3: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(img_HxWx3).save(buf, format="png")
  return buf.getvalue()


class SynFace(tfds.core.GeneratorBasedBuilder):
  """Procedural roughly symmetric faces with ground-truth depth (no download)."""
  VERSION = tfds.core.Version(VERSION)
  BUILDER_CONFIGS = [make_config(64), make_config(32), make_config(16)]
  name = NAME

  def _info(self):
    c = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description=("Procedural, roughly left-right symmetric face-like height "
                     "fields rendered from random views and lights (scr_jax.synthetic)."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(c.size, c.size, 3)),
            "depth": tfds.features.Tensor(shape=(c.size, c.size), dtype=np.float32),
            "name": tfds.features.Text(),
        }),
        # Keep generation order, so record i is sample i of the split.
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(seed=c.seed, size=c.size, gen=c.gen),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    c = self.builder_config
    counts = dict(train=c.n_train, val=c.n_val, test=c.n_test)
    return {s: self._generate_examples(s, n) for s, n in counts.items() if n > 0}

  def _generate_examples(self, split, n):
    c = self.builder_config
    cfg = synthetic.GenConfig.from_json(c.gen)
    for batch in synthetic.iter_split(n, c.size, c.seed, split, cfg):
      for img, z, name in zip(batch["images"], batch["depth"], batch["names"]):
        yield name, dict(image=_png(img), depth=z, name=name)


def _build(data_dir: str, size: int = 64, n_train: int = 800, n_val: int = 100,
               n_test: int = 100, seed: int = 0, cfg: synthetic.GenConfig = synthetic.GenConfig(),
               quiet: bool = True) -> SynFace:
  """Generates (once; reused when present) and returns the prepared builder.

  Data lands in data_dir/scr_synface/<config_name>/1.0.0/.
  """
  conf = make_config(size, n_train, n_val, n_test, seed, cfg)
  # A predefined config must be passed by name (TFDS rejects a twin object).
  if conf.name in SynFace.builder_configs:
    conf = conf.name
  builder = SynFace(data_dir=os.fspath(data_dir), config=conf, file_format="array_record")
  if quiet:
    tfds.display_progress_bar(False)
  try:
    out = contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext()
    with out:
      builder.download_and_prepare()
  finally:
    if quiet:
      tfds.display_progress_bar(True)
  return builder


def _find_prepared(data_dir: str, config: str | None) -> str:
  """Path of a prepared <data_dir>/scr_synface/<config>/<version> folder."""
  root = os.path.join(os.fspath(data_dir), NAME)
  if not os.path.isdir(root):
    raise UserError(f"{root}: no prepared {NAME} dataset (run build_tfds first)")
  found = sorted(c for c in os.listdir(root)
                 if os.path.isfile(os.path.join(root, c, VERSION, "dataset_info.json")))
  if config is not None:
    if config not in found:
      raise UserError(f"{os.path.join(root, config)}: config not prepared "
                      f"(prepared: {', '.join(found) or 'none'})")
  elif len(found) == 1:
    config = found[0]
  else:
    raise UserError(f"{root}: {'no' if not found else 'several'} prepared configs "
                    f"({', '.join(found) or 'none'}); pass config=NAME")
  return os.path.join(root, config, VERSION)


def _load(data_dir_or_builder, split: str = "train", image_size=None, crop=None,
              config: str | None = None, limit=None) -> dict:
  """Reads a split with `as_data_source` (no TensorFlow), like `load_synface`.

  data_dir_or_builder: a builder from `build_tfds`, or the data_dir it used
  (then `config` picks one of several prepared configs). Returns dict: images
  float32 NxHxWx3 in [0, 1], depth float32 NxHxW metric, names.
  """
  if isinstance(data_dir_or_builder, tfds.core.DatasetBuilder):
    builder = data_dir_or_builder
  else:
    path = _find_prepared(data_dir_or_builder, config)
    builder = tfds.builder_from_directory(path)
  if split not in builder.info.splits:
    raise UserError(f"{builder.data_dir}: no split '{split}' "
                    f"(have: {', '.join(sorted(builder.info.splits))})")
  source = builder.as_data_source(split)
  n = len(source) if limit is None else min(limit, len(source))
  images, depths, names = [], [], []
  for s in range(0, n, 256):
    for ex in source.__getitems__(list(range(s, min(s + 256, n)))):
      images.append(np.asarray(ex["image"], np.float32) / 255.0)
      depths.append(np.asarray(ex["depth"], np.float32))
      nm = ex["name"]
      names.append(nm.decode() if isinstance(nm, bytes) else str(nm))
  if not names:
    raise UserError(f"{builder.data_dir}: split '{split}' is empty")
  if image_size is not None or crop is not None:
    where = f"{builder.data_dir}[{split}]"
    images = [folders.crop_resize(x, image_size, crop, where) for x in images]
    depths = [folders.crop_resize(x, image_size, crop, where) for x in depths]
  return dict(images=np.stack(images), depth=np.stack(depths), names=names)


def build_tfds(data_dir: str, size: int = 64, n_train: int = 800, n_val: int = 100,
               n_test: int = 100, seed: int = 0, **kw) -> SynFace:
  """Generates (once; reused when present) and returns the prepared builder;
  also writes the ground-truth sidecars as <builder.data_dir>/{split}/gt.npz
  (see `synthetic.load_gt`). Data lands in data_dir/scr_synface/<config>/1.0.0/."""
  builder = _build(data_dir, size, n_train, n_val, n_test, seed, **kw)
  cfg = kw.get("cfg", synthetic.GenConfig())
  for split, n in dict(train=n_train, val=n_val, test=n_test).items():
    path = os.path.join(builder.data_dir, split, synthetic.GT_FILE)
    if n and not os.path.exists(path):
      os.makedirs(os.path.dirname(path), exist_ok=True)
      synthetic._save_gt(path, synthetic.canonical_gt(n, size, seed, split, cfg))
  return builder


def load_tfds(data_dir, split: str = "train", image_size=None, crop=None, **kw) -> dict:
  """`_load` plus d["gt"] (`synthetic.load_gt`) when the prepared dataset has
  a ground-truth sidecar for the split."""
  d = _load(data_dir, split, image_size, crop, **kw)
  root = (data_dir.data_dir if hasattr(data_dir, "data_dir")
          else _find_prepared(data_dir, kw.get("config")))
  gt = synthetic.load_gt(root, split, d["names"], image_size, crop)
  if gt is not None:
    d["gt"] = gt
  return d
