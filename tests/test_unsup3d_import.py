"""`run.py import-unsup3d`: Unsup3D's PyTorch checkpoints (netD/netA/netL/netV/netC)
into a workdir. The networks are written here from Unsup3D's public layer
shapes (`_unsup3d_layers`) once, as a layer list that gives both the state-dict
keys and shapes (for a small writer of torch's two .pth formats, no torch
needed) and, where torch is installed, a PyTorch replica whose outputs must
equal ours after conversion."""
import collections
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scr_jax import checkpoint, config, data, nets, workdir
from scr_jax import unsup3d_import as ui
from scr_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = [sys.executable, os.path.join(ROOT, "experiments", "run.py")]


def _cli(*args, timeout=900):
  return subprocess.run(RUN + [str(a) for a in args], capture_output=True, text=True, cwd=ROOT,
                        timeout=timeout)


# ----------------------------------------------------------------------------
# Unsup3D's five networks as layer lists (its networks.py shapes, 64 px)
# ----------------------------------------------------------------------------

def _enc_down(nf, zdim, gn):
  """Four 4x4 stride-2 convs nf..8nf (GroupNorm on the first three when gn),
  then the 4x4 valid conv to zdim."""
  out = []
  for i, (a, b) in enumerate([(3, nf), (nf, 2 * nf), (2 * nf, 4 * nf), (4 * nf, 8 * nf)]):
    out.append(("conv", a, b, 4, 2, 1))
    if gn and i < 3:
      out.append(("gn", b))
    out.append(("lrelu",) if gn else ("relu",))
  return out + [("conv", 8 * nf, zdim, 4, 1, 0), ("relu",)]


def _unsup3d_layers(nf_enc=32, nf_ed=64, zdim=256, nf_c=64, zdim_c=128):
  """{net: {segment: [layer, ...]}}; a layer is (kind, *shape)."""
  def encoder(cout):
    return {"network": _enc_down(nf_enc, 8 * nf_enc, False)[:-2]
            + [("conv", 8 * nf_enc, 8 * nf_enc, 4, 1, 0), ("relu",),
               ("conv", 8 * nf_enc, cout, 1, 1, 0), ("tanh",)]}

  def ed(cout, tanh):
    nf = nf_ed
    up = [("convT", zdim, 8 * nf, 4, 1, 0), ("relu",), ("conv", 8 * nf, 8 * nf, 3, 1, 1),
          ("relu",)]
    for a, b in [(8 * nf, 4 * nf), (4 * nf, 2 * nf), (2 * nf, nf)]:
      up += [("convT", a, b, 4, 2, 1), ("gn", b), ("relu",), ("conv", b, b, 3, 1, 1),
             ("gn", b), ("relu",)]
    up += [("up",), ("conv", nf, nf, 3, 1, 1), ("gn", nf), ("relu",),
           ("conv", nf, nf, 5, 1, 2), ("gn", nf), ("relu",), ("conv", nf, cout, 5, 1, 2)]
    return {"network": _enc_down(nf, zdim, True) + up + ([("tanh",)] if tanh else [])}

  nf = nf_c
  conf = {"network": _enc_down(nf, zdim_c, True)
          + [("convT", zdim_c, 8 * nf, 4, 1, 0), ("relu",),
             ("convT", 8 * nf, 4 * nf, 4, 2, 1), ("gn", 4 * nf), ("relu",),
             ("convT", 4 * nf, 2 * nf, 4, 2, 1), ("gn", 2 * nf), ("relu",)],
          "out_net1": [("convT", 2 * nf, nf, 4, 2, 1), ("gn", nf), ("relu",),
                       ("convT", nf, nf, 4, 2, 1), ("gn", nf), ("relu",),
                       ("conv", nf, 2, 5, 1, 2), ("softplus",)],
          "out_net2": [("conv", 2 * nf, 2, 3, 1, 1), ("softplus",)]}
  return dict(netD=ed(1, False), netA=ed(3, True), netL=encoder(4), netV=encoder(6), netC=conf)


