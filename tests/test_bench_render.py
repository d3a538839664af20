"""Smoke run of experiments/bench_render.py (quick sizes, no peer)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_render_quick_is_exact():
  r = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "bench_render.py"),
                      "--quick", "--no-peer", "--repeats", "1", "--f64-images", "1"],
                     capture_output=True, text=True, cwd=ROOT, timeout=300,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr[-2000:]
  summary = json.loads(r.stdout.strip().splitlines()[-1])
  assert summary["mismatch_pixels_vs_exact"] == 0
  assert summary["mismatch_pixels_vs_float64"] == 0
  assert summary["ms_per_batch"] > 0 and summary["quick"]
  assert summary["ratio_vs_jaxrenderer"] is None  # --no-peer
