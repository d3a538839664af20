"""Compatibility names: the data stages now live in their own modules.

  * `scr_jax.folders`: the image / depth readers, crop + resize, folder loaders;
  * `scr_jax.synthetic`: the procedural generator, synface export, gt sidecars;
  * `scr_jax.prepare` / `scr_jax.dataset`: prepared (array_record) datasets and
    the one data entry point that train, eval, search and reproduce use;
  * `scr_jax.tfds_synface`: the generator as a TFDS builder (lazy here).
New code imports those modules; this one only re-exports their names.
"""
from __future__ import annotations

from scr_jax.errors import UserError  # noqa: F401
from scr_jax.folders import (  # noqa: F401
    TRAIN_BACKGROUND_RGB, _crop_box, _report, crop_box_resize, crop_resize,
    depth_to_png_value, image_extensions, list_images, load_image_folder, load_synface,
    png_value_to_depth, preview_grid, read_depth_png, read_image)
from scr_jax.synthetic import (  # noqa: F401
    GT_CONVENTION, GT_FILE, SPLITS, VARIANTS, GenConfig, Variant, canonical_face,
    canonical_gt, export_synface, generate_split, generate_splits, get_variant,
    iter_split, load_gt, sample_params, sample_rng, write_missing_gt)


def _tfds_module():
  try:
    from scr_jax import tfds_synface  # optional dependency: imported on use
  except ImportError as e:
    raise UserError(f"TFDS data needs tensorflow-datasets and array_record ({e}); "
                    "use a synface folder instead") from None
  return tfds_synface


def build_tfds(*args, **kw):
  """`tfds_synface.build_tfds` (imported on first use)."""
  return _tfds_module().build_tfds(*args, **kw)


def load_tfds(*args, **kw):
  """`tfds_synface.load_tfds` (imported on first use)."""
  return _tfds_module().load_tfds(*args, **kw)
