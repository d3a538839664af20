"""The library side of `run.py train`, `eval` and `diagnose` (and of the
scripts that train the same way): config from a preset and flags, a training
run on a workdir from a --data argument, resumable, with one-line errors
before any work; the evaluation and the diagnostics of a trained workdir.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

from scr_jax import (config, data, dataset, diagnostics, evaluator, lock,
                     metrics, model, parallel, predict as predict_lib, structure, train,
                     workdir as workdir_lib)
from scr_jax.evaluator import Evaluator, each_candidate
from scr_jax.cliutil import log as _log
from scr_jax.errors import UserError

# Flags that are shorthands for `--set NAME=VALUE` (None: not given).
CONFIG_FLAGS = ("steps", "seed", "variant", "order", "q", "structure")


def make_config(preset: str, sets=(), log=_log, **flags) -> config.Config:
  """The preset, with `sets` ('key=value') and the CONFIG_FLAGS given as
  keywords applied; an ordering is checked; without VGG weights the
  perceptual loss is off (a note to `log`)."""
  sets = list(sets or [])
  for flag in CONFIG_FLAGS:
    val = flags.get(flag)
    if val is not None:
      sets.append(f"{flag}={val}")
  cfg = config.override(config.get_config(preset), sets)
  if cfg.order and cfg.order.lower() != "random":
    structure.check_order(cfg.order)
  return config.without_missing_vgg(cfg, log)


def data_spec(spec: str, cfg) -> str:
  """The --data argument as saved with a run: 'builtin:SIZE' or an absolute path."""
  return f"builtin:{cfg.image_size}" if spec == "builtin" else os.path.abspath(spec)


def check_data_arg(spec: str, flag: str = "--data"):
  """A --data folder that is missing or is a file: one line, before any work."""
  if spec == "builtin":
    return
  if not os.path.exists(spec):
    raise UserError(f"{flag} {spec}: not found (give a data folder, or builtin)")
  if not os.path.isdir(spec):
    raise UserError(f"{flag} {spec} is a file, not a folder: give the folder that holds the "
                    "images (or the root of a synface layout with train/ val/ test/)")


def candidate_orders(spec: str, cfg):
  """--candidates: 'all24' or a comma list of orderings (dense SCR only)."""
  orders = (list(structure.ALL_ORDERS) if spec == "all24"
            else [structure.check_order(o) for o in spec.split(",") if o])
  if cfg.variant not in ("independent", "dense") or not orders:
    raise UserError("--candidates takes all24 or a comma list of orderings (dense SCR)")
  return orders


def init_params_from(src, cfg, run, log=_log):
  """--init-from W0: the parameters of W0's newest checkpoint (e.g. an
  `import-unsup3d` workdir) to start the opened `run` (`workdir.Run`) from,
  with any structure; checked against the config's network shapes before
  any data is read. Records the source in the run's settings (init_from).
  None when src is None or the run resumes a checkpoint."""
  if not src:
    return None
  if run.resume and run.step is not None:
    log(f"note: {run.workdir} already holds checkpoints: resuming from them, --init-from "
        "is not used")
    return None
  r = workdir_lib.restore(src)
  if r.k:
    raise UserError(f"--init-from {src} holds {r.k} candidate structures; give a "
                    "single-structure workdir")
  shape = ("image_size", "embed_dim", "nf_encoder", "nf_ed", "nf_conf", "conf_zdim")
  diff = [f"{f}: {getattr(r.cfg, f)} -> {getattr(cfg, f)}" for f in shape
          if getattr(r.cfg, f) != getattr(cfg, f)]
  if diff:
    raise UserError(f"--init-from {src} has other network shapes ({'; '.join(diff)}); use its "
                    f"preset ({r.cfg.preset})")
  run.update(extra=dict(init_from=dict(workdir=os.path.abspath(src), step=r.step)))
  log(f"note: starting from the parameters of {src} (step {r.step}) with a fresh optimiser")
  return r.params


def train_run(cfg, workdir: str, data: str = "builtin", *, candidates=None, resume=True,
              restart=False, max_seconds=None, init_from=None, log=_log, cache=None,
              workers=None) -> dict:
  """Trains cfg's structure (or the `candidates` orderings together) on the
  --data argument `data` in `workdir`, resumably; what `run.py train` does.

  Every check that can refuse (a batch that does not divide over the
  devices, a workdir another job holds (`lock.hold`), settings of a resume,
  an occupied workdir, --init-from shapes) runs before any data is read or
  anything compiled.
  Returns `train.fit`'s summary dict.

  Raises:
    UserError: see above; also a bad --data or --candidates.
  """
  st = structure.resolve_structure(cfg)
  check_data_arg(data)
  parallel.check_batch_size(cfg.batch_size)
  if candidates:  # K dense orderings trained together (vmapped), same batches and init
    st = structure.candidates(candidate_orders(candidates, cfg))
  # Opened once, before any data is read or generated and before anything is
  # compiled: the lock, the requested settings against those of the
  # workdir's newest checkpoint, --restart.
  with workdir_lib.Run.open(workdir, cfg, st, dict(spec=data_spec(data, cfg)), resume=resume,
                            restart=restart, log=log) as run:
    init_params = init_params_from(init_from, run.cfg, run, log)
    notes = []  # a first-use prepare's note: said once the resume is known to go ahead
    train_data, val_data = dataset.load_train_data(data, run.cfg, cache, workers, notes)
    # The same data? (its content, now that it is read; nothing compiled yet)
    run.update(data=dataset.fingerprint(train_data))
    for note in notes:
      log(note)
    if run.cfg.depth_prior_ellipse.strip() == "fit":  # (a resume has the saved one)
      run.update(cfg=train.resolve_prior_ellipse(run.cfg, train_data, log))
    cfg = run.cfg
    log(f"train: preset {cfg.preset}, variant {st.variant}, {dataset.num_images(train_data)} "
        f"images at {cfg.image_size}px, {cfg.steps} steps, batch {cfg.batch_size}")
    res = train.fit(run, train_data, val_data, max_seconds=max_seconds,
                    init_params=init_params)
  if res["reason"] != "already trained":
    log(f"trained to step {res['step']} in {res['seconds']:.0f}s ({res['reason']})")
  return res


def eval_run(workdir: str, data_arg: str, split: str = "test", cache=None,
             save_predictions=None, log=_log) -> dict:
  """SIDE / MAD (Unsup3D's protocol) of workdir's newest checkpoint on `split`
  of `--data data_arg`, with the baselines on the same images (constant,
  average GT and, for generated data, the template) when the data has a train
  split with depth; a candidates workdir gives one result per candidate.
  save_predictions: an .npz path for the predicted depth, mask and names
  (single-structure workdirs only).
  Returns the summary dict (also what `eval --out` writes): side_mean /
  side_std scaled x1e-2 as the paper's tables, side_raw_* unscaled, with
  side_unit and mad_unit saying so (`metrics.with_units`). Raises UserError.
  """
  check_data_arg(data_arg)
  r = workdir_lib.restore(workdir)
  cfg, params, st, step = r.cfg, r.params, r.structure, r.step
  if r.k and save_predictions:
    raise UserError("--save-predictions needs a single-structure workdir")
  d = dataset.load_split(data_arg, split, cfg, cache=cache)
  ev = Evaluator(r.nets, cfg)
  if r.k:  # a candidates workdir (train --candidates, search evals, fig6): one result each
    rows = []
    for order, (params_i, st_i) in zip(st.orders or range(r.k), each_candidate(params, st)):
      res, _, _ = ev.evaluate(params_i, d, st_i)
      rows.append(dict(metrics.with_units(res), order=order))
      log(f"  {order}: SIDE {res['side_mean']:.3f}  MAD {res['mad_mean']:.2f}")
    summ = dict(candidates=rows)
  else:
    summ, pred, valid = ev.evaluate(params, d, st)
    summ = metrics.with_units(summ)
    base = evaluator.baselines_for(data_arg, d, cfg)
    if base is not None:  # the reference predictions on the same images
      summ["baselines"] = {name: metrics.with_units(b) for name, b in base.items()}
      for name, b in base.items():
        log(f"  baseline {name}: SIDE {b['side_mean']:.3f}  MAD {b['mad_mean']:.2f}")
    if save_predictions:
      os.makedirs(os.path.dirname(os.path.abspath(save_predictions)), exist_ok=True)
      np.savez_compressed(save_predictions, pred_depth=pred, mask=valid,
                          names=np.asarray(d["names"]))
  summ.update(split=split, step=step, workdir=workdir)
  return summ


def diagnose_run(workdir: str, data_arg: str = "builtin", split: str = "test", limit=None,
                 rows: int = 8, out=None, candidate=None, log=_log) -> dict:
  """What each factor of workdir's model learned on `split` of data that
  carries the generator's ground truth (`diagnostics.diagnose`: view, light,
  depth sign, shape spread) with SIDE / MAD; prints a summary, writes
  OUT.json and the picture grid OUT.png (default OUT: W/diagnose_SPLIT).
  limit: the first N images; rows: images in the grid.
  Returns the diagnostics dict. Raises UserError (bad rows / limit, no sidecar).
  """
  if rows < 1:
    raise UserError(f"--rows must be >= 1, got {rows}")
  if limit is not None and limit < 1:
    raise UserError(f"--limit must be >= 1, got {limit}")
  r = workdir_lib.restore(workdir).single(workdir, "diagnose", candidate)
  cfg, nets, params, step, st = r.cfg, r.nets, r.params, r.step, r.structure
  gt_error = UserError(f"{data_arg}: the {split} split has no usable ground-truth sidecar "
                       f"({split}/{data.GT_FILE}); diagnostics need data from this "
                       "generator (run.py data, or --data builtin[:VARIANT])")
  if not dataset.has_ground_truth(data_arg, split, cfg):  # before preparing anything
    raise gt_error
  d = dataset.load_split(data_arg, split, cfg)
  if "gt" not in d:
    raise gt_error
  n = len(d["images"]) if limit is None else min(limit, len(d["images"]))
  d = dict(images=d["images"][:n], depth=d["depth"][:n], names=d["names"][:n],
           gt={k: v[:n] for k, v in d["gt"].items()})
  ev = Evaluator(nets, cfg)
  pred = ev.factors(params, d["images"], st)
  diag = diagnostics.diagnose(pred, d["gt"])
  summ, _, _ = ev.evaluate(params, d, st)
  res = dict(diag, side=summ["side_mean"], mad=summ["mad_mean"],
             mad_unsup3d=summ["mad_unsup3d_mean"], n=n, split=split, step=step,
             workdir=workdir, data=data_arg)
  base = out or os.path.join(workdir, f"diagnose_{split}")
  os.makedirs(os.path.dirname(os.path.abspath(base)), exist_ok=True)
  with open(base + ".json", "w") as fh:
    json.dump(res, fh, indent=1)
  shown = min(rows, n)
  diagnostics.picture_grid(d["images"][:shown], {k: v[:shown] for k, v in pred.items()},
                           {k: v[:shown] for k, v in d["gt"].items()}, model.camera(cfg),
                           base + ".png")
  g = lambda k: res[k]
  print(f"{workdir} (step {step}) on {data_arg} [{split}], {n} images:\n"
        f"  depth   MAD {g('mad'):.2f} deg, SIDE {g('side'):.3f} x1e-2\n"
        f"  view    yaw err {g('view_yaw_mae_deg'):.2f} deg (corr {g('view_yaw_corr'):.3f}); "
        f"pitch offset {g('view_pitch_offset_deg'):+.2f}, err after it "
        f"{g('view_pitch_mae_deg'):.2f} deg (corr {g('view_pitch_corr'):.3f}); roll err "
        f"{g('view_roll_mae_deg'):.2f} deg (corr {g('view_roll_corr'):.3f})\n"
        f"  light   ambient err {g('light_ambient_mae'):.3f}, diffuse err "
        f"{g('light_diffuse_mae'):.3f}, direction {g('light_dir_deg'):.1f} deg, obliqueness "
        f"x{g('light_oblique_slope'):.2f} of the truth's\n"
        f"  shape   convex {g('depth_sign'):.2f} (truth {g('depth_sign_gt'):.2f}); spread "
        f"{g('shape_spread'):.4f} vs truth {g('shape_spread_gt'):.4f} "
        f"(ratio {g('shape_spread_ratio'):.2f}); relief x{g('relief_ratio'):.2f} as deep "
        f"as the truth's; per-image shape corr "
        f"{g('shape_corr'):.2f} (lower quartile {g('shape_corr_q25'):.2f})")
  log(f"wrote {base}.json and {base}.png (rows: images; columns: "
      f"{', '.join(diagnostics.GRID_COLUMNS)})")
  return res


def quickstart(workdir: str, steps=None, max_seconds=None, sets=(), log=_log) -> dict:
  """`make run`: the built-in data (generated once, a preview PNG), `cpu_small`
  trained on it in `workdir` (resumable; steps / sets override; max_seconds:
  the whole job's wall time, training stops early enough to leave
  AFTER_TRAINING_S for the rest),
  evaluated on its test split next to the baselines (constant, average GT,
  template), `predict` on four test images, the diagnostics, and a summary
  table printed. Returns dict(eval=..., baselines=..., diagnostics=...)."""
  cfg = make_config("cpu_small", sets, log, steps=steps)
  parallel.check_batch_size(cfg.batch_size)
  with lock.hold(workdir, log):  # also over eval, predict and the files written after training
    return _quickstart(cfg, workdir, max_seconds, log)


# What `make run` needs after training (evaluation with the baselines, predict
# on four images, the diagnostics), so that the whole job keeps near
# --max-seconds: measured 62 s and 145 s in two runs on a 2-core machine with
# two other training jobs running (the second overran a 200 s budget by 60 s).
AFTER_TRAINING_S = 90.0


def training_budget(job_seconds, spent_seconds: float):
  """Training's share of a whole job's wall time: what is left after
  `spent_seconds` (data generation) and AFTER_TRAINING_S, at least a tenth of
  the job's (a tiny budget still trains a little); None (no cap) stays None."""
  if job_seconds is None:
    return None
  return max(job_seconds - spent_seconds - AFTER_TRAINING_S, 0.1 * job_seconds)