def _random_state(layers, rng):
  """Unsup3D key names -> random float32 arrays (GroupNorm affine randomised too)."""
  out = {}
  for net, segs in layers.items():
    sd = collections.OrderedDict()
    for seg, lays in segs.items():
      for i, lay in enumerate(lays):
        if lay[0] == "conv":
          _, a, b, k = lay[:4]
          sd[f"{seg}.{i}.weight"] = rng.normal(0, (a * k * k) ** -0.5, (b, a, k, k))
        elif lay[0] == "convT":
          _, a, b, k = lay[:4]
          sd[f"{seg}.{i}.weight"] = rng.normal(0, (a * k * k / 4) ** -0.5, (a, b, k, k))
        elif lay[0] == "gn":
          sd[f"{seg}.{i}.weight"] = rng.uniform(0.5, 1.5, lay[1])
          sd[f"{seg}.{i}.bias"] = rng.normal(0, 0.1, lay[1])
    out[net] = collections.OrderedDict((k, v.astype(np.float32)) for k, v in sd.items())
  return out


# ----------------------------------------------------------------------------
# A small writer of torch's .pth formats (zip, and the legacy pickle stream)
# ----------------------------------------------------------------------------

class _Global:
  """Pickled as GLOBAL module.name (torch's names, without torch)."""

  def __init__(self, module, name):
    self.module, self.name = module, name

  def __call__(self, *a):
    raise AssertionError("never called")


