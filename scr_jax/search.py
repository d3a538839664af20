"""Structure search (paper Sec. 4.2-4.3): which M to train with.

- Dense SCR: Bayesian optimisation over the 24 orderings (`scr_jax.bo`); each
  evaluation trains a batch of orderings at once (vmapped candidates) for a
  budget of steps and scores them on the validation split.
- Generic SCR (Eq. 5): a continuous M learned by unrolled bilevel optimisation
  (`scr_jax.bilevel`, the pure algorithm) on the SCR model's losses.
- Generic SCR from the dense solution (Eq. 6): the same on M * M_dense.
After the search M is thresholded (and binarised by default); if a cycle
remains, the weakest edge on a cycle is dropped (named in a note) until M is a
DAG (`bilevel.threshold_dag`), or, when asked, the threshold is raised or the
result refused. A cyclic M is never written.

This module is the driver over the pure algorithms (`bo`, `bilevel`): data,
candidate training, logging, plots and the workdir's files.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np

from scr_jax import (bilevel, bo, checkpoint, cliutil, config, dataset, evaluator, jsonio,
                     lock, parallel, runner, structure, train, train_step,
                     workdir as workdir_lib)
from scr_jax.errors import StopRequested, UserError

# ----------------------------------------------------------------------------
# Training candidates for BO (and for `train --candidates`).
# ----------------------------------------------------------------------------


def candidate_scores(cfg, nets, params_K, structure_K, val_data, limit=None):
  """Per candidate of structure_K (m Kx4x4): validation loss, and SIDE/MAD
  when val depth exists."""
  limit = limit or cfg.num_eval_images
  st = structure_K.replace(m=jnp.asarray(structure_K.m, jnp.float32))
  ev = evaluator.Evaluator(nets, cfg)
  vl = ev.val_loss(params_K, val_data["images"], st, limit)
  out = []
  for i, (params_i, st_i) in enumerate(evaluator.each_candidate(params_K, st)):
    row = dict(val_loss=float(vl[i]))
    if val_data.get("depth") is not None:
      summ, _, _ = ev.evaluate(params_i, val_data, st_i, limit=limit)
      row.update(val_side=summ["side_mean"], val_mad=summ["mad_mean"])
    out.append(row)
  return out


def train_orders(cfg, workdir, train_data, val_data, orders, q=None, quiet=True):
  """Trains the dense orderings `orders` together (vmapped, same batches and
  initial parameters) for cfg.steps; resumable (a finished round is read back
  from workdir/scores.json). Returns the per-candidate scores."""
  path = os.path.join(workdir, "scores.json")
  if os.path.exists(path):
    with open(path, encoding="utf-8-sig") as fh:
      saved = json.load(fh)
    if saved.get("orders") == list(orders) and saved.get("steps") == cfg.steps:
      return saved["scores"]
  st = structure.candidates(orders, q)
  res = train.fit_workdir(cfg, workdir, train_data, None, st, quiet=quiet)
  scores = candidate_scores(res["cfg"], res["nets"], res["state"].params, st, val_data)
  for o, sc in zip(orders, scores):
    sc["order"] = o
  _write_json(path, dict(orders=list(orders), steps=cfg.steps, scores=scores))
  return scores


_write_json = jsonio.write_json


# ----------------------------------------------------------------------------
# The `run.py search` methods on the SCR model.
# ----------------------------------------------------------------------------


def search_orders(cfg, workdir, train_data, val_data, method="bo", n_init=4, n_evals=10,
                  batch=2, objective="val_loss", log=cliutil.log):
  """Dense SCR: BO (or exhaustive) over orderings; each evaluation trains for
  cfg.steps steps. Writes workdir/structure.json, bo_trace.json and .png."""
  os.makedirs(workdir, exist_ok=True)
  if objective not in ("val_loss", "val_mad"):
    raise UserError(f"--objective must be val_loss or val_mad, got {objective!r}")
  if objective == "val_mad" and val_data.get("depth") is None:
    raise UserError("--objective val_mad needs ground-truth depth in the val split")
  calls = [0]
  scores_by_order = {}

  def evaluate_batch(orders):
    # Train in groups of exactly `batch` candidates (the last padded with
    # repeats) so every group reuses one compiled step.
    orders = list(orders)
    k = len(orders) if method == "exhaustive" else batch
    for g in range(0, len(orders), k):
      group = orders[g:g + k]
      group = group + [group[-1]] * (k - len(group))
      wd = os.path.join(workdir, "evals", f"{calls[0]:02d}_{'-'.join(group)}")
      calls[0] += 1
      t0 = time.time()
      scores = train_orders(cfg, wd, train_data, val_data, group)
      log(f"trained {len(group)} ordering(s) {', '.join(group)} for {cfg.steps} steps "
          f"({time.time() - t0:.0f}s)")
      for o, sc in zip(group, scores):
        scores_by_order[o] = sc
    return [scores_by_order[o][objective] for o in orders]

  if method == "exhaustive":
    evaluate_batch(list(structure.ALL_ORDERS))
    trace = dict(trace=[dict(round=0, order=o, objective=sc[objective], ei=None, lam=None)
                        for o, sc in scores_by_order.items()])
    best = min(trace["trace"], key=lambda t: t["objective"])
    trace.update(best_order=best["order"], best_objective=best["objective"])
  else:
    trace = bo.optimise(evaluate_batch, n_init=n_init, n_evals=n_evals, batch=batch,
                        seed=cfg.seed, log=log)
  trace.update(method=method, objective=objective, steps_per_eval=cfg.steps,
               scores=scores_by_order)
  _write_json(os.path.join(workdir, f"{method}_trace.json"), trace)
  exhaustive = None
  if method == "exhaustive":
    exhaustive = {o: sc[objective] for o, sc in scores_by_order.items()}
  plot_bo_trace(trace, os.path.join(workdir, f"{method}_trace.png"), exhaustive=exhaustive)
  s = structure.save_structure(os.path.join(workdir, "structure.json"), order=trace["best_order"],
                               method=method, objective=objective,
                               best_objective=trace["best_objective"],
                               trace=f"{method}_trace.json")
  log(f"best ordering {s['order']} ({objective} {trace['best_objective']:.4g}) -> "
      f"{os.path.join(workdir, 'structure.json')}")
  return s, trace


def search_unroll(cfg, workdir, train_data, val_data, masked_order=None, steps=50, unroll_k=1,
                  inner="adam", outer_lr=5e-2, lam_dag=1.0, augmented=True, tau=0.1,
                  binarize=True, raise_to_dag=False, on_cycle="drop-weakest", log=cliutil.log,
                  snapshot_every=25):
  """Generic SCR by unrolled bilevel optimisation (Eq. 5), or on M * M_dense
  of `masked_order` (Eq. 6). Writes workdir/structure.json (thresholded M),
  unroll_trace.json and unroll_trace.png.

  augmented: the paper's augmented Lagrangian for h(M) (default), else a
  fixed Lagrangian term lam_dag * h(M). on_cycle: what to do if the M
  thresholded at tau still has a cycle: "drop-weakest" (default: drop the
  weakest edge on a cycle until it is a DAG, each named in a log line),
  "raise-threshold" (raise tau to the next |M| value until a DAG;
  raise_to_dag=True is the same) or "refuse" (UserError, nothing written).

  Resumable: every `snapshot_every` outer steps, at the last one and on
  SIGINT / SIGTERM, the loop's state (M, its Adam state, the inner network and
  its optimiser state, the Lagrangian's alpha / rho, the trace) is saved as an
  orbax checkpoint in workdir/unroll_state/; a later call with the same config,
  data and search arguments continues from it (bit-identical to an
  uninterrupted search: the batches are functions of the outer step), any
  other call starts again (a note says so).

  Raises:
    UserError: on_cycle is unknown, or "refuse" and a cycle remains.
    StopRequested: SIGINT / SIGTERM arrived; the state is saved, nothing else
      is written.
  """
  on_cycle = "raise-threshold" if raise_to_dag else on_cycle
  if on_cycle not in bilevel.ON_CYCLE:
    raise UserError(f"--on-cycle must be one of {', '.join(bilevel.ON_CYCLE)}, "
                    f"got {on_cycle!r}")
  os.makedirs(workdir, exist_ok=True)
  nets, state = train_step.init_state(cfg, jax.random.PRNGKey(cfg.seed))
  mask = (structure.dense_matrix(masked_order) if masked_order
          else 1.0 - np.eye(4, dtype=np.float32))
  imgs, vimgs = train_data["images"], val_data["images"]
  bs = cfg.batch_size

  def train_loss(p, img, m):
    return train_step.loss_fn(p, nets, img, structure.Structure(m=m), cfg)[0]

  def batches_fn(t):
    idx = [train.batch_indices(imgs.shape[0], bs, cfg.seed, t * unroll_k + j)
           for j in range(unroll_k)]
    return jnp.asarray(np.stack([imgs[i] for i in idx]))

  def val_fn(t):
    return jnp.asarray(vimgs[train.batch_indices(vimgs.shape[0], bs, cfg.seed + 1, t)])

  key = _unroll_key(cfg, imgs, vimgs, masked_order=masked_order, steps=steps, unroll_k=unroll_k,
                    inner=inner, outer_lr=outer_lr, lam_dag=lam_dag, augmented=augmented)
  snap_dir = os.path.join(workdir, "unroll_state")
  mngr, start = _unroll_resume(snap_dir, key, state.params, inner, cfg, outer_lr, steps, log)

  def on_step(t, snapshot):
    if sig.received or t % max(snapshot_every, 1) == 0 or t == steps:
      snap = snapshot()
      checkpoint.save(mngr, snap["arrays"], dict(key=key, scalars=snap["scalars"]))
    if sig.received:
      raise StopRequested(sig.received, t, snap_dir)

  t0 = time.time()
  with train._Signals() as sig:
    res = bilevel.bilevel_search(
        train_loss, train_loss, state.params, batches_fn, val_fn, mask=mask, steps=steps,
        unroll_k=unroll_k, inner=inner, inner_lr=cfg.lr, weight_decay=cfg.weight_decay,
        outer_lr=outer_lr, lam_dag=lam_dag, augmented=augmented, log=log,
        progress_every=max(1, steps // 10), start=start, on_step=on_step)
  method = "unroll-masked" if masked_order else "unroll"
  trace = dict(method=method, masked_order=masked_order, unroll=unroll_k, inner=inner,
               outer_lr=outer_lr, lam_dag=lam_dag, augmented=augmented, threshold=tau,
               binarize=binarize, on_cycle=on_cycle, seconds=time.time() - t0,
               steps=res["trace"], m_continuous=res["m_effective"].tolist())
  dropped = []
  if on_cycle == "raise-threshold":
    m, used = bilevel.threshold_to_dag(res["m_effective"], tau, binarize)
    if used != tau:
      log(f"note: a cycle remained at threshold {tau}; raised it to {used:.4g} "
          "(edges below it dropped)")
    tau = used
  elif on_cycle == "drop-weakest":
    m, dropped = bilevel.threshold_dag(res["m_effective"], tau, binarize)
    for g, f, w in dropped:
      log(f"note: a cycle remained after thresholding at {tau}; dropped its weakest edge "
          f"{g}->{f} (M = {w:.4g})")
  trace.update(threshold_used=tau, dropped_edges=[f"{g}->{f}" for g, f, _ in dropped])
  _write_json(os.path.join(workdir, "unroll_trace.json"), trace)
  plot_unroll(trace, os.path.join(workdir, "unroll_trace.png"))
  if on_cycle == "refuse":
    m = bilevel.threshold(res["m_effective"], tau, binarize)
  s = structure.save_structure(os.path.join(workdir, "structure.json"), m=m, method=method,
                               m_continuous=res["m_effective"].round(5).tolist(),
                               threshold=tau, dropped_edges=trace["dropped_edges"],
                               trace="unroll_trace.json")
  # The inner network as a workdir (eval / predict / diagnose read it): trained
  # with the continuous M, so that M is what it records.
  params = res["params"]
  workdir_lib.save(
      workdir, cfg, structure.Structure(m=res["m_effective"], variant="generic"),
      train_step.new_state(nets, cfg, params, steps * unroll_k),
      data=dataset.fingerprint(dict(images=imgs)), describe=False,
      extra=dict(trained_by=f"search {method}: the inner network after {steps} outer steps "
                 f"of {unroll_k} inner step(s), with the continuous M (before thresholding); "
                 "its optimiser state is a fresh one"))
  log(f"M after thresholding at {tau}: {int((m != 0).sum())} edge(s), order {s['order']} -> "
      f"{os.path.join(workdir, 'structure.json')}")
  return s, trace


def _unroll_key(cfg, imgs, vimgs, **args) -> str:
  """What an unrolled search's saved state must match to be continued."""
  h = hashlib.blake2b(digest_size=12)
  h.update(json.dumps(dict(config=json.loads(cfg.to_json()), **args), sort_keys=True).encode())
  h.update(json.dumps([dataset.fingerprint(dict(images=imgs)),
                       dataset.fingerprint(dict(images=vimgs))], sort_keys=True).encode())
  return h.hexdigest()


