#!/usr/bin/env bash
# The GPU check, one script (under 8 minutes on one GPU), everything under $OUT
# (default ./device_out):
#   bench_train.py for cpu_small and paper, bench_candidates.py --k 24, a
#   5-minute `paper` training on the built-in data at 64 px, its evaluation on
#   the test split, and summary.json + summary.md (images/s, step ms, vmap
#   ratio, MAD at 5 minutes).
#
#   experiments/device_check.sh            # on the GPU machine
#   experiments/device_check.sh --quick    # the same path on CPU in CI-size time
#
# Needs jax (+ CUDA), flax, optax, chex, orbax, Pillow, numpy; not
# tensorflow-datasets or grain (nothing on this path imports them). The one
# other package training needs, tensorboardX (pure Python), is installed from
# ./.whl/*.whl when it is missing (README "Speed" says how to fetch that wheel).
# Environment: PYTHON (default python3), TRAIN_SECONDS (default 300).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
OUT="${OUT:-$ROOT/device_out}"
QUICK=0
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $arg (use --quick or nothing)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT" || { echo "error: cannot create $OUT" >&2; exit 2; }
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/scr_device_check.XXXXXX")"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
# The device machine gets the tree without `pip install -e .`: scr_jax from ROOT.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$WORK/jax_cache}"

if ! "$PY" -c "import tensorboardX" 2>/dev/null; then
  if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" \
      "$ROOT"/.whl/*.whl || exit 2
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "error: tensorboardX is missing and no wheel is in $ROOT/.whl" >&2; exit 2
  fi
fi

if [ "$QUICK" = 1 ]; then
  export JAX_PLATFORMS=cpu
  BT_ARGS=(--presets test_tiny --repeats 2 --matmul-n 256)
  BC_ARGS=(--preset test_tiny --k 2 --steps 1 --repeats 1)
  TRAIN_PRESET=test_tiny; TRAIN_SECONDS="${TRAIN_SECONDS:-120}"; TRAIN_EXTRA=(--steps 4)
  DATA="$WORK/data"; DATA_ARGS=(--n-train 32 --n-val 8 --n-test 8 --size 16)
  LIMITS=(300 300 180 180)  # stage time limits: a shared CI machine compiles slowly
else
  BT_ARGS=(--presets cpu_small,paper --repeats 3)
  BC_ARGS=(--preset cpu_small --k 24 --steps 2 --repeats 2)
  TRAIN_PRESET=paper; TRAIN_SECONDS="${TRAIN_SECONDS:-300}"; TRAIN_EXTRA=()
  DATA=builtin; DATA_ARGS=()
  # Stage time limits (bench_train, bench_candidates, train beyond its budget,
  # eval) keep the run under ~10.5 minutes even if one stage hangs (typically
  # ~1.5 + ~1.5 + 5 + ~0.5 minutes).
  LIMITS=(120 100 45 60)
fi

STAGES="$WORK/stages.txt"; : > "$STAGES"
stage() {  # stage NAME LOGFILE TIMEOUT_S CMD...: runs, logs, records rc and seconds
  local name="$1" log="$2" limit="$3"; shift 3
  local t0; t0=$(date +%s)
  echo "== $name: $*" >&2
  timeout "$limit" "$@" >"$log" 2>&1
  local rc=$?
  echo "$name $rc $(( $(date +%s) - t0 ))" >> "$STAGES"
  [ $rc = 0 ] || { echo "   $name failed (rc $rc); last lines:" >&2; tail -5 "$log" >&2; }
  return 0
}

uptime > "$WORK/load_before.txt" 2>/dev/null || true
"$PY" -c "import jax; d = jax.devices()[0]; print(jax.__version__, d.platform, d.device_kind)" \
  > "$OUT/env.txt" 2>&1
# Data first, in the background (CPU work beside the GPU benchmarks).
if [ "$DATA" = builtin ]; then
  "$PY" -c "from scr_jax import datasets; datasets.ensure_builtin(64)" \
    > "$WORK/data.log" 2>&1 &
else
  "$PY" "$ROOT/experiments/run.py" data --out "$DATA" "${DATA_ARGS[@]}" > "$WORK/data.log" 2>&1 &
fi
DATA_PID=$!

stage bench_train "$OUT/bench_train.log" "${LIMITS[0]}" "$PY" "$ROOT/experiments/bench_train.py" "${BT_ARGS[@]}"
stage bench_candidates "$OUT/bench_candidates.log" "${LIMITS[1]}" \
  "$PY" "$ROOT/experiments/bench_candidates.py" "${BC_ARGS[@]}"
wait "$DATA_PID" || { echo "error: data generation failed:" >&2; tail -5 "$WORK/data.log" >&2; }
stage train "$OUT/train.log" $((TRAIN_SECONDS + LIMITS[2])) "$PY" "$ROOT/experiments/run.py" train \
  --preset "$TRAIN_PRESET" --data "$DATA" --workdir "$WORK/train" --no-resume \
  --max-seconds "$TRAIN_SECONDS" ${TRAIN_EXTRA[@]+"${TRAIN_EXTRA[@]}"}
