#!/usr/bin/env python
"""Robustness benchmark: does training learn on every seed and every variant
of the built-in data? Trains one run per (variant, seed) for a fixed step
budget, then tabulates test MAD / SIDE and the diagnostics next to the three
baselines (constant, average GT depth, template).

  python experiments/bench_quality.py [--preset cpu_small] [--seeds 0,1,2,3,4]
      [--seeds-of VARIANT=SEEDS ...] [--variants default,wide_pose,...|all] [--steps 2000]
      [--set key=value ...] [--jobs 1|2] [--budget SECONDS] [--out DIR]
      [--report | --baselines-only]

Variants are the named generator settings of scr_jax/data.py (VARIANTS);
each one's data is generated once under data/ (`--data builtin:NAME`).
`--seeds-of default=0,1,2,3,4` gives one variant its own seeds (issue 20's
benchmark: `--variants all --seeds 0,1,2 --seeds-of default=0,1,2,3,4`).
Resumable: every finished run writes OUT/<variant>_s<seed>/result.json and is
skipped by a rerun; an interrupted run resumes from its last checkpoint (Ctrl-C
checkpoints the runs in flight). `--jobs 2` runs two processes at a time, each
pinned to one core with `taskset` (on a 2-core machine: both cores).
`--set` goes to every run's training config (to compare a config field on /
off, give each setting its own --out; the default --out names the settings).
Writes OUT/table.md and OUT/table.csv (all runs finished so far) and prints
the markdown table; `--report` only tabulates.
"""
import argparse
import csv
import hashlib
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".jax_cache"))

from scr_jax import (cliutil, data, dataset, diagnostics, evaluator, jsonio, parallel,  # noqa: E402
                     runner)
from scr_jax.errors import NonFiniteError, UserError  # noqa: E402
from scr_jax.evaluator import Evaluator  # noqa: E402

# Table columns: (key in result.json, header, format, worst = max or min).
COLUMNS = (
    ("mad", "MAD deg", "{:.2f}", max),
    ("side", "SIDE x1e-2", "{:.3f}", max),
    ("mad_vs_avg", "MAD / avg-GT", "{:.2f}", max),
    ("mad_vs_template", "MAD / template", "{:.2f}", max),
    ("view_mae_deg", "view err deg", "{:.1f}", max),
    ("view_yaw_mae_deg", "yaw err deg", "{:.1f}", max),
    ("view_yaw_corr", "yaw corr", "{:.3f}", min),
    ("view_pitch_offset_deg", "pitch offset deg", "{:+.1f}", None),
    ("depth_sign", "convex", "{:.2f}", min),
    ("shape_spread_ratio", "shape spread", "{:.2f}", min),
    ("shape_corr", "shape corr", "{:.2f}", min),
    ("relief_ratio", "relief x truth", "{:.2f}", None),
    ("light_oblique_slope", "light obliqueness x truth", "{:.2f}", None),
)
BASELINE_COLUMNS = (("constant null depth", "const MAD"), ("average GT depth", "avg-GT MAD"),
                    ("template depth, true view", "template MAD"))


_write_json = jsonio.write_json  # a result is either complete or absent


def _read_json(path):
  if not os.path.exists(path):
    return None
  with open(path) as fh:
    return json.load(fh)


