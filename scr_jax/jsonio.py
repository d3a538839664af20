"""The one atomic JSON writer: a file is either its previous content or the
new one, never half written (a kill, a full disk)."""
from __future__ import annotations

import json
import os
import uuid


def write_text(path: str, text: str):
  """Writes `text` to `path` atomically: a temporary file in the same folder,
  flushed to disk, then renamed over `path` (os.replace is atomic on POSIX and
  Windows). The folder is created if missing; on any error the temporary file
  is removed and `path` keeps its previous content.

  Raises:
    OSError: the folder or the file cannot be written.
  """
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  # A unique name (two writers never share a temporary file), created as open()
  # creates files (the umask's permissions, unlike mkstemp's 0600).
  tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
  try:
    with open(tmp, "x", encoding="utf-8") as fh:
      fh.write(text)
      fh.flush()
      os.fsync(fh.fileno())
    os.replace(tmp, path)
  except BaseException:
    try:
      os.remove(tmp)
    except OSError:
      pass
    raise


def write_json(path: str, obj, indent: int = 1, sort_keys: bool = False):
  """`obj` as JSON (json.dumps(obj, indent, sort_keys)) written atomically
  (`write_text`).

  Raises:
    TypeError / ValueError: obj is not JSON-able (nothing written).
    OSError: as `write_text`.
  """
  write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys))