class _T:
  """An ndarray pickled the way torch pickles a tensor."""

  def __init__(self, key, array):
    self.key, self.array = key, np.ascontiguousarray(array)

  def __reduce__(self):
    a = self.array
    stride = tuple(s // a.itemsize for s in a.strides)
    return (_Global("torch._utils", "_rebuild_tensor_v2"),
            (_StorageRef(self), 0, a.shape, stride, False, collections.OrderedDict()))


class _StorageRef:
  def __init__(self, t):
    self.t = t


_STORAGE_NAME = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage"}


class _Pickler(pickle._Pickler):
  dispatch = pickle._Pickler.dispatch.copy()

  def __init__(self, fh, legacy):
    super().__init__(fh, protocol=2)
    self.legacy, self.storages = legacy, {}

  def _save_global_marker(self, obj):
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
    self.memoize(obj)

  dispatch[_Global] = _save_global_marker

  def persistent_id(self, obj):
    if not isinstance(obj, _StorageRef):
      return None
    t = obj.t
    self.storages[t.key] = t.array
    stype = _Global("torch", _STORAGE_NAME[t.array.dtype])
    pid = ("storage", stype, t.key, "cpu", t.array.size)
    return pid + (None,) if self.legacy else pid


def _tensors(obj, counter):
  if isinstance(obj, np.ndarray):
    counter[0] += 1
    return _T(str(counter[0] - 1), obj)
  if isinstance(obj, dict):
    return type(obj)((k, _tensors(v, counter)) for k, v in obj.items())
  return obj


def write_pth(path, obj, legacy=False):
  """Writes `obj` (dicts of ndarrays) as torch.save would, in its zip format
  (torch >= 1.6) or the legacy stream (Unsup3D's torch 1.2)."""
  obj = _tensors(obj, [0])
  buf = io.BytesIO()
  p = _Pickler(buf, legacy)
  if legacy:
    for head in (0x1950a86a20f9469cfc6c, 1001, dict(protocol_version=1001, little_endian=True)):
      pickle.dump(head, buf, protocol=2)
    p.dump(obj)
    keys = sorted(p.storages)
    pickle.dump(keys, buf, protocol=2)
    for k in keys:
      buf.write(struct.pack("<q", p.storages[k].size) + p.storages[k].tobytes())
    with open(path, "wb") as fh:
      fh.write(buf.getvalue())
    return
  p.dump(obj)
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
    zf.writestr("archive/data.pkl", buf.getvalue())
    zf.writestr("archive/byteorder", "little")
    zf.writestr("archive/version", "3\n")
    for k, a in p.storages.items():
      zf.writestr(f"archive/data/{k}", a.tobytes())


# ----------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("legacy", [False, True])
def test_load_pth_reads_torch_formats_without_torch(tmp_path, legacy):
  rng = np.random.default_rng(0)
  obj = {"netV": collections.OrderedDict([("network.0.weight", rng.normal(size=(2, 3, 4, 4))
                                           .astype(np.float32)),
                                          ("network.1.bias", np.arange(5, dtype=np.int64))]),
         "epoch": 30, "optimizerV": {"param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999)}]}}
  p = str(tmp_path / "c.pth")
  write_pth(p, obj, legacy=legacy)
  got = ui.load_pth(p)
  assert got["epoch"] == 30 and got["optimizerV"]["param_groups"][0]["betas"] == (0.9, 0.999)
  for k, v in obj["netV"].items():
    assert got["netV"][k].dtype == v.dtype
    np.testing.assert_array_equal(got["netV"][k], v)


def test_load_pth_runs_no_code_from_the_file(tmp_path):
  marker = tmp_path / "ran"

  class Evil:
    def __reduce__(self):
      return (os.system, (f"touch {marker}",))
  p = str(tmp_path / "evil.pth")
  with zipfile.ZipFile(p, "w") as zf:
    zf.writestr("archive/data.pkl", pickle.dumps({"netV": Evil()}, protocol=2))
  got = ui.load_pth(p)
  assert not marker.exists()
  assert isinstance(got["netV"], ui._Opaque)
  with pytest.raises(UserError, match="not an Unsup3D checkpoint: no netD"):
    ui.convert(got, {"params": {}}, 64)
  bad = tmp_path / "bad.pth"
  bad.write_bytes(b"not a checkpoint")
  with pytest.raises(UserError, match="not a PyTorch checkpoint"):
    ui.load_pth(str(bad))


# ----------------------------------------------------------------------------
# The layer conventions against the definitions of torch's layers (NumPy)
# ----------------------------------------------------------------------------

def _torch_conv2d(x_CxHxW, w_OxIxKxK, s, p):
  """out[o, y, x] = sum_{c,i,j} in[c, y*s - p + i, x*s - p + j] w[o, c, i, j]."""
  c, h, w = x_CxHxW.shape
  o, _, k, _ = w_OxIxKxK.shape
  xp = np.pad(x_CxHxW, ((0, 0), (p, p), (p, p)))
  ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
  out = np.zeros((o, ho, wo))
  for y in range(ho):
    for xx in range(wo):
      out[:, y, xx] = np.einsum("cij,ocij->o", xp[:, y * s:y * s + k, xx * s:xx * s + k],
                                w_OxIxKxK)
  return out


def _torch_conv_transpose2d(x_CxHxW, w_IxOxKxK, s, p):
  """out[o, y*s - p + i, x*s - p + j] += in[c, y, x] w[c, o, i, j]."""
  c, h, w = x_CxHxW.shape
  _, o, k, _ = w_IxOxKxK.shape
  full = np.zeros((o, (h - 1) * s + k, (w - 1) * s + k))
  for y in range(h):
    for xx in range(w):
      full[:, y * s:y * s + k, xx * s:xx * s + k] += np.einsum("c,coij->oij", x_CxHxW[:, y, xx],
                                                               w_IxOxKxK)
  ho, wo = (h - 1) * s - 2 * p + k, (w - 1) * s - 2 * p + k
  return full[:, p:p + ho, p:p + wo]


@pytest.mark.parametrize("kind,shape,s,p,hw", [
    ("conv", (6, 3, 4, 4), 2, 1, 8), ("conv", (5, 4, 3, 3), 1, 1, 6),
    ("conv", (2, 4, 5, 5), 1, 2, 6), ("conv", (7, 4, 4, 4), 1, 0, 4),
    ("convT", (4, 6, 4, 4), 2, 1, 4), ("convT", (8, 5, 4, 4), 1, 0, 1)])
def test_layer_conventions_match_torch_definitions(kind, shape, s, p, hw):
  rng = np.random.default_rng(1)
  w = rng.normal(size=shape).astype(np.float32)
  cin = shape[1] if kind == "conv" else shape[0]
  x = rng.normal(size=(cin, hw, hw)).astype(np.float32)
  k = ui._convert(kind, ("w", w))["kernel"]
  xin = jnp.asarray(x.transpose(1, 2, 0)[None])
  if kind == "conv":
    ref = _torch_conv2d(x, w, s, p)
    mod = nets.Conv(shape[0], shape[2], s, p)
  else:
    ref = _torch_conv_transpose2d(x, w, s, p)
    mod = nets.ConvTranspose(shape[1], s)
  got = mod.apply({"params": {"kernel": jnp.asarray(k)}}, xin)[0]
  np.testing.assert_allclose(np.asarray(got), ref.transpose(1, 2, 0), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------
# The CLI at the real shapes, and eval / train of an imported workdir
# ----------------------------------------------------------------------------

SMALL = dict(nf_enc=4, nf_ed=8, zdim=32, nf_c=8, zdim_c=16)
SMALL_SETS = ["embed_dim=32", "nf_encoder=4", "nf_ed=8", "nf_conf=8", "conf_zdim=16"]


def test_import_cli_paper_shapes(tmp_path):
  """Unsup3D's exact shapes (37.3M parameters, as the paper preset): the CLI
  imports the legacy-format file; every weight lands transformed where it
  belongs, the settings name the file and its hash."""
  rng = np.random.default_rng(2)
  layers = _unsup3d_layers()
  state = _random_state(layers, rng)
  p = str(tmp_path / "checkpoint030.pth")
  write_pth(p, dict(state, epoch=30, optimizerD={"state": {}}), legacy=True)
  wd = str(tmp_path / "wd")
  res = _cli("import-unsup3d", p, "--workdir", wd)
  assert res.returncode == 0, res.stderr[-3000:]
  s = checkpoint.load_settings(wd, 0)
  assert s["imported_from"]["sha256"] == ui.file_sha256(p) and s["imported_from"]["epoch"] == 30
  assert s["config"]["preset"] == "paper" and s["structure"]["variant"] == "independent"
  r = workdir.restore(wd)
  prm = jax.device_get(r.params)["params"]
  total = sum(int(np.prod(v.shape)) for n in layers for v in state[n].values())
  # ours (README: 37,316,480) less what our wider confidence head adds:
  # ConvTranspose_3 2nf->2nf (not nf), ConvTranspose_4 from 2nf, GroupNorm_2 on 2nf
  assert total == 37_316_480 - (16 * 128 * 64 + 16 * 64 * 64 + 2 * 64)
  # V: the 1x1 head is a Dense kernel, the convs are transposed to HWIO
  np.testing.assert_array_equal(prm["f2_V"]["Dense_0"]["kernel"],
                                state["netV"]["network.10.weight"][:, :, 0, 0].T)
  np.testing.assert_array_equal(prm["f1_V"]["Conv_4"]["kernel"],
                                state["netV"]["network.8.weight"].transpose(2, 3, 1, 0))
  # D: the first transposed conv, flipped; a GroupNorm of the decoder
  np.testing.assert_array_equal(prm["f2_D"]["ConvTranspose_0"]["kernel"],
                                state["netD"]["network.13.weight"][:, :, ::-1, ::-1]
                                .transpose(2, 3, 0, 1))
  np.testing.assert_array_equal(prm["f2_D"]["GroupNorm_7"]["bias"],
                                state["netD"]["network.40.bias"])
  np.testing.assert_array_equal(prm["f1_A"]["GroupNorm_2"]["scale"],
                                state["netA"]["network.7.weight"])
  # C: out_net2 is our Conv_0; out_net1's 2nf -> nf layer fills half of our 2nf -> 2nf
  np.testing.assert_array_equal(prm["conf"]["Conv_0"]["kernel"],
                                state["netC"]["out_net2.0.weight"].transpose(2, 3, 1, 0))
  k3 = prm["conf"]["ConvTranspose_3"]["kernel"]
  assert k3.shape == (4, 4, 128, 128)
  np.testing.assert_array_equal(k3[..., :64], state["netC"]["out_net1.0.weight"]
                                [:, :, ::-1, ::-1].transpose(2, 3, 0, 1))
  assert not np.any(k3[..., 64:])
  assert not np.any(prm["conf"]["ConvTranspose_4"]["kernel"][:, :, 64:])
  # every array of the checkpoint was used: its values all appear in ours
  ours = np.sort(np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(prm)]))
  theirs = np.concatenate([v.ravel() for n in layers for v in state[n].values()])
  idx = np.clip(np.searchsorted(ours, theirs), 0, ours.size - 1)
  assert np.all(ours[idx] == theirs)
  # a second import into the same workdir is refused
  res = _cli("import-unsup3d", p, "--workdir", wd)
  assert res.returncode == 2 and "already holds checkpoints" in res.stderr


@pytest.fixture(scope="module")
def small_import(tmp_path_factory):
  base = tmp_path_factory.mktemp("u3d")
  layers = _unsup3d_layers(**SMALL)
  state = _random_state(layers, np.random.default_rng(3))
  p = str(base / "small.pth")
  write_pth(p, dict(state, epoch=3))
  wd = str(base / "wd")
  sets = [a for s in SMALL_SETS + ["crop=0"] for a in ("--set", s)]
  res = _cli("import-unsup3d", p, "--workdir", wd, *sets)
  assert res.returncode == 0, res.stderr[-3000:]
  d = str(base / "d64")
  data.export_synface(d, n_train=8, n_val=4, n_test=4, size=64, seed=5, verbose=False)
  return dict(layers=layers, state=state, path=p, wd=wd, data=d, sets=sets, base=base)


def test_imported_workdir_evaluates_and_fine_tunes(small_import):
  """eval and predict read it; train resumes it (independent, same settings)
  and --init-from starts another structure from its weights."""
  wd, d, sets = small_import["wd"], small_import["data"], small_import["sets"]
  base = small_import["base"]
  res = _cli("eval", "--workdir", wd, "--data", d, "--split", "test",
             "--out", str(base / "e.json"))
  assert res.returncode == 0, res.stderr[-3000:]
  summ = json.load(open(base / "e.json"))
  assert summ["step"] == 0 and np.isfinite(summ["mad_mean"])
  # one image and a small turn-table: the export itself is tested in test_predict.py
  one = os.path.join(d, "test", "image", sorted(os.listdir(os.path.join(d, "test", "image")))[0])
  res = _cli("predict", "--workdir", wd, "--images", one, "--out", str(base / "pred"),
             "--video-size", "64")
  assert res.returncode == 0, res.stderr[-3000:]
  common = ["--preset", "paper", "--data", d, "--steps", "1", "--set", "batch_size=2"]
  res = _cli("train", "--workdir", str(base / "dense"), "--init-from", wd, "--variant",
             "dense", "--order", "DVAL", *common, *sets)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "starting from the parameters of" in res.stderr
  s = checkpoint.load_settings(str(base / "dense"), 1)
  assert s["init_from"]["workdir"] == os.path.abspath(wd) and s["structure"]["variant"] == "dense"
  # the imported run itself resumes only with its own settings
  res = _cli("train", "--workdir", wd, *common, *sets)
  assert res.returncode == 2 and "batch_size: 64 -> 2" in res.stderr


def test_torch_replica_gives_the_same_outputs(small_import, tmp_path):
  """A PyTorch replica of Unsup3D's five networks (its layer shapes, small
  widths), saved by torch.save in both formats, converted: every network's
  output equals ours on the same images."""
  torch = pytest.importorskip("torch")
  layers = small_import["layers"]
  tnets = {}
  for net, segs in layers.items():
    mods = {}
    for seg, lays in segs.items():
      seq = []
      for lay in lays:
        kind = lay[0]
        if kind == "conv":
          seq.append(torch.nn.Conv2d(lay[1], lay[2], lay[3], lay[4], lay[5], bias=False))
        elif kind == "convT":
          seq.append(torch.nn.ConvTranspose2d(lay[1], lay[2], lay[3], lay[4], lay[5], bias=False))
        elif kind == "gn":
          seq.append(torch.nn.GroupNorm(lay[1] // 4, lay[1]))  # 4 channels a group, as Unsup3D
        else:
          seq.append(dict(relu=torch.nn.ReLU(), lrelu=torch.nn.LeakyReLU(0.2),
                          tanh=torch.nn.Tanh(), softplus=torch.nn.Softplus(),
                          up=torch.nn.Upsample(scale_factor=2, mode="nearest"))[kind])
      mods[seg] = torch.nn.Sequential(*seq)
    tnets[net] = torch.nn.ModuleDict(mods)
    with torch.no_grad():
      for name, prm in tnets[net].named_parameters():
        prm.copy_(torch.from_numpy(small_import["state"][net][name]))
  rng = np.random.default_rng(4)
  x = rng.uniform(-1, 1, (3, 3, 64, 64)).astype(np.float32)
  with torch.no_grad():
    xt = torch.from_numpy(x)
    ref = {n: tnets[n]["network"](xt).numpy() for n in ("netV", "netL", "netD", "netA")}
    for n in ("netV", "netL"):  # Unsup3D's Encoder.forward: reshape(B, -1)
      ref[n] = ref[n].reshape(x.shape[0], -1)
    trunk = tnets["netC"]["network"](xt)
    ref["l1"] = tnets["netC"]["out_net1"](trunk).numpy()
    ref["perc"] = tnets["netC"]["out_net2"](trunk).numpy()
  cfg = config.override(config.get_config("paper"), SMALL_SETS)
  model = nets.make_nets(cfg)
  like = jax.device_get(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
  for legacy in (False, True):
    p = str(tmp_path / f"replica_{legacy}.pth")
    sd = {n: m.state_dict() for n, m in tnets.items()}  # Unsup3D's key names
    torch.save(dict(sd, epoch=3), p, _use_new_zipfile_serialization=not legacy)
    params, notes = ui.convert(ui.load_pth(p), like, 64)
    assert notes == []
    xin = jnp.asarray(x.transpose(0, 2, 3, 1))
    raw = model.apply(params, model.apply(params, xin, method="encode"), method="decode")
    l1, perc = model.apply(params, xin, method="confidence")
    pairs = [(raw["V"], ref["netV"]), (raw["L"], ref["netL"]),
             (raw["D"][..., 0], ref["netD"][:, 0]), (raw["A"], ref["netA"].transpose(0, 2, 3, 1)),
             (l1, ref["l1"].transpose(0, 2, 3, 1)), (perc, ref["perc"].transpose(0, 2, 3, 1))]
    for ours, theirs in pairs:
      assert ours.shape == theirs.shape
      scale = float(np.abs(theirs).max())
      np.testing.assert_allclose(np.asarray(ours), theirs, atol=2e-5 * max(scale, 1.0), rtol=1e-4)


# ----------------------------------------------------------------------------
# Issue 23: checkpoints as people save them
# ----------------------------------------------------------------------------

def _prefixed(state, prefix):
  return {n: collections.OrderedDict((prefix + k, v) for k, v in sd.items())
          for n, sd in state.items()}


def _wrappings(state):
  """name -> the same weights saved the ways training scripts save them."""
  flat = collections.OrderedDict((f"{n}.{k}", v) for n, sd in state.items()
                                 for k, v in sd.items())
  extra = dict(epoch=7, optimizerD={"state": {0: {"exp_avg": np.zeros(3, np.float32)}},
                                    "param_groups": [{"lr": 1e-4}]},
               scheduler={"last_epoch": 7}, best_metric=0.5)
  return {
      "ddp_module": dict(_prefixed(state, "module."), epoch=7),
      "torch_compile": dict(_prefixed(state, "_orig_mod."), epoch=7),
      "compile_in_ddp": dict(_prefixed(state, "module._orig_mod.")),
      "state_dict": {"state_dict": dict(state), **extra},
      "model": {"model": _prefixed(state, "module."), "epoch": 7},
      "flat_one_dict": {"state_dict": collections.OrderedDict(
          ("module." + k, v) for k, v in flat.items()), **extra},
      "extra_entries": dict(state, **extra),
  }


def test_wrapped_checkpoints_import_as_the_plain_one(tmp_path):
  """Kind 5: a wrapper's key prefix (DataParallel / DDP 'module.', torch.compile
  '_orig_mod.'), a nested {'state_dict': ...} / {'model': ...} dict, one flat
  state dict and extra optimiser / scheduler / epoch entries all give exactly
  the parameters of Unsup3D's own file."""
  layers = _unsup3d_layers(**SMALL)
  state = _random_state(layers, np.random.default_rng(11))
  cfg = config.override(config.get_config("paper"), SMALL_SETS)
  model = nets.make_nets(cfg)
  like = jax.device_get(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
  p = str(tmp_path / "plain.pth")
  write_pth(p, dict(state, epoch=7))
  ref, _ = ui.convert(ui.load_pth(p), like, 64)
  for name, obj in _wrappings(state).items():
    p = str(tmp_path / f"{name}.pth")
    write_pth(p, obj)
    got, notes = ui.convert(ui.load_pth(p), like, 64)
    assert notes == [], (name, notes)
    for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(got)):
      np.testing.assert_array_equal(a, b)
  # weights and an EMA copy: the shallower set, the other named in a note
  ema = {n: {k: v + 1 for k, v in sd.items()} for n, sd in state.items()}
  p = str(tmp_path / "ema.pth")
  write_pth(p, dict(state, ema=ema))
  got, notes = ui.convert(ui.load_pth(p), like, 64)
  assert len(notes) == 1 and "'ema'" in notes[0]
  for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(got)):
    np.testing.assert_array_equal(a, b)


def test_wrapped_checkpoint_through_the_cli(tmp_path):
  """Kind 5, the reported case: a DDP-saved {'state_dict': {'module.netD...'}}
  file imports (it was 'netV: 0 layers with weights')."""
  layers = _unsup3d_layers(**SMALL)
  state = _random_state(layers, np.random.default_rng(12))
  p = str(tmp_path / "ddp.pth")
  write_pth(p, _wrappings(state)["flat_one_dict"])
  wd = str(tmp_path / "wd")
  sets = [a for s in SMALL_SETS for a in ("--set", s)]
  res = _cli("import-unsup3d", p, "--workdir", wd, *sets)
  assert res.returncode == 0, res.stderr[-3000:]
  assert checkpoint.load_settings(wd, 0)["imported_from"]["epoch"] == 7


@pytest.mark.parametrize("case,needles", [
    ("no_nets", ["no netV, netD, netL, netA", "found 2 tensors", "encoder.0.* 1"]),
    ("other_layout", ["no usable netV", "netV: 6 tensors (netV.encoder.* 6)",
                      "netD.network.0.weight"]),
    ("missing_layer", ["netV: 5 layers with weights", "has 6", "netV.network.* 5"]),
    ("two_copies", ["netD", "two different tensors", "network.0.weight"]),
])
def test_mismatching_checkpoint_says_what_it_found(tmp_path, case, needles):
  """Kind 5: a file that really does not match: one line with what it holds
  (key prefixes and counts) against what was expected."""
  layers = _unsup3d_layers(**SMALL)
  state = _random_state(layers, np.random.default_rng(13))
  if case == "no_nets":
    obj = {"encoder": {"0": {"weight": np.zeros((2, 3, 4, 4), np.float32)},
                       "1": {"weight": np.zeros(2, np.float32)}}, "epoch": 1}
  elif case == "other_layout":
    obj = dict(state, netV={k.replace("network", "encoder"): v for k, v in state["netV"].items()})
  elif case == "missing_layer":
    obj = dict(state, netV={k: v for k, v in state["netV"].items()
                            if not k.startswith("network.8")})
  else:
    obj = dict(state, netD=dict(state["netD"], **{"module.network.0.weight":
                                                  state["netD"]["network.0.weight"] + 1}))
  p = str(tmp_path / f"{case}.pth")
  write_pth(p, obj)
  cfg = config.override(config.get_config("paper"), SMALL_SETS)
  like = jax.device_get(nets.make_nets(cfg).init(jax.random.PRNGKey(0),
                                                  jnp.zeros((1, 64, 64, 3))))
  with pytest.raises(UserError) as err:
    ui.convert(ui.load_pth(p), like, 64)
  msg = str(err.value)
  assert "\n" not in msg
  for n in needles:
    assert n in msg, (n, msg)
