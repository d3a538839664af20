"""experiments/device_check.sh --quick: the GPU check's whole path (both
benchmarks, a training, its evaluation, the summary) on CPU at test_tiny size,
with tensorflow-datasets and grain made unimportable (the GPU machine has
neither)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_device_check_quick_writes_the_summary(tmp_path):
  blocked = tmp_path / "blocked"
  for name in ("tensorflow_datasets", "grain"):
    (blocked / name).mkdir(parents=True)
    (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked')\n")
  out = tmp_path / "out"
  env = dict(os.environ, OUT=str(out), PYTHON=sys.executable,
             PYTHONPATH=os.pathsep.join([str(blocked), ROOT]))
  proc = subprocess.run(["bash", os.path.join(ROOT, "experiments", "device_check.sh"), "--quick"],
                        env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
  summ = json.loads((out / "summary.json").read_text())
  assert summ["ok"] and summ["quick"]
  assert set(summ["stages"]) == {"bench_train", "bench_candidates", "train", "eval"}
  (row,) = summ["bench_train"]
  assert row["preset"] == "test_tiny" and row["step_ms"] > 0 and row["images_per_s"] > 0
  assert 0 < row["fraction_of_matmul"]
  assert summ["candidates"]["k"] == 2 and summ["candidates"]["vmap_over_sequential_ratio"] > 0
  t = summ["training"]
  assert t["steps"] == 4 and t["images_per_s"] > 0 and 0 <= t["mad_deg"] <= 90
  md = (out / "summary.md").read_text()
  for key in ("step ms", "images/s", "vmapped / sequential", "test MAD"):
    assert key in md
  assert (out / "eval.json").exists() and (out / "bench_train.log").exists()
