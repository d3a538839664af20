#!/usr/bin/env python
"""Data at scale (a benchmark, not a test): prepare, train start-up, input pipeline.

  python experiments/bench_data.py [--n 200000] [--dir /tmp/scr_bench_data]
      [--workers 1,2,4] [--preset paper] [--train-steps 20] [--skip-train]

1. Writes N synthetic 178x218 JPEGs (CelebA's aligned-crop size; smooth random
   colour fields plus noise, seeded by index) into DIR/jpg_N (kept for reruns).
2. Times `run.py prepare --data DIR/jpg_N --out DIR/ds_N --image-size 64 --crop C`
   (C: the preset's crop, 170 for paper).
3. Times `run.py train --preset PRESET --data DIR/ds_N --steps 20`: seconds to
   the data being ready ("train: ..." line) and to the first step logged, the
   train process's peak RSS when its data is ready (VmHWM, before anything is
   compiled), and the peak RSS of the largest process of the whole run
   (ru_maxrss of the children: the model's working set while it trains dominates it;
   `bench_train.py --memory` gives XLA's figure).
4. The input pipeline alone (`dataset.Batches`, streamed from array_record,
   batch 64 at 64 px) in images/s with 1, 2 and 4 grain worker processes.
Prints a table, then one JSON line (the last line).
"""
import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from scr_jax import config, dataset, prepare  # noqa: E402

RUN = os.path.join(ROOT, "experiments", "run.py")


def _write_jpegs(args):
  folder, lo, hi = args
  for i in range(lo, hi):
    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:218, 0:178].astype(np.float32)
    c = rng.uniform(0, 1, (3, 3))
    img = (c[:, 0, None, None] + c[:, 1, None, None] * x / 178 + c[:, 2, None, None] * y / 218)
    img = np.moveaxis(img, 0, -1) * 120 + rng.normal(0, 12, (218, 178, 3))
    sub = os.path.join(folder, f"{i // 10000:03d}")
    os.makedirs(sub, exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
        os.path.join(sub, f"{i:06d}.jpg"), quality=90)
  return hi - lo


def make_jpegs(folder: str, n: int, procs: int) -> float:
  """N JPEGs in folder/NNN/NNNNNN.jpg (skipped when already complete)."""
  done = folder + ".complete"  # beside it: prepare would note a hidden file inside
  if os.path.exists(done):
    return 0.0
  t = time.time()
  step = 2000
  jobs = [(folder, lo, min(lo + step, n)) for lo in range(0, n, step)]
  with multiprocessing.get_context("spawn").Pool(procs) as pool:
    for _ in pool.imap_unordered(_write_jpegs, jobs):
      pass
  open(done, "w").close()
  return time.time() - t


def timed_prepare(src: str, out: str, size: int, crop, workers) -> float:
  cmd = [sys.executable, RUN, "prepare", "--data", src, "--out", out, "--image-size",
         str(size), "--overwrite"] + (["--workers", str(workers)] if workers else []) + (
             ["--crop", str(crop)] if crop else [])
  t = time.time()
  res = subprocess.run(cmd, capture_output=True, text=True)
  if res.returncode:
    sys.exit(f"prepare failed: {res.stderr.strip()[-500:]}")
  return time.time() - t


_WRAP = """
import resource, subprocess, sys, time
t0 = time.time(); ready = first = None; rss_ready = 0.0
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
for line in p.stdout:
  if ready is None and line.startswith("train: "):
    ready = time.time() - t0
    with open(f"/proc/{p.pid}/status") as fh:  # peak so far: data read, nothing compiled
      rss_ready = [int(x.split()[1]) for x in fh if x.startswith("VmHWM")][0] / 2**20
  if first is None and line.startswith("step "):
    first = time.time() - t0
  sys.stderr.write(line)
p.wait()
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
print(f"RESULT {p.returncode} {ready} {first} {time.time() - t0} {rss} {rss_ready}")
"""


def timed_train(ds: str, preset: str, steps: int, workdir: str) -> dict:
  cmd = [sys.executable, "-c", _WRAP, sys.executable, RUN, "train", "--preset", preset,
         "--data", ds, "--workdir", workdir, "--steps", str(steps), "--no-resume",
         "--restart", "--set", "log_every=1"]
  res = subprocess.run(cmd, capture_output=True, text=True)
  line = [x for x in res.stdout.splitlines() if x.startswith("RESULT")]
  if not line:
    sys.exit(f"train failed: {res.stderr.strip()[-800:]}")
  rc, ready, first, total, rss, rss_ready = line[-1].split()[1:]
  if rc != "0":
    sys.exit(f"train failed ({rc}): {res.stderr.strip()[-800:]}")
  num = lambda v: None if v == "None" else round(float(v), 1)
  return dict(data_ready_s=num(ready), first_step_s=num(first), total_s=num(total),
              peak_rss_at_data_ready_gb=round(float(rss_ready), 2),
              peak_rss_gb=round(float(rss), 2))


def pipeline_rate(ds: str, workers: int, batch: int = 64, batches: int = 60) -> float:
  """Images/s of dataset.Batches streaming from disk (after a first batch)."""
  man = prepare.read_manifest(ds)
  prep = dataset.Prepared(ds, man)
  n = man["splits"]["train"]["n"]
  ts = dataset.TrainSplit(prep, "train", n)  # images=None: streamed, as at scale
  b = dataset.Batches(ts, batch, 0, 0, batches + 1, workers=workers)
  next(b)
  t = time.time()
  k = sum(x.shape[0] for x in b)
  dt = time.time() - t
  b.close()
  return k / dt


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--n", type=int, default=200000)
  p.add_argument("--dir", default="/tmp/scr_bench_data")
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--crop", type=int, help="centre crop before resizing (default: the "
                 "preset's, 170 for paper)")
  p.add_argument("--workers", default="1,2,4", help="grain worker counts to time")
  p.add_argument("--prepare-workers", type=int, help="decoding processes (default: prepare's)")
  p.add_argument("--preset", default="paper")
  p.add_argument("--train-steps", type=int, default=20)
  p.add_argument("--skip-train", action="store_true")
  args = p.parse_args()
  src = os.path.join(args.dir, f"jpg_{args.n}")
  crop = config.get_config(args.preset).crop if args.crop is None else args.crop
  ds = os.path.join(args.dir, f"ds_{args.n}_s{args.size}_c{crop or 'full'}")
  out = dict(n=args.n, size=args.size, crop=crop, cpus=os.cpu_count())
  out["make_jpegs_s"] = round(make_jpegs(src, args.n, os.cpu_count() or 1), 1)
  out["prepare_s"] = round(timed_prepare(src, ds, args.size, crop, args.prepare_workers), 1)
  out["prepare_img_s"] = round(args.n / out["prepare_s"])
  print(f"N={args.n}: prepare {out['prepare_s']} s ({out['prepare_img_s']} img/s)", flush=True)
  if not args.skip_train:
    out["train"] = timed_train(ds, args.preset, args.train_steps,
                               os.path.join(args.dir, f"w_{args.n}"))
    print(f"  train --preset {args.preset}: {out['train']}", flush=True)
  out["pipeline_img_s"] = {}
  for w in [int(x) for x in args.workers.split(",") if x]:
    out["pipeline_img_s"][w] = round(pipeline_rate(ds, w))
    print(f"  input pipeline, {w} worker(s): {out['pipeline_img_s'][w]} img/s", flush=True)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
