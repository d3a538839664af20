"""Unsup3D's published PyTorch checkpoints -> a `paper`-preset workdir.

Unsup3D (Wu et al., CVPR 2020) saves `torch.save({"netD": state_dict, "netA":
..., "netL": ..., "netV": ..., "netC": ..., "optimizerD": ..., "epoch": N})`.
Its five networks have the shapes of this project's `paper` preset (nets.py),
so the weights carry over one layer at a time; the result is an independent
SCR (M = 0) workdir that `eval`, `predict` and `train` (resume, or
`--init-from` for fine-tuning with any structure) accept.

The .pth file is read without PyTorch: both of torch's formats (the zip
archive of torch >= 1.6, `data.pkl` + `data/<key>` storages, and the older
single stream of pickles followed by the raw storages, which Unsup3D's
torch 1.2 wrote) are parsed with a restricted unpickler that maps torch's
tensor-rebuild functions to NumPy and never imports or calls anything else
(unknown globals become inert placeholders), so loading a file runs no code
from it.

Layer conventions (PyTorch NCHW -> ours NHWC):
  Conv2d weight (O, I, kh, kw)          -> kernel (kh, kw, I, O)
  ConvTranspose2d weight (I, O, kh, kw) -> kernel flipped in space, (kh, kw, I, O)
  1x1 Conv2d head (O, I, 1, 1)          -> Dense kernel (I, O)
  GroupNorm weight, bias                -> scale, bias
Unsup3D's confidence net upsamples 2nf -> nf -> nf at the end where ours has
2nf -> 2nf -> nf: its weights go into the first nf channels and the other nf
get zero weights (a zero group stays zero through GroupNorm and ReLU), which
computes exactly Unsup3D's function.
"""
from __future__ import annotations

import collections
import hashlib
import io
import os
import pickle
import struct
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from scr_jax import (nets as nets_lib, structure, train_step,
                     workdir as workdir_lib)
from scr_jax.errors import UserError

NETS = ("netV", "netD", "netL", "netA", "netC")
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_DTYPES = {"Float": np.float32, "Double": np.float64, "Half": np.float16, "Long": np.int64,
           "Int": np.int32, "Short": np.int16, "Char": np.int8, "Byte": np.uint8,
           "Bool": np.bool_}
_TORCH_DTYPES = {"float32": np.float32, "float": np.float32, "float64": np.float64,
                 "double": np.float64, "float16": np.float16, "half": np.float16,
                 "int64": np.int64, "long": np.int64, "int32": np.int32, "int": np.int32,
                 "int16": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_}


# ----------------------------------------------------------------------------
# Reading torch's .pth formats without torch
# ----------------------------------------------------------------------------

class _Opaque:
  """Stands for any global a checkpoint names that we do not need (optimizer
  classes, torch.device...): constructing or restoring it does nothing."""

  def __init__(self, *args, **kwargs):
    self.args = args

  def __setstate__(self, state):
    self.state = state

  def __call__(self, *args, **kwargs):
    return _Opaque(*args)


class _StorageType:
  def __init__(self, dtype):
    self.dtype = dtype


class _Storage:
  """A typed storage whose bytes come from `read(key, nbytes)` when needed."""

  def __init__(self, dtype, key, numel, read):
    self.dtype, self.key, self.numel, self._read = np.dtype(dtype), key, int(numel), read
    self._array = None

  def array(self) -> np.ndarray:
    if self._array is None:
      raw = self._read(self.key, self.numel * self.dtype.itemsize)
      self._array = np.frombuffer(raw, self.dtype.newbyteorder("<"), self.numel)
    return self._array


class _View:
  def __init__(self, base, offset, numel):
    self.base, self.offset, self.numel, self.dtype = base, offset, numel, base.dtype

  def array(self):
    return self.base.array()[self.offset:self.offset + self.numel]


