"""Folder readers: the one image reader, depth PNGs, crop + resize, folder listing.

What train, eval, predict and `prepare` read from disk, all returning numpy:
  * `read_image` / `read_depth_png`: one file, any format Pillow opens (EXIF
    orientation, transparency, 16-bit), one-line UserError for bad files;
  * `crop_resize` / `crop_box_resize`: centre or box crop, then bilinear resize;
  * `list_images`, `load_image_folder`: image-only folders (CelebA crops, cat faces);
  * `load_synface`: Unsup3D's synface layout
    `DIR/{train,val,test}/{image,depth}/NNNNNN_{image,depth}.png`.
This module imports no other stage (generator, prepared datasets).

Depth PNG convention (Unsup3D's): a value v in [0, 1] means
z = 1.0 + 0.1 * ((1 - v) * 2 - 1), i.e. v = (1.1 - z) / 0.2: bright = near,
black = far = background.
"""
from __future__ import annotations

import functools
import os
import re

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from scr_jax import cliutil
from scr_jax.errors import UserError

# Unsup3D's depth PNG mapping (fixed, independent of the camera range).
_PNG_DEPTH_MID, _PNG_DEPTH_HALF = 1.0, 0.1


# ----------------------------------------------------------------------------
# Depth <-> PNG
# ----------------------------------------------------------------------------

def depth_to_png_value(z):
  """Metric depth -> Unsup3D PNG value v in [0, 1] (bright = near)."""
  return np.clip((_PNG_DEPTH_MID + _PNG_DEPTH_HALF - np.asarray(z, np.float64))
                 / (2 * _PNG_DEPTH_HALF), 0.0, 1.0)


def png_value_to_depth(v):
  """Unsup3D PNG value v in [0, 1] -> metric depth z = 1 + 0.1 ((1 - v) 2 - 1)."""
  v = np.asarray(v, np.float32)
  return (_PNG_DEPTH_MID + _PNG_DEPTH_HALF * ((1.0 - v) * 2.0 - 1.0)).astype(np.float32)


def _save_depth_png(path, z_HxW, bits):
  v = depth_to_png_value(z_HxW)
  if bits == 16:
    Image.fromarray(np.round(v * 65535).astype(np.uint16)).save(path)
  elif bits == 8:  # Unsup3D's own files: 8-bit RGB, all channels equal
    q = np.round(v * 255).astype(np.uint8)
    Image.fromarray(np.repeat(q[..., None], 3, axis=-1)).save(path)
  else:
    raise UserError(f"depth_bits must be 8 or 16, got {bits}")


# ----------------------------------------------------------------------------
# Reading images safely: one reader for train, eval and predict
# ----------------------------------------------------------------------------

# Background of the built-in data, RGB in [0, 1]. The generator renders each
# face with `render.render_view`, which leaves every pixel the surface does not
# cover at 0: black. Transparent pixels of an input image are composited onto
# this colour, so a cut-out face looks like what the model saw in training.
TRAIN_BACKGROUND_RGB = (0.0, 0.0, 0.0)
_16BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_EXIF_ORIENTATION = 0x0112


# Formats Pillow registers but cannot decode by itself: video (MPEG, only
# identified), PostScript (needs Ghostscript) and IPTC metadata files.
_NOT_PICTURES = ("MPEG", "EPS", "IPTC")


@functools.lru_cache(maxsize=None)
def image_extensions() -> tuple:
  """Extensions (lower case, with the dot) of every picture format this Pillow
  decodes: taken from its registered plugins (PNG, JPEG, WebP, BMP, TIFF, GIF,
  AVIF, ...), so the folder loaders read whatever the installed Pillow reads.
  Left out: identify-only stubs (HDF5, GRIB, BUFR, WMF) and _NOT_PICTURES.
  """
  exts = Image.registered_extensions()  # imports Pillow's plugins once

  def decodes(fmt):
    factory = Image.OPEN.get(fmt, (None,))[0]
    stub = isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)
    return factory is not None and not stub and fmt not in _NOT_PICTURES

  return tuple(sorted(e.lower() for e, fmt in exts.items() if decodes(fmt)))