def _quickstart(cfg, workdir, max_seconds, log):
  t0 = time.time()
  root = dataset.ensure_builtin(cfg.image_size)
  d = data.load_synface(root, "train", None, None, limit=8)
  data.preview_grid(d["images"], d["depth"], os.path.join(root, "preview.png"))
  res = train_run(cfg, workdir, "builtin", max_seconds=training_budget(max_seconds, time.time() - t0),
                  log=log)
  if res["reason"] in ("SIGINT", "SIGTERM"):
    raise SystemExit(130 if res["reason"] == "SIGINT" else 143)
  summ = eval_run(workdir, "builtin", "test",
                  save_predictions=os.path.join(workdir, "pred_test.npz"), log=log)
  with open(os.path.join(workdir, "eval_test.json"), "w") as fh:
    json.dump(summ, fh, indent=1)
  base = summ.pop("baselines")  # constant, average GT, template: the same test split
  pred_dir = os.path.join(workdir, "predict")
  test_imgs = os.path.join(root, "test", "image")
  picks = sorted(os.listdir(test_imgs))[:4]
  predict_lib.predict(workdir, [os.path.join(test_imgs, p) for p in picks], pred_dir)
  test = dataset.load_split("builtin", "test", cfg)
  diag = None
  if "gt" in test:
    r = workdir_lib.restore(workdir)
    diag = diagnostics.evaluate(r.nets, r.params, test, r.structure, r.cfg)
    with open(os.path.join(workdir, "diagnose_test.json"), "w") as fh:
      json.dump(diag, fh, indent=1)
  rows = [("independent SCR (ours)", summ)] + list(base.items())
  print(f"\nTest split of the built-in data ({summ['n']} images, {cfg.image_size}px), "
        f"{time.time() - t0:.0f}s in all")
  print(f"{'method':<26}{'SIDE x1e-2':>16}{'MAD deg':>16}{'MAD (Unsup3D eps)':>20}")
  for name, s in rows:
    print(f"{name:<26}{s['side_mean']:>9.3f} ±{s['side_std']:5.3f}{s['mad_mean']:>9.2f} ±"
          f"{s['mad_std']:5.2f}{s['mad_unsup3d_mean']:>13.2f} ±{s['mad_unsup3d_std']:5.2f}")
  tpl = base.get("template depth, true view")
  if tpl:
    print(f"MAD / template {summ['mad_mean'] / tpl['mad_mean']:.2f} (below 1: each face's own "
          "shape beats the mean face placed in the true view)")
  if diag is not None:
    print(f"diagnostics (test): {diagnostics.headline(diag)} "
          f"(python experiments/run.py diagnose --workdir {workdir} for pictures)")
  print(f"\noutputs: {workdir}/eval_test.json, {workdir}/tb (tensorboard), "
        f"{workdir}/metrics.csv, {pred_dir}/")
  return dict(eval=summ, baselines=base, diagnostics=diag)