class _Tensor:
  """A tensor to build once its storage's bytes are there (the legacy format
  stores them after the pickle)."""

  def __init__(self, storage, offset, size, stride, dtype=None):
    if not isinstance(storage, (_Storage, _View)):
      raise UserError("checkpoint holds a tensor without a plain storage; not a weights file")
    self.storage, self.offset, self.dtype = storage, int(offset), dtype
    self.size, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)

  def value(self) -> np.ndarray:
    flat = self.storage.array()
    if not self.size:
      out = np.array(flat[self.offset])
    else:
      item = flat.dtype.itemsize
      if self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride)) >= flat.size:
        raise UserError("checkpoint tensor reaches past the end of its storage")
      out = np.array(np.lib.stride_tricks.as_strided(
          flat[self.offset:], shape=self.size, strides=[s * item for s in self.stride]))
    return out if self.dtype is None else out.astype(self.dtype)


def _rebuild_tensor(storage, offset, size, stride, *_rest):
  return _Tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, *_rest):
  return _Tensor(storage, offset, size, stride, dtype if isinstance(dtype, type) else None)


class _Unpickler(pickle.Unpickler):
  """Resolves only what a state dict needs; everything else is inert."""

  def __init__(self, fh, read):
    super().__init__(fh)
    self._read = read
    self.storages = {}

  def find_class(self, module, name):
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if module == "torch._utils":
      if name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
        return _rebuild_tensor
      if name == "_rebuild_tensor_v3":
        return _rebuild_tensor_v3
      if name == "_rebuild_parameter":
        return lambda data, requires_grad, hooks: data
    if module == "torch":
      if name.endswith("Storage") and name[:-len("Storage")] in _DTYPES:
        return _StorageType(_DTYPES[name[:-len("Storage")]])
      if name in _TORCH_DTYPES:
        return _TORCH_DTYPES[name]
    return _Opaque

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
      raise UserError(f"checkpoint has an unknown persistent id {str(pid)[:60]}")
    stype, key, numel = pid[1], str(pid[2]), pid[4]
    dtype = stype.dtype if isinstance(stype, _StorageType) else np.uint8
    if key not in self.storages:
      self.storages[key] = _Storage(dtype, key, numel, self._read)
    st = self.storages[key]
    view = pid[5] if len(pid) > 5 else None
    if view is not None:  # legacy: (view_key, offset, view_size)
      return _View(st, int(view[1]), int(view[2]))
    return st


def load_pth(path: str) -> dict:
  """Reads a torch .pth file (zip or legacy format) into nested dicts of
  NumPy arrays, without importing torch and without running code from it.

  Raises:
    UserError: not a file torch wrote, or a format this reader does not know.
  """
  if not os.path.isfile(path):
    raise UserError(f"{path}: not found" if not os.path.exists(path) else
                    f"{path} is a folder, not a .pth file")
  try:
    if zipfile.is_zipfile(path):
      return _load_zip(path)
    return _load_legacy(path)
  except UserError:
    raise
  except (pickle.UnpicklingError, EOFError, ValueError, KeyError, struct.error,
          zipfile.BadZipFile, IndexError, TypeError, AttributeError) as e:
    raise UserError(f"{path}: not a PyTorch checkpoint this reader understands "
                    f"({type(e).__name__}: {str(e)[:120]})") from None


def _load_zip(path):
  with zipfile.ZipFile(path) as zf:
    pkl = [n for n in zf.namelist() if n.endswith("data.pkl")]
    if len(pkl) != 1:
      raise UserError(f"{path}: a zip file without one data.pkl (not a torch checkpoint)")
    prefix = pkl[0][:-len("data.pkl")]
    order = prefix + "byteorder"
    if order in zf.namelist() and zf.read(order).strip() not in (b"little", b""):
      raise UserError(f"{path}: big-endian checkpoints are not supported")

    def read(key, nbytes):
      raw = zf.read(f"{prefix}data/{key}")
      if len(raw) < nbytes:
        raise UserError(f"{path}: storage {key} is truncated")
      return raw[:nbytes]

    obj = _Unpickler(io.BytesIO(zf.read(pkl[0])), read).load()
    return _materialise(obj)