def _open_image(path: str) -> Image.Image:
  """Opens and fully decodes an image; any failure is a one-line UserError."""
  if not os.path.isfile(path):
    raise UserError(f"{path}: file not found")
  if os.path.getsize(path) == 0:
    raise UserError(f"{path}: empty file (0 bytes)")
  img = None
  try:
    img = Image.open(path)
    # The stored sample format ('RGB;16B' for a 48-bit PNG, which Pillow
    # decodes to 8-bit RGB): read_depth_png needs it to keep 16-bit precision.
    raw = img.tile[0].args if img.tile else None
    img.load()  # PIL decodes lazily: truncation only shows up here
    img.info["scr_rawmode"] = raw if isinstance(raw, str) else ""
  except Exception as e:  # PIL raises many types (OSError, SyntaxError, ...)
    if img is not None:
      img.close()
    if isinstance(e, UnidentifiedImageError):
      why = "unknown format or corrupt header"
    else:
      why = (str(e).splitlines() or [type(e).__name__])[0]
    raise UserError(f"{path}: not a readable image ({why})") from None
  return img


def _upright(img: Image.Image, path: str, notes=None) -> Image.Image:
  """Applies the EXIF orientation tag (phones store the sensor's pixels and
  say in the tag how to turn them); orientation 1 or no tag: unchanged."""
  try:
    orientation = int(img.getexif().get(_EXIF_ORIENTATION, 1))
  except Exception:  # a broken EXIF block: the pixels are still usable
    orientation = 1
    if notes is not None:
      notes.setdefault("unreadable EXIF data, orientation not applied", []).append(path)
  if orientation not in range(2, 9):
    return img
  if notes is not None:
    notes.setdefault("turned upright by its EXIF orientation tag", []).append(
        f"{path} (orientation {orientation})")
  return ImageOps.exif_transpose(img)


def _has_alpha(img: Image.Image) -> bool:
  return img.has_transparency_data and img.mode not in _16BIT_MODES + ("F",)


def _to_rgb_float(img: Image.Image, background=TRAIN_BACKGROUND_RGB) -> np.ndarray:
  """Any PIL image -> float32 HxWx3 in [0, 1].

  Grayscale is replicated to 3 channels; palette images are expanded; 16-bit
  grayscale is scaled by 1/65535; transparency (RGBA, LA, PA, palette or
  grayscale with a transparent colour) is composited onto `background` (RGB
  in [0, 1]): rgb * alpha + background * (1 - alpha).
  """
  if img.mode in _16BIT_MODES:
    a = np.asarray(img, np.float32) / 65535.0
    return np.repeat(np.clip(a, 0, 1)[..., None], 3, axis=-1)
  if img.mode == "F":
    a = np.asarray(img, np.float32)
    return np.repeat(np.clip(a, 0, 1)[..., None], 3, axis=-1)
  if _has_alpha(img):
    rgba = np.asarray(img.convert("RGBA"), np.float32) / 255.0
    alpha = rgba[..., 3:]
    bg = np.asarray(background, np.float32).reshape(1, 1, 3)
    return (rgba[..., :3] * alpha + bg * (1.0 - alpha)).astype(np.float32)
  if img.mode != "RGB":
    img = img.convert("RGB")
  return np.asarray(img, np.float32) / 255.0


def _note_mode(notes: dict, path: str, img: Image.Image):
  """Records a non-fatal conversion of an input image, reported by _report."""
  if img.mode == "RGB":
    return
  if _has_alpha(img) and np.asarray(img.convert("RGBA"))[..., 3].min() < 255:
    what = (f"mode {img.mode}, transparent pixels composited onto the training "
            f"background RGB {TRAIN_BACKGROUND_RGB} (black)")
  else:
    what = f"mode {img.mode}, converted to RGB"
  notes.setdefault(what, []).append(path)


