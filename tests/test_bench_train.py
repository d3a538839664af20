"""experiments/bench_train.py --ops: the per-op profile attributes the step's
XLA ops to the pipeline stages (from the compiled module's stack frames)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_hlo_sources_reads_stack_frames():
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  try:
    import bench_train
  finally:
    sys.path.pop(0)
  text = "\n".join([
      "HloModule m", "", "FileNames", '1 "/a/scr_jax/nets.py"', '2 "/a/scr_jax/model.py"', "",
      "FunctionNames", '1 "conv2d"', '2 "factors"', "",
      "FileLocations", "1 {file_name_id=1 function_name_id=1 line=10 end_line=10}",
      "2 {file_name_id=2 function_name_id=2 line=20 end_line=20}", "",
      "StackFrames", "1 {file_location_id=2}", "2 {file_location_id=1 parent_frame_id=1}", "",
      "ENTRY %main {",
      '  %conv.3 = f32[2]{0} convolution(%a, %b), metadata={op_name="jit(step)/transpose('
      'jvp())/conv_general_dilated" stack_frame_id=2}',
      "  %copy.1 = f32[2]{0} copy(%a)",
      "}"])
  ops = bench_train._hlo_sources(text)
  assert ops["conv.3"] == ("jit(step)/transpose(jvp())/conv_general_dilated",
                           [("nets.py", "conv2d", 10), ("model.py", "factors", 20)])
  assert "copy.1" not in ops  # no metadata: not attributed


def test_ops_profile_attributes_the_step():
  r = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "bench_train.py"),
                      "--ops", "--presets", "test_tiny", "--repeats", "2"],
                     capture_output=True, text=True, cwd=ROOT, timeout=300,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr[-2000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  stages = out["stages"]
  for stage in ("nets forward", "nets backward", "renderer forward", "renderer backward",
                "optimizer"):
    assert stages.get(stage, 0) > 0, (stage, stages)
  attributed = sum(v for k, v in stages.items() if not k.startswith("unattributed"))
  assert attributed > 0.5 * out["exclusive_s"], stages
  # Exclusive times cannot add up to more than the threads could run.
  assert out["exclusive_s"] <= 1.5 * out["step_s"] * os.cpu_count()
  assert any(k.startswith("nets.py:") for k in out["functions"])
