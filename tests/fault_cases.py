"""Bad inputs a user can hand the CLI, written once for the fast in-process
tests (tests/test_reliability.py, test_provenance.py) and the CLI fault cases
(tests/test_faults.py), so both check the same cases. A test helper, imported
as `import fault_cases` (pytest puts tests/ on the path).

Each bad-data case `make(root, size) -> (culprit path, words the one-line
error must contain)` writes a small synface-layout (or image) folder at `root`
with exactly one fault. `non_fatal_folder` writes the oddities that must load
with one `note:` line each. `snapshot` is how "the folder was left untouched"
is checked.
"""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image


def png(shape, mode=None) -> bytes:
  """A flat grey PNG of `shape` (HxW or HxWx3/4) as bytes."""
  buf = io.BytesIO()
  Image.fromarray(np.full(shape, 128, np.uint8), mode=mode).save(buf, format="png")
  return buf.getvalue()


def write(path: str, content: bytes) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as fh:
    fh.write(content)
  return path


def snapshot(root: str, contents: bool = False) -> dict:
  """Every file and folder under root -> (size, -1 for a folder; mtime ns;
  with contents=True the file's bytes)."""
  out = {}
  for d, dirs, files in os.walk(root):
    for n in dirs + files:
      p = os.path.join(d, n)
      st = os.stat(p)
      body = open(p, "rb").read() if contents and n in files else None
      out[os.path.relpath(p, root)] = (st.st_size if n in files else -1, st.st_mtime_ns, body)
  return out


def synface(root: str, size: int, n: int = 3) -> str:
  """n flat image / depth pairs in a synface-layout train split."""
  for i in range(n):
    write(os.path.join(root, "train", "image", f"{i:06d}_image.png"), png((size, size, 3)))
    write(os.path.join(root, "train", "depth", f"{i:06d}_depth.png"), png((size, size), "L"))
  return root


def empty_folder(root, size):
  os.makedirs(root)
  return root, "no *.png"


def corrupt_png(root, size):
  synface(root, size)
  return write(os.path.join(root, "train", "image", "000001_image.png"),
               png((size, size, 3))[:60]), "not a readable image"


def zero_byte_depth(root, size):
  synface(root, size)
  return write(os.path.join(root, "train", "depth", "000002_depth.png"), b""), "empty file"


def text_named_png(root, size):
  synface(root, size)
  return write(os.path.join(root, "train", "image", "000000_image.png"),
               b"a text file\n" * 9), "not a readable image"


def image_without_depth(root, size):
  synface(root, size)
  return write(os.path.join(root, "train", "image", "000005_image.png"),
               png((size, size, 3))), "no depth twin"


def depth_of_another_size(root, size):
  synface(root, size)
  return write(os.path.join(root, "train", "depth", "000001_depth.png"),
               png((size + 4, size + 4), "L")), f"depth is {size + 4}x{size + 4}"


def corrupt_file_in_image_folder(root, size):
  for i in range(2):  # PIL sniffs the content, not the name
    write(os.path.join(root, f"im{i}.jpg"), png((size, size, 3)))
  return write(os.path.join(root, "im2.png"), b"\x89PNG\r\n\x1a\n" + b"\0" * 40), \
      "not a readable image"


# (what a table calls it, the maker)
BAD_DATA = (("empty folder", empty_folder), ("corrupt PNG", corrupt_png),
            ("zero-byte depth PNG", zero_byte_depth),
            ("text file named *_image.png", text_named_png),
            ("image without depth twin", image_without_depth),
            ("depth PNG of another size", depth_of_another_size),
            ("corrupt file in an image folder", corrupt_file_in_image_folder))


def non_fatal_folder(root: str, size: int):
  """A synface folder whose oddities all load: grayscale, RGBA and wrong-size
  images (16-bit depth twins) and a non-image file. Returns [(what, the note
  line's words)], one per oddity."""
  synface(root, size, 2)
  img, dep = os.path.join(root, "train", "image"), os.path.join(root, "train", "depth")
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (size, size), np.uint8)).save(
      os.path.join(img, "000002_image.png"))
  Image.fromarray(rng.integers(0, 255, (size, size, 4), np.uint8)).save(
      os.path.join(img, "000003_image.png"))
  h, w = size + 8, size + 14
  Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(
      os.path.join(img, "000004_image.png"))
  for i, shape in ((2, (size, size)), (3, (size, size)), (4, (h, w))):
    Image.fromarray(np.full(shape, 30000, np.uint16)).save(os.path.join(dep, f"{i:06d}_depth.png"))
  write(os.path.join(img, "notes.txt"), b"a note\n")
  return [("grayscale image", "000002_image.png: mode L"),
          ("RGBA image", "000003_image.png: mode RGBA"),
          (f"image of the wrong size ({w}x{h})", f"000004_image.png ({w}x{h})"),
          ("non-image file in the folder", "notes.txt: not *_image.png, ignored")]