def _unroll_resume(snap_dir, key, params, inner, cfg, outer_lr, steps, log):
  """(manager of snap_dir, the saved snapshot to continue or None)."""
  mngr = checkpoint.manager(snap_dir, keep=1)
  step = checkpoint.latest_step(mngr)
  if step is None:
    return mngr, None
  saved = checkpoint.load_settings(mngr, step) or {}
  if saved.get("key") != key or step > steps:
    log(f"note: {snap_dir} holds the state of another search (other config, data or "
        "arguments); starting again")
    shutil.rmtree(snap_dir)
    return checkpoint.manager(snap_dir, keep=1), None
  like = bilevel.snapshot_like(params, inner, cfg.lr, cfg.weight_decay, outer_lr)
  arrays = checkpoint.restore_step(mngr, step, like, hint=f"remove {snap_dir} to start again")
  log(f"unroll: continuing at outer step {step}/{steps} from {snap_dir}")
  return mngr, dict(arrays=arrays, scalars=saved["scalars"])


def plot_unroll(trace, path_png):
  """PNG: the 12 off-diagonal entries of M, val loss and h(M) per outer step."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  steps = trace["steps"]
  t = [s["step"] for s in steps]
  ms = np.array([s["m"] for s in steps])
  fig = Figure(figsize=(11, 4), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 2, 1)
  f = structure.FACTORS
  for i in range(4):
    for j in range(4):
      if i != j and np.any(ms[:, i, j] != 0):
        ax.plot(t, ms[:, i, j], label=f"{f[i]}->{f[j]}")
  ax.axhline(trace["threshold"], c="k", ls=":", lw=1)
  ax.set_xlabel("outer step")
  ax.set_ylabel("M entry")
  ax.set_title(f"{trace['method']}: M (threshold {trace['threshold']})")
  ax.legend(fontsize=7, ncol=2)
  ax2 = fig.add_subplot(1, 2, 2)
  ax2.plot(t, [s["val_loss"] for s in steps], c="tab:blue", label="val loss")
  ax2.set_xlabel("outer step")
  ax2.set_ylabel("val loss")
  ax3 = ax2.twinx()
  ax3.plot(t, [s["h"] for s in steps], c="tab:red", label="h(M)")
  ax3.set_ylabel("h(M)")
  ax2.set_title("validation loss (blue), acyclicity h(M) (red)")
  fig.tight_layout()
  fig.savefig(path_png)


def plot_bo_trace(trace_dict, path_png, exhaustive=None):
  """PNG: objective per evaluation (points, by round) and best-so-far (line).

  exhaustive: optional {order: objective} for all orderings; adds the global
  optimum as a reference line and a second panel with the sorted exhaustive
  values, the evaluated orderings highlighted.
  """
  # Figure + Agg canvas directly: no pyplot global state or backend switch.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  trace = trace_dict["trace"]
  ys = np.array([t["objective"] for t in trace], np.float64)
  idx = np.arange(1, len(ys) + 1)
  init = np.array([t["round"] == 0 for t in trace])
  fig = Figure(figsize=(11 if exhaustive else 6, 4), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 2 if exhaustive else 1, 1)
  ax.scatter(idx[init], ys[init], c="tab:gray", label="random init", zorder=3)
  ax.scatter(idx[~init], ys[~init], c="tab:blue", label="BO proposal", zorder=3)
  for i, t in zip(idx, trace):
    ax.annotate(t["order"], (i, t["objective"]), fontsize=7, xytext=(2, 3),
                textcoords="offset points")
  ax.step(idx, np.minimum.accumulate(ys), where="post", c="tab:orange", label="best so far")
  if exhaustive:
    opt_order = min(exhaustive, key=exhaustive.get)
    ax.axhline(exhaustive[opt_order], c="tab:green", ls="--",
               label=f"global optimum ({opt_order})")
  ax.set_xlabel("evaluation")
  ax.set_ylabel("objective")
  ax.set_title(f"best {trace_dict['best_order']}: {trace_dict['best_objective']:.4g}")
  ax.legend(fontsize=8)
  if exhaustive:
    ax2 = fig.add_subplot(1, 2, 2)
    items = sorted(exhaustive.items(), key=lambda kv: kv[1])
    seen = {t["order"] for t in trace}
    # Points, not bars: objectives need not be positive or start at 0.
    ax2.plot(range(len(items)), [v for _, v in items], c="lightgray", zorder=1)
    ax2.scatter(range(len(items)), [v for _, v in items], zorder=2,
                c=["tab:blue" if o in seen else "lightgray" for o, _ in items])
    ax2.set_xticks(range(len(items)))
    ax2.set_xticklabels([o for o, _ in items], rotation=90, fontsize=7)
    ax2.set_ylabel("objective")
    ax2.set_title("all orderings, sorted (blue = evaluated)")
  fig.tight_layout()
  fig.savefig(path_png)


def run_search(workdir: str, data: str, method: str, *, preset: str = "cpu_small", sets=(),
               seed: int = 0, budget_steps=None, cache=None, threshold=None,
               on_cycle: str = "drop-weakest", unroll: int = 1, inner: str = "adam",
               outer_lr: float = 5e-2, lam_dag: float = 1.0, augmented: bool = True,
               keep_weights: bool = False, init: int = 4, evals: int = 10, batch: int = 2,
               objective: str = "val_loss", order=None, structure_path=None, log=cliutil.log):
  """`run.py search`: checks every argument (one-line UserErrors, before any
  data is read), refuses a workdir holding a search with other settings
  (reuses one with the same), then runs `search_orders` (method bo /
  exhaustive) or `search_unroll` (unroll / unroll-masked; the dense ordering
  from `order` or a dense `structure_path`). Returns the structure dict
  written to WORKDIR/structure.json."""
  cfg = config.validate(config.override(config.get_config(preset),
                                        list(sets or []) + [f"seed={seed}"]))
  if budget_steps is not None:
    if budget_steps < 1:
      raise UserError(f"--budget-steps must be >= 1, got {budget_steps}")
    cfg = config.override(cfg, [f"steps={budget_steps}"])
  cfg = config.without_missing_vgg(cfg)
  runner.check_data_arg(data)
  if on_cycle == "refuse" and threshold is None:
    raise UserError("--on-cycle refuse needs an explicit --threshold (at the default 0.1 the "
                    "weakest cycle edges are dropped, each named in a note)")
  tau = 0.1 if threshold is None else threshold
  if unroll < 1:
    raise UserError(f"--unroll must be >= 1, got {unroll}")
  if method == "bo":  # the CLI's names, before any data is read
    if init < 1 or batch < 1:
      raise UserError(f"--init and --batch must be >= 1, got --init {init} --batch {batch}")
    if not init <= evals <= len(structure.ALL_ORDERS):
      raise UserError(f"--evals must be between --init ({init}) and "
                      f"{len(structure.ALL_ORDERS)} (all orderings), got {evals}")
  parallel.check_batch_size(cfg.batch_size)
  with lock.hold(workdir, log):  # one job per workdir
    # A rerun in the same workdir reuses finished evaluations: only with the
    # same settings (compared before any data is read).
    if os.path.exists(os.path.join(workdir, "config.json")):
      with open(os.path.join(workdir, "config.json"), encoding="utf-8-sig") as fh:
        old = dict(config=json.load(fh))
      changed, harmless = checkpoint.compare_settings(old, dict(config=json.loads(cfg.to_json())))
      if changed:
        raise UserError(f"{workdir} holds a search with other settings ("
                        + "; ".join(f"{n}: {o} -> {v}" for n, o, v in changed)
                        + "); use another --workdir")
      if harmless:
        log(f"note: {workdir} holds a search with other settings that do not change "
            "its result: " + "; ".join(f"{n}: {o} -> {v}" for n, o, v in harmless))
    checkpoint.save_config(workdir, cfg)
    # Search trains many short runs on one in-memory copy of the split.
    if not dataset.has_depth(data, cfg, "val", cache):
      raise UserError(f"search needs a val split in {data}")
    train_data = dataset.load_split(data, "train", cfg, need_depth=False, with_gt=False,
                                    cache=cache)
    val_data = dataset.load_split(data, "val", cfg, cache=cache)
    log(f"search --method {method}: preset {cfg.preset}, {train_data['images'].shape[0]} "
        f"train / {val_data['images'].shape[0]} val images")
    t0 = time.time()
    if method in ("bo", "exhaustive"):
      s, _ = search_orders(cfg, workdir, train_data, val_data, method=method, n_init=init,
                           n_evals=evals, batch=batch, objective=objective)
    else:
      masked = None
      if method == "unroll-masked":
        if order:
          masked = structure.check_order(order)
        elif structure_path:
          masked = structure.load_structure(structure_path)["order"]
        else:
          raise UserError("--method unroll-masked needs the dense ordering: --order DVAL or "
                          "--structure W/structure.json (from --method bo)")
      s, _ = search_unroll(cfg, workdir, train_data, val_data, masked_order=masked,
                           steps=cfg.steps, unroll_k=unroll, inner=inner, outer_lr=outer_lr,
                           lam_dag=lam_dag, augmented=augmented, tau=tau,
                           binarize=not keep_weights, on_cycle=on_cycle)
    log(f"search done in {time.time() - t0:.0f}s; train with: python experiments/run.py train "
        f"--variant {'dense' if 'M' not in s else 'generic'} --structure "
        f"{os.path.join(workdir, 'structure.json')} --preset {preset} --data {data} "
        "--workdir RUN")
    return s