def read_image(path: str, notes=None, background=TRAIN_BACKGROUND_RGB) -> np.ndarray:
  """The one image reader of train, eval and predict.

  Decodes any format Pillow opens, turns the image upright by its EXIF
  orientation, composites transparency onto `background` (default: the
  built-in data's TRAIN_BACKGROUND_RGB) and converts to RGB.

  Args:
    path: image file.
    notes: optional dict collecting non-fatal conversions (see _report).
    background: RGB in [0, 1] behind transparent pixels.
  Returns:
    float32 HxWx3 in [0, 1] (H, W after the EXIF rotation).
  Raises:
    UserError: missing, empty, truncated or unreadable file (one line).
  """
  img = _open_image(path)
  try:
    img = _upright(img, path, notes)
    if notes is not None:
      _note_mode(notes, path, img)
    return _to_rgb_float(img, background)
  finally:
    img.close()


_DEPTH_FORMS = ("depth PNGs must be grayscale (8- or 16-bit) or RGB with R = G = B "
                "(Unsup3D's files)")


def _to_png_value(img: Image.Image, path: str) -> np.ndarray:
  """Depth PNG -> v in [0, 1]: 16-bit grayscale / 65535 (full precision),
  8-bit gray / 255, or RGB whose channels are equal (channel 0 / 255).

  An RGB depth whose channels differ is a colour-mapped picture of depth (jet,
  viridis, ...): its scale is per-file and unknown, so it is refused rather
  than read as channel 0 (which would be a silently wrong depth).
  """
  if img.mode in _16BIT_MODES:
    a = np.asarray(img, np.float32)
    if img.mode == "I" and (a.min() < 0 or a.max() > 65535):
      raise UserError(f"{path}: 32-bit depth values outside 0..65535; {_DEPTH_FORMS}")
    return a / 65535.0
  if img.mode in ("L", "LA", "1"):
    return np.asarray(img.convert("L"), np.float32) / 255.0
  if img.mode in ("RGB", "RGBA", "P", "PA"):
    a = np.asarray(img.convert("RGB"), np.int16)
    diff = np.maximum(np.abs(a[..., 0] - a[..., 1]), np.abs(a[..., 0] - a[..., 2]))
    n_bad = int(np.count_nonzero(diff))
    if n_bad:
      raise UserError(
          f"{path}: colour-mapped depth (R, G, B differ at {n_bad} of {diff.size} pixels, "
          f"by up to {int(diff.max())} levels); {_DEPTH_FORMS}: a colour map loses the "
          "depth scale, so it is not converted")
    return a[..., 0].astype(np.float32) / 255.0
  raise UserError(f"{path}: unsupported depth image mode {img.mode}; {_DEPTH_FORMS}")


def _rgb16_png_value(path: str) -> np.ndarray:
  """v in [0, 1] of a 16-bit-per-channel RGB depth PNG with R = G = B.

  Pillow decodes such files to 8 bits per channel, so OpenCV reads them."""
  try:
    import cv2
  except ImportError:
    raise UserError(f"{path}: 16-bit RGB depth needs OpenCV to keep its precision (pip "
                    "install opencv-python-headless==4.*), or save it as 16-bit grayscale"
                    ) from None
  a = cv2.imread(path, cv2.IMREAD_UNCHANGED)
  if a is None or a.dtype != np.uint16 or a.ndim != 3:
    raise UserError(f"{path}: not a readable 16-bit RGB depth; {_DEPTH_FORMS}")
  a = a[..., :3].astype(np.int32)
  diff = np.maximum(np.abs(a[..., 0] - a[..., 1]), np.abs(a[..., 0] - a[..., 2]))
  if np.count_nonzero(diff):
    raise UserError(f"{path}: colour-mapped depth (16-bit R, G, B differ at "
                    f"{np.count_nonzero(diff)} of {diff.size} pixels); {_DEPTH_FORMS}")
  return a[..., 0].astype(np.float32) / 65535.0


