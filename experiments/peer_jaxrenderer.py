"""Peer side of bench_render.py: depth rendering with jaxrenderer==0.3.2.

Runs inside the peer's own venv (jax 0.4.13), so it imports nothing from
scr_jax. Reads view-space vertices and faces from an .npz, renders the
z-buffer depth of the same triangles with our pinhole intrinsics, writes the
depth images and times jit(vmap(grad(sum of depth))) w.r.t. the vertices.

  python peer_jaxrenderer.py IN.npz OUT.npz --repeats 5
"""
import argparse
import json
import os
import sys
import time
import warnings

# jaxrenderer uses jaxtyping's old decorator syntax: one warning per function.
warnings.filterwarnings("ignore")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import renderer  # noqa: E402
from renderer import Buffers, Camera  # noqa: E402
from renderer.shaders.depth import DepthExtraInput, DepthShader  # noqa: E402


class TwoSidedDepthShader(DepthShader):
  """DepthShader without back-face culling: our rasterizer keeps both sides
  (folds at depth steps under rotation face away from the camera)."""

  @staticmethod
  def primitive_chooser(gl_FragCoord, gl_FrontFacing, gl_PointCoord, keeps,
                        values, barycentric_screen, barycentric_clip):
    return DepthShader.primitive_chooser(
        gl_FragCoord, jnp.ones_like(gl_FrontFacing), gl_PointCoord, keeps,
        values, barycentric_screen, barycentric_clip)


def make_camera(focal, cx, cy):
  """Clip space chosen so that jaxrenderer's pipeline reproduces our camera.

  Clip = (f X + cx Z, f Y + cy Z, -1, Z): x/w, y/w are our pixel coordinates
  (identity viewport; the pipeline samples pixel centres at integer
  coordinates, buffer axis 0 = column). A constant clip z of -1 makes the
  interpolated fragment depth -sum(b_i / Z_i) = -1/Z exactly, which orders
  fragments like Z, so its min-depth test is our z-buffer.
  """
  proj = jnp.array([[focal, 0.0, cx, 0.0],
                    [0.0, focal, cy, 0.0],
                    [0.0, 0.0, 0.0, -1.0],
                    [0.0, 0.0, 1.0, 0.0]], jnp.float32)
  eye = jnp.eye(4, dtype=jnp.float32)
  return Camera.create(view=eye, projection=proj, viewport=eye)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("input")
  ap.add_argument("output")
  ap.add_argument("--repeats", type=int, default=5)
  args = ap.parse_args()

  data = np.load(args.input)
  verts = jnp.asarray(data["verts"], jnp.float32)  # B x N x 3, view space
  faces = jnp.asarray(data["faces"], jnp.int32)
  height, width = int(data["height"]), int(data["width"])
  near, far = float(data["near"]), float(data["far"])
  camera = make_camera(float(data["focal"]), float(data["cx"]), float(data["cy"]))

  def depth_image(v):
    buffers = Buffers(zbuffer=jnp.zeros((width, height), jnp.float32), targets=())
    out = renderer.render(camera, TwoSidedDepthShader, buffers, faces,
                          DepthExtraInput(position=v))
    inv = out.zbuffer.T  # H x W, -1/Z where covered, 0 where not
    covered = inv < 0
    z = jnp.where(covered, -1.0 / jnp.where(covered, inv, -1.0), far)
    return jnp.clip(z, near, far), covered

  loss = lambda v: jnp.sum(depth_image(v)[0])
  fwd = jax.jit(jax.vmap(depth_image))
  step = jax.jit(jax.vmap(jax.grad(loss)))

  depth, covered = jax.block_until_ready(fwd(verts))
  t0 = time.perf_counter()
  jax.block_until_ready(step(verts))
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(step(verts))
    times.append(time.perf_counter() - t0)
  np.savez(args.output, depth=np.asarray(depth), covered=np.asarray(covered))
  ms = 1e3 * float(np.median(times))
  print(json.dumps(dict(ms_per_batch=ms, batch=int(verts.shape[0]),
                        ms_per_image=ms / verts.shape[0],
                        first_call_s=compile_s, times_s=times,
                        jax=jax.__version__, python=sys.version.split()[0])))


if __name__ == "__main__":
  main()
