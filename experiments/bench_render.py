"""Benchmark of depth warping fwd+bwd: ours vs our brute force vs jaxrenderer.

Work per image: canonical depth map -> grid mesh -> view -> exact z-buffer
depth, then grad of its sum w.r.t. (canonical depth, view).
Times are medians over --repeats calls (the compiling first call excluded).

  (a) ours   render.warp_depth_batch (what the model runs), jit(grad)
  (b) brute  same, visibility from render_reference.rasterize_brute_jax
  (c) peer   jaxrenderer==0.3.2 in its own venv (subprocess, created at
             --peer-venv if missing), same view-space triangles and
             intrinsics, back-face culling off like ours; grad w.r.t. the
             vertices. Too slow for a full batch: it times --peer-batch
             images and the per-batch figure is scaled linearly (flagged).
Also (full runs): jit(vmap(grad)) of the single-image render.warp_depth,
for comparison. The brute force is slow: --brute-repeats (default 3) repeats.

Exactness: ours vs brute on every benchmarked image (coverage differs or
|depth diff| > 1e-5), and both vs the float64 NumPy reference on the first
--f64-images images of each case. The last line printed is a JSON summary.

  .venv/bin/python experiments/bench_render.py [--quick] [--no-peer]
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from scr_jax import render  # noqa: E402
import render_reference  # noqa: E402  (experiments/render_reference.py, beside this script)

PEER_PINS = ["jax==0.4.13", "jaxlib==0.4.13", "numpy==1.26.4", "scipy<1.13",
             "jaxrenderer==0.3.2", "jaxtyping==0.2.38"]
PEER_SCRIPT = os.path.join(ROOT, "experiments", "peer_jaxrenderer.py")
DEPTH_TOL = 1e-5  # ours vs exact references
PEER_DEPTH_TOL = 1e-4  # jaxrenderer's float32 3x3 inverse: ~1e-4 off on stretched faces

FULL_CASES = [(64, 64), (32, 32)]  # (size, batch): paper size, CPU-small
QUICK_CASES = [(16, 4), (24, 4)]


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------

def face_like_depth(rng, size):
  """Smooth face-like depth in [0.9, 1.1]: background, an elliptic dome with
  a depth step at its silhouette, a nose, small bumps, one straight step."""
  t = np.linspace(-1.0, 1.0, size)
  x, y = np.meshgrid(t, t)
  x = x - rng.uniform(-0.15, 0.15)
  y = y - rng.uniform(-0.15, 0.15)
  bg = rng.uniform(1.06, 1.1)
  m = 1.0 - (x / rng.uniform(0.55, 0.85)) ** 2 - (y / rng.uniform(0.7, 0.95)) ** 2
  face = m > 0
  d = bg - face * (rng.uniform(0.02, 0.05) + rng.uniform(0.04, 0.08) * np.sqrt(np.maximum(m, 0)))
  nx, ny = rng.uniform(-0.1, 0.1, size=2)
  nose = np.exp(-((x - nx) ** 2 / 0.02 + (y - ny) ** 2 / 0.06))
  d -= face * rng.uniform(0.01, 0.03) * nose
  for _ in range(6):
    cx, cy, s = rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(0.1, 0.35)
    d += rng.uniform(-0.006, 0.006) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * s * s))
  ang = rng.uniform(0, 2 * np.pi)  # e.g. hair or an occluder edge
  d -= rng.uniform(0.01, 0.03) * ((np.cos(ang) * x + np.sin(ang) * y) > rng.uniform(0.2, 0.7))
  return np.clip(d, 0.9, 1.1).astype(np.float32)


def random_view(rng):
  """Yaw up to +-40 deg, pitch/roll up to +-10 deg, small translations."""
  deg = np.deg2rad
  rot = [rng.uniform(-deg(10), deg(10)), rng.uniform(-deg(40), deg(40)),
         rng.uniform(-deg(10), deg(10))]
  trans = [rng.uniform(-0.02, 0.02), rng.uniform(-0.02, 0.02), rng.uniform(-0.05, 0.05)]
  return np.array(rot + trans, np.float32)


def make_case(seed, case_idx, size, batch):
  rng = np.random.default_rng([seed, case_idx, size, batch])
  depth = np.stack([face_like_depth(rng, size) for _ in range(batch)])
  views = np.stack([random_view(rng) for _ in range(batch)])
  return depth, views


# ----------------------------------------------------------------------------
# The three implementations
# ----------------------------------------------------------------------------

def view_uvz(depth, view, cam):
  pts = render.depth_to_points(depth, cam).reshape(-1, 3)
  return render.project(render.transform_points(pts, view, cam), cam)


def warp_depth_brute(depth, view, cam):
  """render.warp_depth with the brute-force exact visibility."""
  uvz = view_uvz(depth, view, cam)
  tri = render.grid_triangles(uvz.T.reshape(3, cam.height, cam.width))
  fid = render_reference.rasterize_brute_jax(tri, cam.height, cam.width)
  faces = render.grid_faces(cam.height, cam.width)
  return render.interpolate_depth(uvz, faces, fid, cam), fid >= 0


def fwd_bwd(warp_fn, cam, batch_map=False):
  """jit(vmap(grad of the sum of the rendered depth w.r.t. (depth, view))).

  The rendered (depth, covered) ride along as aux, so the exactness checks
  read the very images the timed calls produce (and nothing compiles twice).
  Returns fn(depth_BxHxW, views_Bx6) -> ((depth, covered), (d_depth, d_view)).
  batch_map: lax.map over the batch instead of vmap (a diagnostic: under vmap
  the rasterizer's while_loops run the batch's largest trip count for all).
  """
  def loss(d, v):
    z, cov = warp_fn(d, v, cam)
    return jnp.sum(z), (z, cov)

  def step(d, v):
    (_, aux), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(d, v)
    return aux, grads

  if batch_map:
    return jax.jit(lambda d, v: jax.lax.map(lambda a: step(*a), (d, v)))
  return jax.jit(jax.vmap(step))


def dense_faces(depth, view, cam):
  """Faces per image that rasterize sends down its dense (large-triangle)
  path: pixel-centre span above its larger window (same rule, no raster)."""
  w_large = inspect.signature(render.rasterize).parameters["windows"].default[1]
  tri = render.grid_triangles(view_uvz(depth, view, cam).T.reshape(3, cam.height, cam.width))
  ok, (x0, x1, y0, y1) = render._face_data(tri, cam.height, cam.width, None)
  return jnp.sum(ok & (jnp.maximum(x1 - x0, y1 - y0) + 1 > w_large))


def time_fn(fn, args, repeats):
  """(median seconds, first-call seconds, last output)."""
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times)), first, out


def mismatch(depth_a, cov_a, depth_b, cov_b, tol):
  """Pixels whose coverage differs or whose depths differ by more than tol."""
  depth_a, depth_b = np.asarray(depth_a, np.float64), np.asarray(depth_b, np.float64)
  return (np.asarray(cov_a) != np.asarray(cov_b)) | (np.abs(depth_a - depth_b) > tol)


# ----------------------------------------------------------------------------
# Peer (jaxrenderer in its own venv)
# ----------------------------------------------------------------------------

def peer_python_ok(python):
  try:  # from /, so that nothing in the cwd shadows the stdlib
    r = subprocess.run([python, "-c", "import renderer, jax; print(jax.__version__)"],
                       capture_output=True, text=True, cwd="/", timeout=300)
  except (OSError, subprocess.TimeoutExpired):
    return False
  return r.returncode == 0


def ensure_peer_python(path):
  """Creates the peer venv at `path` unless a working one is there."""
  path = os.path.abspath(path)  # the checks run from another directory
  python = os.path.join(path, "bin", "python")
  if os.path.exists(python) and peer_python_ok(python):
    return python
  print(f"creating the peer venv at {path} ({' '.join(PEER_PINS)}) ...", flush=True)
  # The base interpreter (not this venv's) seeds the new venv; jaxlib 0.4.13
  # has wheels for Python 3.9-3.11.
  base = getattr(sys, "_base_executable", None) or sys.executable
  for cmd in ([base, "-m", "venv", path],
              [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
              + PEER_PINS):
    r = subprocess.run(cmd, capture_output=True, text=True)  # pip is chatty
    if r.returncode != 0:
      raise RuntimeError(f"{' '.join(cmd)} failed:\n{(r.stdout + r.stderr)[-3000:]}")
  if not peer_python_ok(python):
    raise RuntimeError(f"{python} cannot import jaxrenderer")
  return python


def run_peer(python, verts, cam, repeats, workdir):
  """Renders + times fwd+bwd in the peer's process. Returns (info, depth, covered)."""
  inp, out = os.path.join(workdir, "peer_in.npz"), os.path.join(workdir, "peer_out.npz")
  np.savez(inp, verts=np.asarray(verts, np.float32),
           faces=render.grid_faces(cam.height, cam.width), height=cam.height,
           width=cam.width, focal=cam.focal, cx=cam.cx, cy=cam.cy, near=cam.near,
           far=cam.far)
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  r = subprocess.run([python, PEER_SCRIPT, inp, out, "--repeats", str(repeats)],
                     capture_output=True, text=True, cwd=workdir, env=env)
  if r.returncode != 0:
    raise RuntimeError(f"peer failed (rc {r.returncode}):\n{r.stderr[-3000:]}")
  info = json.loads(r.stdout.strip().splitlines()[-1])
  res = np.load(out)
  return info, res["depth"], res["covered"]


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------