def _load_legacy(path):
  with open(path, "rb") as fh:
    head = fh.read(2)
    fh.seek(0)
    if head[:1] != b"\x80":
      raise UserError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle)")
    magic = _Unpickler(fh, None).load()
    if magic != _LEGACY_MAGIC:
      raise UserError(f"{path}: a pickle, but not one torch.save wrote (an older tar-format "
                      "checkpoint? load and re-save it with a current torch)")
    _Unpickler(fh, None).load()  # protocol version
    _Unpickler(fh, None).load()  # sys info (endianness, type sizes)
    up = _Unpickler(fh, None)
    obj = up.load()
    keys = _Unpickler(fh, None).load()
    data = {}
    for key in keys:  # each: int64 element count, then the raw bytes
      (numel,) = struct.unpack("<q", fh.read(8))
      st = up.storages[str(key)]
      data[str(key)] = fh.read(numel * st.dtype.itemsize)
    for key, st in up.storages.items():
      st._read = lambda k, n, data=data: data[k][:n]
    return _materialise(obj)


def _materialise(obj):
  """Plain containers with NumPy arrays (tensors were rebuilt lazily)."""
  if isinstance(obj, _Tensor):
    return obj.value()
  if isinstance(obj, dict):
    return {k: _materialise(v) for k, v in obj.items()}
  if type(obj) in (list, tuple):
    return type(obj)(_materialise(v) for v in obj)
  return obj


# ----------------------------------------------------------------------------
# Mapping Unsup3D's layers onto ours
# ----------------------------------------------------------------------------

# Checkpoints as people save them: the networks may sit in a wrapper dict
# ({'state_dict': ...}, {'model': ...}), their keys may carry a wrapper's prefix
# (DataParallel / DDP 'module.', torch.compile '_orig_mod.', 'model.'), or one
# flat state dict may hold all five ('netD.network.0.weight'); optimiser,
# scheduler and epoch entries sit beside them.
_SEGMENTS = ("network", "out_net1", "out_net2")  # Unsup3D's nn.Sequential names


def _flatten(obj, prefix=(), out=None):
  """{dotted key path (tuple of str): ndarray} of every array in nested dicts / lists."""
  out = {} if out is None else out
  if isinstance(obj, np.ndarray):
    out[prefix] = obj
  elif isinstance(obj, dict):
    for k, v in obj.items():
      _flatten(v, prefix + tuple(str(k).split(".")), out)
  elif type(obj) in (list, tuple):
    for i, v in enumerate(obj):
      _flatten(v, prefix + (str(i),), out)
  return out


def _key_names(obj, out=None) -> set:
  """Every part of every dict key in nested dicts (what the file names)."""
  out = set() if out is None else out
  if isinstance(obj, dict):
    for k, v in obj.items():
      out.update(str(k).split("."))
      _key_names(v, out)
  elif type(obj) in (list, tuple):
    for v in obj:
      _key_names(v, out)
  return out


def _summary(keys, limit: int = 6) -> str:
  """'encoder.* 24, decoder.* 30, ...': tensor counts by their first two key parts."""
  counts = collections.Counter(".".join(k[:2]) + (".*" if len(k) > 2 else "") for k in keys)
  shown = ", ".join(f"{k} {n}" for k, n in counts.most_common(limit))
  return shown + (f", ... ({len(counts)} prefixes)" if len(counts) > limit else "")