def _int_list(text, what, distinct=True):
  try:
    vals = [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise UserError(f"--{what} takes a comma list of integers, got {text!r}") from None
  if not vals or (distinct and len(set(vals)) != len(vals)):
    raise UserError(f"--{what} must list distinct values, got {text!r}")
  return vals


def _config(args, seed):
  return runner.make_config(args.preset, list(args.set), steps=args.steps, seed=seed)


def _data_dir(args, variant, cfg):
  """The variant's data folder (generated once), at its export size."""
  size = data.get_variant(variant).export_size or cfg.image_size
  counts = None
  if args.counts:
    n = _int_list(args.counts, "counts", distinct=False)
    if len(n) != 3 or min(n) < 1:
      raise UserError(f"--counts takes N_TRAIN,N_VAL,N_TEST (each >= 1), got {args.counts!r}")
    counts = dict(n_train=n[0], n_val=n[1], n_test=n[2])
  return dataset.ensure_builtin(size, 0, variant, counts, args.data_root)


# ----------------------------------------------------------------------------
# One run (a subprocess of the driver)
# ----------------------------------------------------------------------------

def run_one(args):
  """Trains (or resumes) one (variant, seed) and writes its result.json."""
  cfg = _config(args, args.seed)
  t0 = time.time()
  res = runner.train_run(cfg, args.workdir, args.data, max_seconds=args.budget)
  if res["reason"] in ("SIGINT", "SIGTERM"):
    sys.exit(130 if res["reason"] == "SIGINT" else 143)
  cfg = res["cfg"]  # as trained (e.g. a fitted prior ellipse)
  test = dataset.load_split(args.data, "test", cfg)
  st = res["structure"]
  params = res["state"].params
  summ, _, _ = Evaluator(res["nets"], cfg).evaluate(params, test, st)
  out = dict(variant=args.bench_variant, seed=args.seed, steps=res["step"],
             train_seconds=res["seconds"], wall_seconds=time.time() - t0,
             side=summ["side_mean"], mad=summ["mad_mean"], mad_unsup3d=summ["mad_unsup3d_mean"],
             n_test=summ["n"], status="done", stop=res["reason"])
  if "gt" in test:
    out.update(diagnostics.evaluate(res["nets"], params, test, st, cfg))
  _write_json(os.path.join(args.workdir, "result.json"), out)


# ----------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------

def _settings(args):
  return dict(preset=args.preset, steps=args.steps, set=sorted(args.set), counts=args.counts,
              data_root=args.data_root, budget=args.budget)


def _default_out(args):
  name = f"{args.preset}_{args.steps}" + (f"_budget{args.budget:g}" if args.budget else "")
  if args.set:
    name += "_" + "_".join(s.replace("=", "-") for s in sorted(args.set))[:60]
    name += "_" + hashlib.sha1(" ".join(sorted(args.set)).encode()).hexdigest()[:6]
  return os.path.join(ROOT, "runs", "bench_quality", name)


def _baselines(args, variant, out):
  """Baseline summaries of a variant's test split, computed once (cached)."""
  path = os.path.join(out, f"baselines_{variant}.json")
  got = _read_json(path)
  if got is None:
    cfg = _config(args, 0)
    root = _data_dir(args, variant, cfg)
    test, trn = dataset.load_split(root, "test", cfg), dataset.load_split(root, "train", cfg)
    base = evaluator.baselines(test, trn, cfg)
    got = {k: dict(side=v["side_mean"], mad=v["mad_mean"]) for k, v in base.items()}
    _write_json(path, got)
  return got


def _launch(args, variant, seed, out, core):
  cfg = _config(args, seed)
  wd = os.path.join(out, f"{variant}_s{seed}")
  os.makedirs(wd, exist_ok=True)
  cmd = [sys.executable, os.path.abspath(__file__), "--one", "--bench-variant", variant,
         "--seed", str(seed), "--data", _data_dir(args, variant, cfg), "--workdir", wd,
         "--preset", args.preset, "--steps", str(args.steps)]
  if args.budget:
    cmd += ["--budget", str(args.budget)]
  for s in args.set:
    cmd += ["--set", s]
  cmd = parallel.on_core(cmd, core)
  log = open(os.path.join(wd, "log.txt"), "a")
  log.write(f"\n$ {' '.join(cmd)}\n")
  log.flush()
  return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), log, wd


def _fmt(v, fmt):
  if v is None or (isinstance(v, float) and v != v):
    return "-"
  return fmt.format(v)