def fwd_bwd_batch(cam):
  """Ours as the model calls it: render.warp_depth_batch (visibility under
  lax.map, interpolation vmapped), grad of the batch's summed depth."""
  def loss(d, v):
    z, cov = render.warp_depth_batch(d, v, cam)
    return jnp.sum(z), (z, cov)

  def step(d, v):
    (_, aux), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(d, v)
    return aux, grads

  return jax.jit(step)


def bench_case(ci, size, batch, args, peer_python, workdir):
  """Times and checks one (size, batch) case. Returns (case dict, peer error)."""
  cam = render.Camera(size, size)
  depth_np, views_np = make_case(args.seed, ci, size, batch)
  depth, views = jnp.asarray(depth_np), jnp.asarray(views_np)
  name = f"{size}x{size} b{batch}"
  print(f"[{name}] {render.grid_faces(size, size).shape[0]} faces/image", flush=True)

  ms_ours, first_ours, ((z, cov), g_ours) = time_fn(
      fwd_bwd_batch(cam), (depth, views), args.repeats)
  print(f"  ours         {1e3 * ms_ours:9.1f} ms/batch (first call {first_ours:.1f} s)",
        flush=True)
  case = dict(case=name, height=size, width=size, batch=batch, ms_ours=1e3 * ms_ours,
              first_call_s_ours=first_ours)
  if not args.quick:
    ms_map, _, _ = time_fn(fwd_bwd(render.warp_depth, cam), (depth, views), args.repeats)
    case.update(ms_ours_vmap=1e3 * ms_map)
    print(f"  ours vmap    {1e3 * ms_map:9.1f} ms/batch", flush=True)
  brute_repeats = min(args.brute_repeats or args.repeats, args.repeats)
  ms_brute, first_brute, ((z_ref, cov_ref), g_brute) = time_fn(
      fwd_bwd(warp_depth_brute, cam), (depth, views), brute_repeats)
  print(f"  brute        {1e3 * ms_brute:9.1f} ms/batch (first call {first_brute:.1f} s)",
        flush=True)
  bad = mismatch(z, cov, z_ref, cov_ref, DEPTH_TOL)
  n_dense = np.asarray(jax.jit(jax.vmap(lambda d, v: dense_faces(d, v, cam)))(depth, views))
  # Visibility ties (a pixel centre on an edge two faces share, same depth) may
  # pick different faces: same depth, different one-sided gradients there.
  grad_diff = [float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
               for a, b in zip(g_ours, g_brute)]

  # float64 NumPy reference on the first few images (slow: a face at a time).
  k = min(args.f64_images, batch)
  bad64 = bad64_brute = 0
  for i in range(k):
    z64, cov64 = render_reference.warp_depth_reference(depth_np[i], views_np[i], cam)
    bad64 += int(mismatch(z[i], cov[i], z64, cov64, DEPTH_TOL).sum())
    bad64_brute += int(mismatch(z_ref[i], cov_ref[i], z64, cov64, DEPTH_TOL).sum())

  case.update(ms_brute=1e3 * ms_brute, brute_repeats=brute_repeats,
              first_call_s_brute=first_brute, ratio_brute=ms_brute / ms_ours,
              pixels=int(bad.size), mismatch_vs_brute=int(bad.sum()),
              covered_fraction=float(np.mean(cov)), dense_faces_mean=float(n_dense.mean()),
              dense_faces_max=int(n_dense.max()),
              grad_rel_max_diff_vs_brute=dict(zip(("depth", "view"), grad_diff)),
              float64_images=k, mismatch_vs_float64=bad64,
              brute_mismatch_vs_float64=bad64_brute)
  if not peer_python:
    return case, None

  pb = min(args.peer_batch, batch) if args.peer_batch > 0 else batch
  verts = jax.vmap(lambda d, v: render.transform_points(
      render.depth_to_points(d, cam).reshape(-1, 3), v, cam))(depth[:pb], views[:pb])
  try:
    info, z_peer, cov_peer = run_peer(peer_python, verts, cam, args.repeats, workdir)
  except (OSError, RuntimeError, ValueError) as e:
    print(f"  peer failed: {e}", flush=True)
    return case, str(e)
  bad_peer = mismatch(z[:pb], cov[:pb], z_peer, cov_peer, PEER_DEPTH_TOL)
  both = np.asarray(cov[:pb]) & cov_peer
  diff = np.abs(np.asarray(z[:pb], np.float64) - z_peer)[both]
  ms_peer = info["ms_per_image"] * batch  # linear in the number of images
  case.update(ms_peer=ms_peer, peer_batch=pb, peer_scaled=pb < batch,
              peer_ms_per_image=info["ms_per_image"], peer_first_call_s=info["first_call_s"],
              ratio_peer=ms_peer / (1e3 * ms_ours),
              peer_mismatch_fraction=float(bad_peer.mean()),
              peer_coverage_mismatch=int((np.asarray(cov[:pb]) != cov_peer).sum()),
              peer_max_abs_depth_diff=float(diff.max()) if diff.size else 0.0)
  scaled = f", timed on {pb} images" if pb < batch else ""
  print(f"  peer         {ms_peer:9.1f} ms/batch ({info['ms_per_image']:.1f} ms/image x "
        f"{batch}{scaled}; first call {info['first_call_s']:.1f} s)", flush=True)
  return case, None