def networks(ckpt) -> tuple:
  """Unsup3D's state dicts {netV, netD, netL, netA[, netC]: {'network.N.weight':
  array, ...}} wherever the checkpoint holds them, and notes.

  Each array's key path (nested dicts joined with '.') is read as
  [wrapping...] netX [wrapping...] network|out_net1|out_net2 . N . weight|bias:
  wrapper dicts, a wrapper's prefixes ('module.', '_orig_mod.', 'model.') and
  extra entries (optimisers, schedulers, epoch) are passed over. When several
  wrappings hold a full set (weights and an EMA copy), the shallowest is used
  and the others named in a note.

  Raises:
    UserError: no full set of netV, netD, netL, netA, or two different
      tensors for one layer: one line with what was found (key prefixes,
      counts) against what was expected.
  """
  flat = _flatten(ckpt)
  by_root, other = {}, []
  for key, arr in flat.items():
    net = next((i for i, part in enumerate(key) if part in NETS), None)
    seg = None if net is None else next(
        (j for j in range(net + 1, len(key) - 2)
         if key[j] in _SEGMENTS and key[j + 1].isdigit()), None)
    if seg is None:
      other.append(key)
      continue
    root = ".".join(key[:net])
    sd = by_root.setdefault(root, {}).setdefault(key[net], {})
    name = ".".join(key[seg:])
    if name in sd and not np.array_equal(sd[name], arr):
      raise UserError(f"{'.'.join(key[:net + 1])}: two different tensors for {name} (keys "
                      f"wrapped in two ways); save one copy of the network")
    sd[name] = arr
  full = sorted((r for r, nets in by_root.items() if all(n in nets for n in NETS[:4])),
                key=lambda r: (r.count(".") + bool(r), r))
  if not full:
    have = {n for nets in by_root.values() for n in nets}
    named = _key_names(ckpt)
    absent = [n for n in NETS[:4] if n not in have and n not in named]
    unusable = [n for n in NETS[:4] if n not in have and n in named]
    # What the file holds under each name it has but cannot use, else overall.
    parts = []
    for n in unusable:
      keys = [k[k.index(n):] for k in flat if n in k]
      parts.append(f"{n}: {len(keys)} tensors" + (f" ({_summary(keys)})" if keys else ""))
    found = "; ".join(parts) or (f"{len(flat)} tensors" + (f" ({_summary(flat)})" if flat else ""))
    what = "; ".join(x for x in (absent and "no " + ", ".join(absent),
                                 unusable and "no usable " + ", ".join(unusable)) if x)
    raise UserError(f"not an Unsup3D checkpoint: {what} (expected the state dicts of netV, "
                    "netD, netL, netA (+ netC), keys like netD.network.0.weight, also under "
                    f"module. / _orig_mod. / state_dict; found {found})")
  notes = []
  if len(full) > 1:
    notes.append(f"the checkpoint holds the networks {len(full)} times (under "
                 f"{', '.join(repr(r or '(top level)') for r in full)}); using "
                 f"{full[0] or 'the top level'!r}")
  return by_root[full[0]], notes


def _layers(state: dict, segments) -> list:
  """The weight-bearing layers of nn.Sequential `segments` in forward order:
  ("gn", weight, bias) for GroupNorm (the only layers with a bias), ("w",
  weight) for convolutions."""
  out = []
  for seg in segments:
    idx = sorted({int(k.split(".")[1]) for k in state
                  if k.startswith(seg + ".") and k.split(".")[1].isdigit()})
    for i in idx:
      w, b = state.get(f"{seg}.{i}.weight"), state.get(f"{seg}.{i}.bias")
      if w is None:
        continue
      out.append(("gn", w, b) if b is not None else ("w", w))
  return out


def _stages(size: int) -> int:
  return int(np.log2(size)) - 2


def _plan_encoder(n):
  """nets.Encoder (f1 of V, L) then Head: n stride-2 convs, the 4x4 valid conv, a 1x1 head."""
  return [("f1", f"Conv_{i}", "conv") for i in range(n + 1)] + [("f2", "Dense_0", "dense")]


def _plan_ed_encoder(n, scope):
  plan = []
  for i in range(n):
    plan.append((scope, f"Conv_{i}", "conv"))
    if i < n - 1:
      plan.append((scope, f"GroupNorm_{i}", "gn"))
  return plan + [(scope, f"Conv_{n}", "conv")]


def _plan_ed(n):
  """nets.EDEncoder (f1 of D, A) then EDDecoder (f2), in Unsup3D's layer order."""
  plan = _plan_ed_encoder(n, "f1") + [("f2", "ConvTranspose_0", "convT"), ("f2", "Conv_0", "conv")]
  gn = 0
  for k in range(1, n):
    plan += [("f2", f"ConvTranspose_{k}", "convT"), ("f2", f"GroupNorm_{gn}", "gn"),
             ("f2", f"Conv_{k}", "conv"), ("f2", f"GroupNorm_{gn + 1}", "gn")]
    gn += 2
  return plan + [("f2", f"Conv_{n}", "conv"), ("f2", f"GroupNorm_{gn}", "gn"),
                 ("f2", f"Conv_{n + 1}", "conv"), ("f2", f"GroupNorm_{gn + 1}", "gn"),
                 ("f2", f"Conv_{n + 2}", "conv")]