def read_depth_png(path: str, notes=None) -> np.ndarray:
  """Depth PNG (Unsup3D's convention) -> metric depth z, float32 HxW.

  v in [0, 1] (16-bit / 65535, also 16-bit RGB with R = G = B, or 8-bit / 255)
  maps to z = 1 + 0.1 ((1 - v) 2 - 1). Raises UserError for unreadable files
  and colour-mapped (channel-unequal) RGB.
  """
  img = _open_image(path)
  try:
    if img.mode in ("RGB", "RGBA") and ";16" in img.info.get("scr_rawmode", ""):
      return png_value_to_depth(_rgb16_png_value(path))
    return png_value_to_depth(_to_png_value(_upright(img, path, notes), path))
  finally:
    img.close()


def _crop_box(w: int, h: int, crop, path: str):
  """Centre square crop box (torchvision's rounding). crop=None: the largest
  centred square (images that are already square are left alone)."""
  side = min(w, h) if crop is None else int(crop)
  if side <= 0:
    raise UserError(f"crop must be positive, got {crop}")
  if side > w or side > h:
    raise UserError(f"{path}: crop {side} is larger than the image ({w}x{h})")
  top, left = int(round((h - side) / 2.0)), int(round((w - side) / 2.0))
  return left, top, side


def _resize_plane(a_HxW: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of one float plane with PIL (antialiased when shrinking,
  like torchvision's resize of PIL images in Unsup3D)."""
  if a_HxW.shape == (size, size):
    return a_HxW.astype(np.float32)
  im = Image.fromarray(a_HxW.astype(np.float32), mode="F")
  return np.asarray(im.resize((size, size), Image.BILINEAR), np.float32)


def _resize(a, image_size):
  if image_size is None or int(image_size) == a.shape[0]:
    return np.ascontiguousarray(a, np.float32)
  size = int(image_size)
  if size < 1:
    raise UserError(f"image_size must be positive, got {image_size}")
  if a.ndim == 2:
    return _resize_plane(a, size)
  return np.stack([_resize_plane(a[..., k], size) for k in range(a.shape[-1])], -1)


def crop_resize(a_HxWxC: np.ndarray, image_size, crop=None, path: str = "array"):
  """Centre-crop to `crop` px (None: largest square), then bilinear resize to
  image_size (None: keep). Works on HxW or HxWxC float arrays."""
  h, w = a_HxWxC.shape[:2]
  left, top, side = _crop_box(w, h, crop, path)
  return _resize(a_HxWxC[top:top + side, left:left + side], image_size)


def crop_box_resize(a_HxWxC: np.ndarray, left: int, top: int, side: int, image_size):
  """Square crop [top, top + side) x [left, left + side) that may reach past
  the image (the border pixels are replicated there, as Unsup3D's CelebA and
  demo crops do), then bilinear resize to image_size (None: keep)."""
  h, w = a_HxWxC.shape[:2]
  if side < 1:
    raise UserError(f"crop box side must be positive, got {side}")
  pad = [(max(0, -top), max(0, top + side - h)), (max(0, -left), max(0, left + side - w))]
  pad += [(0, 0)] * (a_HxWxC.ndim - 2)
  a = np.pad(a_HxWxC, pad, mode="edge")
  t, l = top + pad[0][0], left + pad[1][0]
  return _resize(a[t:t + side, l:l + side], image_size)


def flat_image(img_HxWx3, min_std: float = 0.03, max_flat: float = 0.9):
  """Why an image is no picture to reconstruct, or None.

  An image whose brightness barely varies (standard deviation below
  `min_std`, in [0, 1] units: blank, a constant colour, JPEG noise on a
  wall), or whose pixels lie, for a fraction `max_flat` or more, within 0.04
  of one colour (its median: padding, an empty centre square with a sliver of
  content): the model still outputs a face-shaped depth for it, which means
  nothing. The built-in data's faces on black stay below 0.8.
  img_HxWx3: float in [0, 1].
  """
  x = np.asarray(img_HxWx3, np.float32)
  y = x @ np.asarray([0.299, 0.587, 0.114], np.float32)
  std = float(y.std())
  if std < min_std:
    return f"blank or nearly constant (brightness std {std:.3f} of 1)"
  med = np.median(x.reshape(-1, x.shape[-1]), axis=0)
  frac = float(np.mean(np.abs(x - med).max(-1) < 0.04))
  if frac >= max_flat:
    rgb = ", ".join(str(int(round(v * 255))) for v in med)
    return f"{frac:.0%} of it is one flat colour (RGB {rgb})"
  return None


# ----------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------

def _note_size(notes: dict, path: str, shape, image_size, crop):
  """Records a resize of an image whose size is not the model's."""
  h, w = shape[:2]
  if image_size is not None and crop is None and (w, h) != (int(image_size),) * 2:
    notes.setdefault(f"not {image_size}x{image_size}, centre-cropped and resized",
                     []).append(f"{path} ({w}x{h})")


def _note_ignored(notes: dict, folder: str, suffixes):
  """Records the entries of a folder that a loader skips (wrong name or
  extension, sub-folders)."""
  for f in sorted(os.listdir(folder)):
    p = os.path.join(folder, f)
    if os.path.isdir(p):
      notes.setdefault("a sub-folder, not read", []).append(p)
    elif not f.lower().endswith(tuple(suffixes)):
      notes.setdefault(f"not {' / '.join('*' + x for x in suffixes)}, ignored",
                       []).append(p)


def _report(notes: dict):
  """One stderr line per kind of conversion or skip: the first file and the count."""
  for what, paths in notes.items():
    more = f" and {len(paths) - 1} more" if len(paths) > 1 else ""
    cliutil.log(f"note: {paths[0]}{more}: {what}")


def _list_files(folder: str, suffixes) -> list:
  return sorted(f for f in os.listdir(folder)
                if f.lower().endswith(tuple(suffixes))
                and os.path.isfile(os.path.join(folder, f)))


def list_images(folder: str, recursive: bool = True, notes=None, exclude=()) -> list:
  """Image files in a folder (and, by default, its sub-folders), sorted.

  Files are images by their extension (`image_extensions()`: every format
  Pillow opens). Nested layouts such as the Cat dataset's cats/CAT_00/... are
  read with recursive=True. Everything skipped is recorded in `notes`: files
  that are not images (e.g. Cat-dataset *.cat landmark files), hidden entries
  (.DS_Store, .ipynb_checkpoints/), folders in `exclude` (e.g. predict's own
  output folder), and with recursive=False the images in sub-folders. Linked
  folders are followed, each real folder read once.

  Returns:
    list of paths (folder joined with the relative path), sorted by that path.
  Raises:
    UserError: folder missing, a file, or holding no image.
  """
  if os.path.isfile(folder):
    raise UserError(f"{folder}: is a file, not a folder of images (give the folder, or "
                    "the files to predict)")
  if not os.path.isdir(folder):
    raise UserError(f"{folder}: image folder not found")
  exts = image_extensions()
  notes = {} if notes is None else notes
  found, seen = [], set()
  skip = {os.path.realpath(x) for x in exclude}
  for d, dirs, files in os.walk(folder, followlinks=True):
    if os.path.realpath(d) in seen:  # a link back to a folder already read
      notes.setdefault("a link to a folder already read, not read twice", []).append(d)
      dirs[:] = []
      continue
    seen.add(os.path.realpath(d))
    keep = []
    for x in sorted(dirs):
      p = os.path.join(d, x)
      if x.startswith("."):
        notes.setdefault("hidden folder, not read", []).append(p)
      elif os.path.realpath(p) in skip:
        notes.setdefault("the output folder, not read", []).append(p)
      else:
        keep.append(x)
    dirs[:] = keep
    top = os.path.normpath(d) == os.path.normpath(folder)
    for f in sorted(files):
      p = os.path.join(d, f)
      if f.startswith("."):
        notes.setdefault("hidden file, ignored", []).append(p)
      elif not f.lower().endswith(exts):
        notes.setdefault("not an image (by its extension), ignored", []).append(p)
      elif top or recursive:
        found.append(p)
      else:
        notes.setdefault("image in a sub-folder, not read (recursive reading is off)",
                         []).append(p)
  if not found:
    where = " or its sub-folders" if recursive else ""
    raise UserError(f"{folder}: no *.png / *.jpg / *.webp / ... images in it{where} "
                    "(any format Pillow opens)")
  return sorted(found, key=lambda p: os.path.relpath(p, folder))


# ----------------------------------------------------------------------------
# Split folders: train / val / test under the names people give them
# ----------------------------------------------------------------------------

SPLITS = ("train", "val", "test")
# Words (of a folder name cut at separators, case and digits) that name a split.
SPLIT_WORDS = {
    "train": ("train", "training", "trn", "trainset", "trainingset", "traindata"),
    "val": ("val", "valid", "validation", "validate", "validating", "dev", "development",
            "valset", "validset", "validationset", "valdata"),
    "test": ("test", "testing", "tst", "testset", "testdata"),
}
_WORD_SPLIT = {w: split for split, words in SPLIT_WORDS.items() for w in words}
# Words of held-out folders that are no split of ours (eval_results/ beside train/ is
# left alone), but are never trained on inside a folder of training images.
_HELD_OUT_WORDS = ("eval", "evaluation", "holdout", "heldout")
# Names that join two splits in one word (PASCAL's trainval): never a training split.
_JOINED = {"trainval": ("train", "val"), "trainvalid": ("train", "val"),
           "trainvaltest": ("train", "val", "test"), "valtest": ("val", "test")}


def split_of_name(name: str):
  """The splits a folder name says it holds: () for none, ('val',) for
  'validation', 'Val_256', 'celeba-valid', 'ValSet' ...; two or more for
  names such as 'trainval' or 'train_test' (never used for training).
  Words are cut at separators, lower/upper case changes and digits."""
  words = re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+", name)
  found = []
  for w in (x.lower() for x in words):
    for split in _JOINED.get(w, (_WORD_SPLIT.get(w),)):
      if split and split not in found:
        found.append(split)
  return tuple(found)


def canonical_split(split: str) -> str:
  """'validation', 'Val', 'testing' ... -> 'val' / 'test' / 'train' (a --split
  argument); other names unchanged."""
  got = split_of_name(split)
  return got[0] if len(got) == 1 else split


def split_folders(root: str, notes=None) -> dict:
  """The split sub-folders of `root`: {split: folder path} for train / val /
  test under their usual names (case, 'training', 'validation', 'valid',
  'dev', 'testing', 'Train_set', ...); {} when no sub-folder names a split
  (a plain folder of images: all of it trains). Sub-folders that name no
  split are not read (a note in `notes`); files beside the split folders
  (preview.png, meta.json) are not read either.

  Raises:
    UserError: two folders name the same split, a folder names several
      (trainval), or split folders without one for training: one line
      naming the folders, so that held-out images are never trained on.
  """
  subs = sorted(d for d in os.listdir(root)
                if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
  found, other = {}, []
  for d in subs:
    kinds = split_of_name(d)
    if len(kinds) > 1:
      raise UserError(f"{os.path.join(root, d)}: the folder's name says it holds the "
                      f"{' and '.join(kinds)} splits together; give each split its own folder "
                      "(train/, val/, test/) so that held-out images are never trained on")
    if kinds:
      found.setdefault(kinds[0], []).append(d)
    else:
      other.append(d)
  for split, ds in found.items():
    if len(ds) > 1:
      raise UserError(f"{root}: {', '.join(d + '/' for d in ds)} all name the {split} split; "
                      "keep one (merge or move the others)")
  if not found:
    return {}
  if "train" not in found:
    names = ", ".join(found[s][0] + "/" for s in SPLITS if s in found)
    raise UserError(f"{root}: split folders {names} but none for training (train/, "
                    "training/, ...): rename the folder of training images, or give a "
                    "folder without split sub-folders")
  if notes is not None:
    for d in other:
      notes.setdefault("a sub-folder beside the split folders whose name is no split (train/ "
                       "val/ test/ or a usual variant), not read", []).append(
                           os.path.join(root, d))
  return {split: os.path.join(root, ds[0]) for split, ds in found.items()}


def check_not_held_out(folder: str, files):
  """Refuses training images that lie in a sub-folder of `folder` whose name
  says it is a validation or test split (e.g. faces/celeba/test/...).

  Raises:
    UserError: naming that sub-folder.
  """
  seen = set()
  for f in files:
    rel = os.path.relpath(os.path.dirname(f), folder)
    if rel == "." or rel in seen:
      continue
    seen.add(rel)
    parts = rel.split(os.sep)
    for i, part in enumerate(parts):
      held = [k for k in split_of_name(part) if k != "train"]
      held += ["held-out"] * any(w.lower() in _HELD_OUT_WORDS
                                 for w in re.findall(r"[A-Za-z]+", part))
      if held:
        where = os.path.join(folder, *parts[:i + 1])
        raise UserError(f"{where}: a folder named as a {held[0]} split among the training "
                        f"images of {folder}; lay the data out as train/ val/ test/ (or rename "
                        "it), so that held-out images are never trained on")


def synface_pairs(root: str, split: str, notes=None, folder=None):
  """The (name, image path, depth path) triples of DIR/{split}/{image,depth}
  (or of `folder`/{image,depth}: the split's folder under another name),
  sorted by name; every file without its twin is a one-line UserError, and
  files that are not *_image.png / *_depth.png are recorded in `notes`."""
  if not os.path.isdir(root):
    raise UserError(f"{root}: synface folder not found")
  folder = folder or os.path.join(root, split)  # the split's folder, under its own name
  img_dir = os.path.join(folder, "image")
  dep_dir = os.path.join(folder, "depth")
  for d in (img_dir, dep_dir):
    if not os.path.isdir(d):
      raise UserError(f"{d}: missing folder (expected {split}/image and {split}/depth "
                      f"under {root})")
  imgs = {f[:-len("_image.png")]: f for f in _list_files(img_dir, ["_image.png"])}
  deps = {f[:-len("_depth.png")]: f for f in _list_files(dep_dir, ["_depth.png"])}
  if not imgs:
    raise UserError(f"{img_dir}: no *_image.png files")
  for name in sorted(imgs):
    if name not in deps:
      raise UserError(f"{os.path.join(img_dir, imgs[name])}: no depth twin "
                      f"(expected {os.path.join(dep_dir, name + '_depth.png')})")
  for name in sorted(deps):
    if name not in imgs:
      raise UserError(f"{os.path.join(dep_dir, deps[name])}: no image twin "
                      f"(expected {os.path.join(img_dir, name + '_image.png')})")
  if notes is not None:
    _note_ignored(notes, img_dir, ["_image.png"])
    _note_ignored(notes, dep_dir, ["_depth.png"])
  return [(n, os.path.join(img_dir, imgs[n]), os.path.join(dep_dir, deps[n]))
          for n in sorted(imgs)]


def read_synface_pair(ip: str, dp: str, image_size, crop, notes=None):
  """One synface sample: (image float32 SxSx3 in [0, 1], metric depth SxS),
  both centre-cropped and resized alike (depth in metric units)."""
  notes = {} if notes is None else notes
  im = read_image(ip, notes)
  z = read_depth_png(dp, notes)
  if im.shape[:2] != z.shape:
    raise UserError(f"{dp}: depth is {z.shape[1]}x{z.shape[0]} but its image "
                    f"{ip} is {im.shape[1]}x{im.shape[0]}")
  _note_size(notes, ip, im.shape, image_size, crop)
  # Resize in metric units, not PNG values (the same here: the map is affine).
  return crop_resize(im, image_size, crop, ip), crop_resize(z, image_size, crop, dp)


def read_folder_image(path: str, image_size, crop, notes=None) -> np.ndarray:
  """One image of an image folder, centre-cropped and resized (float32 SxSx3)."""
  notes = {} if notes is None else notes
  img = read_image(path, notes)
  _note_size(notes, path, img.shape, image_size, crop)
  return crop_resize(img, image_size, crop, path)


def load_synface(root: str, split: str = "train", image_size=64, crop=None,
                 limit=None, folder=None) -> dict:
  """Reads DIR/{split}/{image,depth}/*_{image,depth}.png.

  Optional centre crop to `crop` px (None: the largest centred square, a no-op
  for square images) then bilinear resize to image_size (None: keep), images
  and metric depth alike. Returns dict: images float32 NxHxWx3 in [0, 1],
  depth float32 NxHxW (metric z), names ["NNNNNN", ...] (sorted). Images go
  through `read_image` (EXIF orientation, transparency on the training
  background); depth PNGs may be 16-bit grayscale, 8-bit gray or RGB with
  equal channels (a colour-mapped RGB depth raises UserError). folder: the
  split's folder when it has another name than `split` (`split_folders`).
  """
  notes = {}
  pairs = synface_pairs(root, split, notes, folder)[:limit]
  images, depths = [], []
  for _, ip, dp in pairs:
    im, z = read_synface_pair(ip, dp, image_size, crop, notes)
    images.append(im)
    depths.append(z)
  _report(notes)
  return dict(images=np.stack(images), depth=np.stack(depths), names=[p[0] for p in pairs])


def load_image_folder(dir_or_files, image_size=64, crop=None, limit=None,
                      recursive: bool = True) -> dict:
  """Reads an image-only folder (any format Pillow opens) or a list of files.

  A folder is listed by `list_images`: sub-folders are read too unless
  recursive=False (the Cat dataset's cats/CAT_00/..., CAT_01/... layout), and
  every file skipped is named in a `note:` line. Each image goes through
  `read_image` (EXIF orientation, transparency composited on the training
  background, RGB). Centre crop to `crop` px (None: the largest centred
  square), then bilinear resize to image_size (None: keep).

  Returns:
    dict: images float32 NxHxWx3 in [0, 1]; names: paths relative to the
    folder without extension, '/'-separated ("CAT_00/0000"; file lists: the
    base name without extension); files: the paths read.
  Raises:
    UserError: missing folder, no image, unreadable file (one line).
  """
  notes = {}
  if isinstance(dir_or_files, (str, os.PathLike)):
    folder = os.fspath(dir_or_files)
    files = list_images(folder, recursive, notes)
    names = [os.path.splitext(os.path.relpath(f, folder))[0].replace(os.sep, "/")
             for f in files]
  else:
    files = [os.fspath(f) for f in dir_or_files]
    if not files:
      raise UserError("load_image_folder: empty file list")
    names = [os.path.splitext(os.path.basename(f))[0] for f in files]
  files, names = files[:limit], names[:limit]
  images = [read_folder_image(f, image_size, crop, notes) for f in files]
  _report(notes)
  return dict(images=np.stack(images), names=names, files=files)


# ----------------------------------------------------------------------------
# Preview
# ----------------------------------------------------------------------------

def preview_grid(images, depths, path: str, max_items: int = 8, min_px: int = 64,
                 max_depth: float = 1.1) -> str:
  """Writes a PNG: images on the top row, depths (grayscale, bright = near,
  stretched per image over the object) below. images: NxHxWx3 uint8 or float
  in [0, 1]; depths: NxHxW metric (or None). Returns path."""
  images = np.asarray(images)[:max_items]
  if images.dtype != np.uint8:
    images = np.round(np.clip(images, 0, 1) * 255).astype(np.uint8)
  n, h, w = images.shape[:3]
  scale = max(1, -(-min_px // h))
  rows = [np.concatenate(list(images), axis=1)]
  if depths is not None:
    tiles = []
    for z in np.asarray(depths, np.float32)[:n]:
      fg = z < max_depth - 1e-6
      lo, hi = (z[fg].min(), z[fg].max()) if fg.any() else (0.0, 1.0)
      g = np.where(fg, 0.15 + 0.85 * (hi - z) / max(hi - lo, 1e-6), 0.0)
      tiles.append(np.repeat((g * 255).astype(np.uint8)[..., None], 3, axis=-1))
    rows.append(np.concatenate(tiles, axis=1))
  grid = np.concatenate(rows, axis=0)
  grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(grid).save(path)
  return path
