"""Where a run's data comes from: the built-in generated sets (made once under
ROOT/data), a synface-layout folder or a plain image folder, as arrays.

Moved verbatim from experiments/run.py so that the CLI, reproduce and the
benchmark scripts share one implementation.
"""
from __future__ import annotations

import os
import sys

from scr_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _log(msg):
  print(msg, file=sys.stderr, flush=True)


BUILTIN_COUNTS = dict(n_train=4000, n_val=500, n_test=500)


def builtin_dir(size: int, seed: int = 0, variant: str = "default", data_root=None) -> str:
  name = f"builtin_s{size}_seed{seed}" if variant == "default" else \
      f"builtin_{variant}_s{size}_seed{seed}"
  return os.path.join(data_root or os.path.join(ROOT, "data"), name)


def ensure_builtin(size: int, seed: int = 0, variant: str = "default", counts=None,
                   data_root=None) -> str:
  """Generates the built-in synthetic dataset (of a named generator variant,
  data.VARIANTS) once (synface layout + ground-truth sidecars) and reuses it
  afterwards; data made before sidecars existed gets them added."""
  from scr_jax import data
  gen = data.get_variant(variant).gen
  path = builtin_dir(size, seed, variant, data_root)
  if not os.path.exists(os.path.join(path, "meta.json")):
    _log(f"generating built-in synthetic faces ({variant}) at {size}x{size} into {path} (once)")
    data.export_synface(path, size=size, seed=seed, overwrite=True, cfg=gen,
                        **(counts or BUILTIN_COUNTS))
  else:
    data.write_missing_gt(path)
  return path


def resolve_data(spec: str, cfg) -> str:
  """'builtin', 'builtin:VARIANT' (generated once, at the variant's export
  size or the config's image size) or a folder path -> the folder."""
  if spec == "builtin" or spec.startswith("builtin:"):
    from scr_jax import data
    name = spec.split(":", 1)[1] if ":" in spec else "default"
    size = data.get_variant(name).export_size or cfg.image_size
    return ensure_builtin(size, 0, name)
  return spec


def load_split(spec: str, split: str, cfg, need_depth: bool = True, with_gt: bool = True):
  """`spec` = 'builtin[:VARIANT]' or a synface-layout folder; returns the data
  dict, with d["gt"] (data.load_gt) when the split has a ground-truth sidecar
  and with_gt."""
  from scr_jax import data
  root = resolve_data(spec, cfg)
  if not os.path.isdir(root):
    raise UserError(f"data folder {root} not found")
  if not os.path.isdir(os.path.join(root, split)):
    raise UserError(f"{root}: no '{split}' split folder")
  if os.path.isdir(os.path.join(root, split, "depth")):
    d = data.load_synface(root, split, cfg.image_size, cfg.crop or None)
    if with_gt:
      from scr_jax import model
      try:  # a folder this generator exported before sidecars existed: add them
        data.write_missing_gt(root)
      except OSError as e:
        _log(f"note: {root}: cannot add the ground-truth sidecars ({e.strerror}); "
             "no diagnostics")
      gt = data.load_gt(root, split, d["names"], cfg.image_size, cfg.crop or None,
                        model.camera(cfg))
      if gt is not None:
        d["gt"] = gt
    return d
  if need_depth:
    raise UserError(f"{root}/{split}: no depth/ folder, so no ground truth to evaluate against")
  imgs = os.path.join(root, split, "image")
  return data.load_image_folder(imgs if os.path.isdir(imgs) else os.path.join(root, split),
                                cfg.image_size, cfg.crop or None)


def baselines_for(spec: str, test: dict, cfg):
  """metrics.baseline_summaries on `test` (a loaded split of `spec`): constant,
  average GT depth and, when both splits carry the generator's ground truth,
  the template baseline. None when `spec` has no train split with depth."""
  from scr_jax import metrics, model
  root = resolve_data(spec, cfg)
  if not os.path.isdir(os.path.join(root, "train", "depth")):
    return None
  trn = load_split(spec, "train", cfg)
  return metrics.baseline_summaries(test["depth"], trn["depth"], model.camera(cfg),
                                    **metrics.template_kwargs(test, trn))


def load_train_data(spec: str, cfg):
  """Training images (ground truth optional) and, when present, val data."""
  from scr_jax import data
  root = resolve_data(spec, cfg)
  if not os.path.exists(root):
    raise UserError(f"data {root} not found")
  if os.path.isdir(os.path.join(root, "train")):
    train = load_split(root, "train", cfg, need_depth=False, with_gt=False)
    val = None
    if os.path.isdir(os.path.join(root, "val", "depth")):
      val = load_split(root, "val", cfg)
    return train, val
  # a plain folder of images: train on all of them, no validation
  return data.load_image_folder(root, cfg.image_size, cfg.crop or None), None