def _plan_conf(n):
  """nets.ConfNet in Unsup3D's order: network, out_net2 (perceptual sigma), out_net1."""
  plan = _plan_ed_encoder(n, "EDEncoder_0") + [("", "ConvTranspose_0", "convT")]
  for k in range(1, n - 1):
    plan += [("", f"ConvTranspose_{k}", "convT"), ("", f"GroupNorm_{k - 1}", "gn")]
  plan.append(("", "Conv_0", "conv"))  # out_net2
  return plan + [("", f"ConvTranspose_{n - 1}", "convT"), ("", f"GroupNorm_{n - 2}", "gn"),
                 ("", f"ConvTranspose_{n}", "convT"), ("", f"GroupNorm_{n - 1}", "gn"),
                 ("", "Conv_1", "conv")]


def _convert(kind, layer):
  if kind == "gn":
    if layer[0] != "gn":
      raise ValueError("expected a GroupNorm")
    return dict(scale=np.asarray(layer[1], np.float32), bias=np.asarray(layer[2], np.float32))
  if layer[0] != "w" or np.ndim(layer[1]) != 4:
    raise ValueError("expected a convolution weight")
  w = np.asarray(layer[1], np.float32)
  if kind == "conv":
    return dict(kernel=w.transpose(2, 3, 1, 0))
  if kind == "convT":
    return dict(kernel=w[:, :, ::-1, ::-1].transpose(2, 3, 0, 1))
  if w.shape[2:] != (1, 1):
    raise ValueError("expected a 1x1 head")
  return dict(kernel=w[:, :, 0, 0].T)


def _place(value, like, widen: bool):
  """`value` into an array of `like`'s shape: equal shapes, or (widen) zero
  padding along the axes where `like` is larger (GroupNorm scale pads with 1)."""
  if value.shape == like.shape:
    return value
  if not widen or value.ndim != like.ndim or any(v > t for v, t in zip(value.shape, like.shape)):
    raise ValueError(f"shape {value.shape} does not fit {like.shape}")
  out = np.zeros(like.shape, np.float32)
  out[tuple(slice(0, v) for v in value.shape)] = value
  return out


def convert(ckpt: dict, like_params: dict, image_size: int):
  """Unsup3D's state dicts -> our params tree (the structure of `like_params`).

  Args:
    ckpt: the loaded checkpoint: {"netD", "netA", "netL", "netV"[, "netC"]}
      state dicts (key -> array, PyTorch layouts), as Unsup3D saves it or
      wrapped as `networks` reads it.
    like_params: our initialised params {"params": {...}} (values of the
      confidence net are kept when the checkpoint has no netC).
    image_size: 64 for Unsup3D's models (the number of stride-2 stages).
  Returns:
    (params with the same structure and shapes as like_params, notes).
  Raises:
    UserError: a network is missing or a layer does not fit (one line naming
      the network, the layer and both shapes, or what was found).
  """
  n = _stages(image_size)
  raw = ckpt
  ckpt, notes = networks(ckpt)
  params = _deep_copy(like_params["params"])
  jobs = [("netV", "V", _plan_encoder(n), ["network"]),
          ("netL", "L", _plan_encoder(n), ["network"]),
          ("netD", "D", _plan_ed(n), ["network"]), ("netA", "A", _plan_ed(n), ["network"])]
  if "netC" in ckpt:
    jobs.append(("netC", None, _plan_conf(n), ["network", "out_net2", "out_net1"]))
  else:
    notes.append("the checkpoint has no netC (trained without confidence maps): the "
                 "confidence net keeps its initialisation")
  for net, factor, plan, segments in jobs:
    layers = _layers(ckpt[net], segments)
    if len(layers) != len(plan):
      keys = [k for k in _flatten(raw) if net in k]
      raise UserError(f"{net}: {len(layers)} layers with weights, Unsup3D's {net} at "
                      f"{image_size}px has {len(plan)} (found {len(keys)} tensors under "
                      f"{net}: {_summary([k[k.index(net):] for k in keys]) or 'none'}; "
                      f"expected {', '.join(s_ + '.N.weight' for s_ in segments)})")
    for layer, (scope, name, kind) in zip(layers, plan):
      top = "conf" if factor is None else f"{scope}_{factor}"
      where = params[top]
      for part in ([scope] if factor is None and scope else []):
        where = where[part]
      try:
        new = _convert(kind, layer)
        widen = net == "netC" and name in (f"ConvTranspose_{n - 1}", f"GroupNorm_{n - 2}",
                                           f"ConvTranspose_{n}")
        for leaf, value in new.items():
          like = np.asarray(where[name][leaf])
          placed = _place(value, like, widen)
          if leaf == "scale" and widen:
            placed[value.shape[0]:] = 1.0
          where[name][leaf] = placed
      except ValueError as e:
        shape = "x".join(map(str, np.shape(layer[1])))
        raise UserError(f"{net}: layer {shape} does not fit {top}/{name} ({e})") from None
  return {"params": params}, notes