def _median(vals):
  vals = sorted(vals)
  k = len(vals)
  return None if not k else (vals[k // 2] if k % 2 else (vals[k // 2 - 1] + vals[k // 2]) / 2)


def table(out, variants, seeds_of):
  """(markdown, csv rows) of the finished runs, per variant x seed (seeds_of:
  variant -> its seeds), with the per-variant median and worst over seeds and
  the baselines' MAD."""
  heads = (["variant", "seed"] + [h for _, h, _, _ in COLUMNS] + ["fault"]
           + [h for _, h in BASELINE_COLUMNS])
  md = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
  rows = [heads]
  missing = []
  for variant in variants:
    base = _read_json(os.path.join(out, f"baselines_{variant}.json")) or {}
    bvals = [base.get(k, {}).get("mad") for k, _ in BASELINE_COLUMNS]
    done = []
    for seed in seeds_of[variant]:
      r = _read_json(os.path.join(out, f"{variant}_s{seed}", "result.json"))
      if r is None:
        missing.append(f"{variant}_s{seed}")
        continue
      for key, name in (("mad_vs_avg", "average GT depth"),
                        ("mad_vs_template", "template depth, true view")):
        ref = base.get(name, {}).get("mad")
        r[key] = r["mad"] / ref if (ref and r.get("mad") is not None) else None
      done.append(r)
      vals = [r.get(k) for k, _, _, _ in COLUMNS]
      status = "" if r.get("status") == "done" else f" ({r.get('status')})"
      kind = diagnostics.fault(r, r.get("mad"), bvals[1])
      cells = [variant, f"{seed}{status}"] + [_fmt(v, f) for v, (_, _, f, _) in zip(vals, COLUMNS)]
      cells += [f"**{kind}**" if kind else ""] + [_fmt(b, "{:.2f}") for b in bvals]
      md.append("| " + " | ".join(cells) + " |")
      rows.append([variant, seed] + vals + [kind] + bvals)
    if len(done) > 1:
      for label, pick in (("median", lambda k, _: _median(
          [r[k] for r in done if r.get(k) is not None])),
                          ("worst", lambda k, w: None if w is None else w(
                              [r[k] for r in done if r.get(k) is not None] or [None]))):
        vals = [pick(k, w) for k, _, _, w in COLUMNS]
        cells = [f"**{variant}**", f"**{label}** ({len(done)})"]
        cells += [_fmt(v, f) for v, (_, _, f, _) in zip(vals, COLUMNS)]
        cells += [""] + [_fmt(b, "{:.2f}") for b in bvals]
        md.append("| " + " | ".join(cells) + " |")
        rows.append([variant, label] + vals + [""] + bvals)
  text = "\n".join(md) + "\n" + goals(out, variants, seeds_of)
  if missing:
    text += f"\nNot finished yet: {', '.join(missing)}\n"
  return text, rows


def goals(out, variants, seeds_of) -> str:
  """The goals of issue 20 per variant, over the finished runs: no failed run
  (`diagnostics.fault` names none: MAD below average-GT, a convex majority,
  depth_sign > 0.5, yaw correlation >= 0.9, a lit render, a varied view; the
  failed ones are listed with their kind), median MAD <= 0.50 x average-GT
  and below the template, median per-image shape correlation >= 0.5."""
  lines = []
  yes = lambda ok: "yes" if ok else "NO"
  for variant in variants:
    base = _read_json(os.path.join(out, f"baselines_{variant}.json")) or {}
    avg = base.get("average GT depth", {}).get("mad")
    tpl = base.get("template depth, true view", {}).get("mad")
    done = [r for r in (_read_json(os.path.join(out, f"{variant}_s{s}", "result.json"))
                        for s in seeds_of[variant]) if r is not None]
    if not done or avg is None:
      continue
    kinds = [diagnostics.fault(r, r["mad"] if r.get("mad") is not None else float("inf"), avg)
             for r in done]
    ok = [r for r, k in zip(done, kinds) if not k]
    med = _median([r["mad"] if r.get("mad") is not None else float("inf") for r in done])
    line = (f"- {variant} ({len(done)} runs): no failed run {yes(len(ok) == len(done))} "
            f"({len(ok)}/{len(done)}); median MAD / avg-GT {med / avg:.2f} <= 0.50 "
            f"{yes(med / avg <= 0.50)}")
    if tpl is not None:
      line += f"; median MAD < template {yes(med < tpl)} ({med / tpl:.2f}x)"
    shape = [r["shape_corr"] for r in done if r.get("shape_corr") is not None]
    if shape:
      line += f"; median shape corr {_median(shape):.2f} >= 0.5 {yes(_median(shape) >= 0.5)}"
    failed = [f"s{r['seed']} {k}" for r, k in zip(done, kinds) if k]
    if failed:
      line += f" [failed: {', '.join(failed)}]"
    lines.append(line)
  return ("\nGoals (issue 20; a failed run, its kind in the fault column: a black render, a "
          "constant view, a concave majority, a yaw corr < 0.9 or MAD >= avg-GT), finished runs:\n" + "\n".join(lines) + "\n") if lines else ""


def _write_table(out, variants, seeds_of, settings):
  text, rows = table(out, variants, seeds_of)
  budget = f" (or {settings['budget']:g} s each)" if settings.get("budget") else ""
  head = (f"Robustness benchmark: {settings['preset']}, {settings['steps']} steps{budget}"
          f"{', --set ' + ' '.join(settings['set']) if settings['set'] else ''}; test split "
          "of each variant. MAD / SIDE as Unsup3D (exact normals); view err = mean of the "
          "yaw / pitch (mean offset removed) / roll errors; convex = fraction of images with a "
          "convex canonical relief; shape spread = spread of canonical depth across images / "
          "the truth's (0 = one template); shape corr = median over images of the correlation "
          "between each canonical depth's departure from the mean predicted one and the "
          "truth's from the mean true one (1: each object's own shape, 0: a template). "
          "Baselines: MAD of constant, average-GT and template "
          "depth (the mean canonical face in each true view).\n\n")
  with open(os.path.join(out, "table.md"), "w") as fh:
    fh.write(head + text)
  with open(os.path.join(out, "table.csv"), "w", newline="") as fh:
    csv.writer(fh).writerows(rows)
  return head + text


def drive(args):
  seeds = _int_list(args.seeds, "seeds")
  variants = (list(data.VARIANTS) if args.variants.strip() == "all"
              else [v.strip() for v in args.variants.split(",") if v.strip()])
  for v in variants:
    data.get_variant(v)
  seeds_of = {v: seeds for v in variants}
  for item in args.seeds_of:  # VARIANT=SEEDS: that variant's own seed list
    name, sep, value = item.partition("=")
    if not sep or name.strip() not in variants:
      raise UserError(f"--seeds-of {item!r}: expected VARIANT=SEEDS with VARIANT one of "
                      f"--variants ({', '.join(variants)})")
    seeds_of[name.strip()] = _int_list(value, f"seeds-of {name.strip()}")
  if args.steps < 1:
    raise UserError(f"--steps must be >= 1, got {args.steps}")
  if args.budget is not None and args.budget <= 0:
    raise UserError(f"--budget must be > 0 seconds, got {args.budget}")
  if args.jobs < 1:
    raise UserError(f"--jobs must be >= 1, got {args.jobs}")
  if args.counts and not args.data_root:
    raise UserError("--counts needs --data-root (the built-in data under data/ keeps its "
                    "standard counts)")
  _config(args, 0)  # bad --set / preset: one line now, not in every run
  out = args.out or _default_out(args)
  if args.report and not os.path.exists(os.path.join(out, "settings.json")):
    raise UserError(f"{out} holds no benchmark yet (no settings.json)")
  os.makedirs(out, exist_ok=True)
  settings = _settings(args)
  old = _read_json(os.path.join(out, "settings.json"))
  if old is not None and old != settings:
    raise UserError(f"{out} holds a benchmark with other settings ({json.dumps(old)}); "
                    "use another --out")
  _write_json(os.path.join(out, "settings.json"), settings)
  if args.report:
    print(_write_table(out, variants, seeds_of, settings))
    return
  for v in variants:
    _baselines(args, v, out)
  if args.baselines_only:
    heads = ["variant"] + [f"{h} (SIDE)" for _, h in BASELINE_COLUMNS]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for v in variants:
      b = _read_json(os.path.join(out, f"baselines_{v}.json"))
      lines.append(f"| {v} | " + " | ".join(
          f"{b[k]['mad']:.2f} ({b[k]['side']:.3f})" if k in b else "-"
          for k, _ in BASELINE_COLUMNS) + " |")
    print("\n".join(lines))
    return
  # Seed-major: an interrupted benchmark has every variant's first seeds.
  todo = [(v, s) for s in sorted(set().union(*seeds_of.values())) for v in variants
          if s in seeds_of[v]
          and _read_json(os.path.join(out, f"{v}_s{s}", "result.json")) is None]
  n_all = sum(len(seeds_of[v]) for v in variants)
  cores = parallel.core_slots(args.jobs)
  cliutil.log(f"bench_quality: {n_all - len(todo)} of {n_all} runs done, {len(todo)} to go, "
              f"{args.jobs} at a time{' (taskset, one core each)' if cores else ''}; "
              f"results in {out}")
  running = {}  # slot -> (proc, log, wd, variant, seed, t0)
  failed = []
  try:
    while todo or running:
      for slot in range(args.jobs):
        if slot not in running and todo:
          v, s = todo.pop(0)
          proc, log, wd = _launch(args, v, s, out, cores[slot] if cores else None)
          running[slot] = (proc, log, wd, v, s, time.time())
          cliutil.log(f"  start {v} seed {s}{f' on core {cores[slot]}' if cores else ''} "
                      f"(log: {wd}/log.txt)")
      time.sleep(0.5)
      for slot, (proc, log, wd, v, s, t0) in list(running.items()):
        rc = proc.poll()
        if rc is None:
          continue
        log.close()
        del running[slot]
        r = _read_json(os.path.join(wd, "result.json"))
        if rc == 3 and r is None:  # non-finite loss: a (deterministic) failed run
          r = dict(variant=v, seed=s, status="nonfinite", mad=None, side=None)
          _write_json(os.path.join(wd, "result.json"), r)
        if r is None:
          failed.append(f"{v}_s{s} (exit {rc}, see {wd}/log.txt)")
          cliutil.log(f"  FAILED {v} seed {s}: exit {rc}, see {wd}/log.txt")
        else:
          cliutil.log(f"  done {v} seed {s} in {time.time() - t0:.0f}s: MAD "
                      f"{_fmt(r.get('mad'), '{:.2f}')}, yaw corr "
                      f"{_fmt(r.get('view_yaw_corr'), '{:.3f}')}, convex "
                      f"{_fmt(r.get('depth_sign'), '{:.2f}')}")
  except KeyboardInterrupt:
    # The runs got the SIGINT too: they checkpoint and exit; rerun to resume.
    for proc, log, *_ in running.values():
      proc.wait()
      log.close()
    cliutil.log("interrupted; rerun the same command to resume")
    sys.exit(130)
  print(_write_table(out, variants, seeds_of, settings))
  if failed:
    cliutil.log(f"failed runs (rerun to retry): {', '.join(failed)}")
    sys.exit(1)


def main():
  p = cliutil.Parser(prog="bench_quality.py", description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="cpu_small")
  p.add_argument("--seeds", default="0,1,2,3,4")
  p.add_argument("--seeds-of", action="append", default=[], metavar="VARIANT=SEEDS",
                 help="one variant's own seeds instead of --seeds (e.g. default=0,1,2,3,4)")
  p.add_argument("--variants", default="default,wide_pose,harsh_light,hires64,albedo_alt",
                 help="comma list of data variants (scr_jax/synthetic.py VARIANTS) or 'all'")
  p.add_argument("--steps", type=int, default=2000, help="training steps of every run")
  p.add_argument("--budget", type=float, help="also stop each run after this many seconds "
                 "of training wall time (the run counts as finished with the steps done)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="training config override for every run")
  p.add_argument("--jobs", type=int, default=1, help="runs at a time (>1: one core each, taskset)")
  p.add_argument("--out", help="results folder (default runs/bench_quality/<settings>)")
  p.add_argument("--report", action="store_true", help="only tabulate the finished runs")
  p.add_argument("--baselines-only", action="store_true",
                 help="only generate the variants' data and print their baselines")
  p.add_argument("--counts", help="N_TRAIN,N_VAL,N_TEST of generated data (default: the "
                 "built-in 4000,500,500); with --data-root, for quick checks")
  p.add_argument("--data-root", help="where variant data is generated (default ROOT/data)")
  # Internal: one run, started by the driver.
  p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--bench-variant", help=argparse.SUPPRESS)
  p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
  p.add_argument("--data", help=argparse.SUPPRESS)
  p.add_argument("--workdir", help=argparse.SUPPRESS)
  args = p.parse_args()
  try:
    run_one(args) if args.one else drive(args)
  except UserError as e:
    cliutil.fail(e, 2)
  except NonFiniteError as e:
    cliutil.fail(e, 3)


if __name__ == "__main__":
  main()