def print_table(cases, peer_error):
  hdr = (f"{'case':<12}{'ours ms':>10}{'brute ms':>11}{'peer ms':>11}{'brute/ours':>12}"
         f"{'peer/ours':>11}{'mismatch':>10}{'dense faces':>13}{'ours vmap':>14}")
  print("\n" + hdr + "\n" + "-" * len(hdr))
  fmt = lambda c, k, f: format(c[k], f) if c.get(k) is not None else "-"
  for c in cases:
    peer_ms = fmt(c, "ms_peer", ".1f") + ("*" if c.get("peer_scaled") else "")
    print(f"{c['case']:<12}{c['ms_ours']:>10.1f}{c['ms_brute']:>11.1f}{peer_ms:>11}"
          f"{c['ratio_brute']:>12.1f}{fmt(c, 'ratio_peer', '.1f'):>11}"
          f"{c['mismatch_vs_brute']:>10d}{c['dense_faces_mean']:>13.1f}"
          f"{fmt(c, 'ms_ours_vmap', '.1f'):>14}")
  print("ms: median per batch of fwd+bwd (ours: jit(grad) of warp_depth_batch; brute and vmap: jit(vmap(grad))), compile excluded."
        "\nmismatch: pixels of ours vs the brute-force exact reference (coverage differs or"
        f" |dz| > {DEPTH_TOL:g}), all images.\ndense faces: mean per image taking the"
        " large-triangle path. ours vmap: jax.vmap of the single-image warp_depth (slower: its while-loops run the worst image's trip count for every image).")
  if any(c.get("peer_scaled") for c in cases):
    print("* peer (jaxrenderer 0.3.2) timed on a smaller batch (peer_batch images) and "
          "scaled linearly per image.")
  for c in cases:
    g = c["grad_rel_max_diff_vs_brute"]
    line = (f"{c['case']}: float64 reference on images 0..{c['float64_images'] - 1}: ours "
            f"{c['mismatch_vs_float64']} / brute {c['brute_mismatch_vs_float64']} mismatching "
            f"pixels; grads vs brute: max |diff| / max |grad| = {g['depth']:.1e} (depth), "
            f"{g['view']:.1e} (view)")
    if "peer_mismatch_fraction" in c:
      line += (f"; peer vs ours on {c['peer_batch']} images: {c['peer_mismatch_fraction']:.1e}"
               f" of pixels differ (coverage {c['peer_coverage_mismatch']} px, |dz| >"
               f" {PEER_DEPTH_TOL:g} otherwise; max |dz| {c['peer_max_abs_depth_diff']:.1e})")
    print(line)
  if peer_error:
    print(f"peer: {peer_error.strip().splitlines()[0]}")


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--no-peer", action="store_true", help="skip jaxrenderer")
  ap.add_argument("--peer-python", help="interpreter with jaxrenderer==0.3.2")
  ap.add_argument("--peer-venv", default=os.path.join(ROOT, ".venv-peer"),
                  help="created here when --peer-python is not given")
  ap.add_argument("--peer-batch", type=int, default=4,
                  help="images the peer times per case, scaled to the batch (0: all)")
  ap.add_argument("--brute-repeats", type=int, default=3,
                  help="repeats for the (slow) brute force, at most --repeats; 0: --repeats")
  ap.add_argument("--f64-images", type=int, default=2,
                  help="images per case checked against the float64 NumPy reference")
  args = ap.parse_args()
  t_start = time.perf_counter()
  load_start = os.getloadavg()[0]

  peer_python, peer_error = None, None
  if not args.no_peer:
    try:
      if args.peer_python:  # absolute: the peer runs from a temporary directory
        peer_python = (os.path.abspath(args.peer_python) if os.sep in args.peer_python
                       else args.peer_python)
      else:
        peer_python = ensure_peer_python(args.peer_venv)
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
      peer_error = f"peer unavailable: {e}"
      print(peer_error, flush=True)

  print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} CPUs, "
        f"load average {load_start:.1f}), repeats {args.repeats}, seed {args.seed}",
        flush=True)
  cases = []
  with tempfile.TemporaryDirectory(prefix="bench_render_") as workdir:
    for ci, (size, batch) in enumerate(QUICK_CASES if args.quick else FULL_CASES):
      case, err = bench_case(ci, size, batch, args, peer_python, workdir)
      cases.append(case)
      peer_error = peer_error or err
  print_table(cases, peer_error)

  load_end = os.getloadavg()[0]
  if max(load_start, load_end) > 1.5 * (os.cpu_count() or 1):
    print(f"note: the machine was busy (load average {load_start:.1f} -> {load_end:.1f} on "
          f"{os.cpu_count()} CPUs): timings are noisy.")
  main_case = cases[0]
  summary = dict(
      ms_per_batch=main_case["ms_ours"],
      mismatch_pixels_vs_exact=int(sum(c["mismatch_vs_brute"] for c in cases)),
      ratio_vs_jaxrenderer=main_case.get("ratio_peer"),
      main_case=main_case["case"],
      ms_per_batch_32=next((c["ms_ours"] for c in cases if c["height"] == 32), None),
      ratio_vs_brute=main_case["ratio_brute"],
      mismatch_pixels_vs_float64=int(sum(c["mismatch_vs_float64"] for c in cases)),
      float64_images={c["case"]: c["float64_images"] for c in cases},
      pixels_checked=int(sum(c["pixels"] for c in cases)),
      peer_batch={c["case"]: c.get("peer_batch") for c in cases},
      peer_error=peer_error, quick=args.quick, repeats=args.repeats, seed=args.seed,
      jax=jax.__version__, platform=jax.devices()[0].platform, cpus=os.cpu_count(),
      load_average=[load_start, load_end], total_s=time.perf_counter() - t_start,
      cases=cases)
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