def _deep_copy(tree):
  if isinstance(tree, dict) or hasattr(tree, "items"):
    return {k: _deep_copy(v) for k, v in tree.items()}
  return np.array(tree, np.float32)


def file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as fh:
    for block in iter(lambda: fh.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def import_checkpoint(path: str, workdir: str, cfg, log=print) -> dict:
  """Converts an Unsup3D checkpoint into `workdir` as step 0 of an
  independent-SCR run with config `cfg` (the `paper` preset: Unsup3D's
  widths at 64 px), with fresh optimiser state.

  Returns:
    The settings saved with the checkpoint.
  Raises:
    UserError: the file is not an Unsup3D checkpoint, the config's shapes
      differ from Unsup3D's, or the workdir already holds a run or is in use.
  """
  # Two imports at once: the second is refused (the run's lock), not overwriting.
  with workdir_lib.Run.open(workdir, cfg, _STRUCTURE, resume=False, overwrite=True,
                            log=log) as run:
    if run.step is not None:
      raise UserError(f"--workdir {workdir} already holds checkpoints; import into a new one")
    return _import(path, run, cfg, log)


# What an Unsup3D model is: independent factors, no edges.
_STRUCTURE = structure.Structure(m=np.zeros((4, 4), np.float32), variant="independent")


def _import(path: str, run, cfg, log) -> dict:
  ckpt = load_pth(path)
  if not isinstance(ckpt, dict):
    raise UserError(f"{path}: holds a {type(ckpt).__name__}, not Unsup3D's dict of networks")
  if "netC" in networks(ckpt)[0]:  # every value comes from the file: shapes are enough (fast)
    like = jax.eval_shape(lambda: train_step.init_state(cfg, jax.random.PRNGKey(cfg.seed))[1])
    like = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), like.params)
  else:
    like = jax.device_get(train_step.init_state(cfg, jax.random.PRNGKey(cfg.seed))[1].params)
  params, notes = convert(ckpt, like, cfg.image_size)
  params = jax.tree_util.tree_map(jnp.asarray, params)
  state = train_step.new_state(nets_lib.make_nets(cfg), cfg, params)
  epoch = ckpt.get("epoch")
  if epoch is None:  # a wrapper dict: {'state_dict': ..., 'epoch': N} one level down
    epoch = next((v.get("epoch") for v in ckpt.values() if isinstance(v, dict)), None)
  imported = dict(file=os.path.abspath(path), sha256=file_sha256(path), format="unsup3d",
                  epoch=epoch if isinstance(epoch, int) else None)
  run.update(extra=dict(imported_from=imported))
  run.save(state)
  run.write_files()
  settings = run.settings
  for note in notes:
    log(f"note: {note}")
  return settings