stage eval "$OUT/eval.log" "${LIMITS[3]}" "$PY" "$ROOT/experiments/run.py" eval --workdir "$WORK/train" \
  --data "$DATA" --split test --out "$OUT/eval.json"
uptime > "$WORK/load_after.txt" 2>/dev/null || true

"$PY" - "$OUT" "$WORK" "$QUICK" "$TRAIN_PRESET" "$TRAIN_SECONDS" <<'EOF'
"""Reads the stage logs (each benchmark's last line is JSON) into summary.json/.md."""
import json, os, re, sys
out, work, quick, preset, train_seconds = sys.argv[1:]

def last_json(path):
  try:
    lines = [l for l in open(path).read().splitlines() if l.startswith("{")]
    return json.loads(lines[-1]) if lines else None
  except (OSError, ValueError):
    return None

def read(path):
  try:
    return open(path).read().strip()
  except OSError:
    return ""

stages = {}
for line in read(os.path.join(work, "stages.txt")).splitlines():
  name, rc, secs = line.split()
  stages[name] = dict(rc=int(rc), seconds=round(float(secs), 1))
bt = last_json(os.path.join(out, "bench_train.log")) or {}
bc = last_json(os.path.join(out, "bench_candidates.log")) or {}
try:
  ev = json.load(open(os.path.join(out, "eval.json")))
except (OSError, ValueError):
  ev = {}
m = re.search(r"trained to step (\d+) in (\d+)s", read(os.path.join(out, "train.log")))
steps, secs = (int(m.group(1)), int(m.group(2))) if m else (None, None)
try:
  batch = json.load(open(os.path.join(work, "train", "config.json")))["batch_size"]
except (OSError, ValueError, KeyError):
  batch = None
summary = dict(
    quick=quick == "1", env=read(os.path.join(out, "env.txt")),
    load_before=read(os.path.join(work, "load_before.txt")),
    load_after=read(os.path.join(work, "load_after.txt")), stages=stages,
    bench_train=[dict(preset=r["preset"], batch=r["batch"], step_ms=1e3 * r["step_s"],
                      images_per_s=r["images_per_s"],
                      fraction_of_matmul=r.get("fraction_of_matmul"))
                 for r in bt.get("presets", [])],
    matmul_flops_per_s=bt.get("matmul_flops_per_s"),
    candidates=dict(k=bc.get("k"), preset=bc.get("preset"),
                    vmap_over_sequential_ratio=bc.get("vmap_over_sequential_ratio"),
                    ms_per_candidate_step_vmapped=bc.get("ms_per_candidate_step_vmapped"),
                    ms_per_candidate_step_sequential=bc.get("ms_per_candidate_step_sequential")),
    training=dict(preset=preset, max_seconds=float(train_seconds), steps=steps, seconds=secs,
                  images_per_s=steps * batch / secs if steps and secs else None,
                  mad_deg=ev.get("mad_mean"), side=ev.get("side_mean")))
summary["ok"] = bool(stages) and all(s["rc"] == 0 for s in stages.values())
with open(os.path.join(out, "summary.json"), "w") as fh:
  json.dump(summary, fh, indent=1)
f = lambda v, fmt: "n/a" if v is None else format(v, fmt)
md = [f"# device check{' (--quick, CPU)' if summary['quick'] else ''}", "",
      f"{summary['env']}; load before: {summary['load_before']}", "",
      "| preset | batch | step ms | images/s | fraction of matmul |", "|---|---|---|---|---|"]
md += [f"| {r['preset']} | {r['batch']} | {f(r['step_ms'], '.1f')} | {f(r['images_per_s'], '.1f')}"
       f" | {f(r['fraction_of_matmul'], '.2f')} |" for r in summary["bench_train"]]
c, t = summary["candidates"], summary["training"]
md += ["", f"K={c['k']} candidates ({c['preset']}): vmapped / sequential = "
       f"{f(c['vmap_over_sequential_ratio'], '.2f')} ({f(c['ms_per_candidate_step_vmapped'], '.1f')}"
       f" vs {f(c['ms_per_candidate_step_sequential'], '.1f')} ms per candidate-step)", "",
       f"Training {t['preset']} for {t['max_seconds']:.0f} s: {t['steps']} steps, "
       f"{f(t['images_per_s'], '.1f')} images/s (compile and evaluation included); "
       f"test MAD {f(t['mad_deg'], '.2f')} deg, SIDE {f(t['side'], '.4f')}", "",
       "| stage | rc | seconds |", "|---|---|---|"]
md += [f"| {k} | {v['rc']} | {v['seconds']} |" for k, v in stages.items()]
with open(os.path.join(out, "summary.md"), "w") as fh:
  fh.write("\n".join(md) + "\n")
print("\n".join(md))
sys.exit(0 if summary["ok"] else 1)
EOF
rc=$?
rm -rf "$WORK"
exit $rc
