"""Structure search (paper Sec. 4.2-4.3): which M to train with.

- Dense SCR: Bayesian optimisation over the 24 orderings (`scr_jax.bo`); each
  evaluation trains a batch of orderings at once (vmapped candidates) for a
  budget of steps and scores them on the validation split.
- Generic SCR (Eq. 5): a continuous M learned by unrolled bilevel optimisation,
    min_M L_val(W_K(M), M) + penalty(h(M)),  W_K = K inner optimiser steps on L_train,
  with the NOTEARS acyclicity h(M) = tr((I + c/n M*M)^n) - n, as a fixed
  Lagrangian term or by the augmented Lagrangian (dual ascent, growing rho).
- Generic SCR from the dense solution (Eq. 6): the same on M * M_dense.
After the search M is thresholded (and binarised by default); if a cycle
remains, the weakest edge on a cycle is dropped (named in a note) until M is a
DAG (`threshold_dag`), or, when asked, the threshold is raised or the result
refused. A cyclic M is never written.

`unroll`, `hypergrad_fn` and `bilevel_search` take plain loss functions
(params, batch, m) -> scalar, so the tests drive them with toy problems and the
CLI with the SCR model.
"""
from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from scr_jax import bo, dataset, evaluator, structure, train, train_step, workdir as workdir_lib
from scr_jax.errors import UserError

# ----------------------------------------------------------------------------
# Unrolled bilevel optimisation.
# ----------------------------------------------------------------------------


def inner_optimizer(kind: str, lr: float, weight_decay: float = 0.0):
  """Inner-loop optimiser. Adam's update divides by sqrt(v): at v = 0 (a
  parameter whose gradient is still exactly 0) the derivative of sqrt is
  infinite and the meta-gradient becomes inf * 0 = NaN. `eps_root` moves the
  root away from 0, which keeps meta-gradients finite; SGD has no such issue."""
  if kind == "sgd":
    opt = optax.sgd(lr)
  elif kind == "adam":
    opt = optax.adam(lr, eps_root=1e-8)
  else:
    raise UserError(f"unknown inner optimiser {kind!r} (sgd or adam)")
  return optax.chain(optax.add_decayed_weights(weight_decay), opt) if weight_decay else opt


def unroll(train_loss, opt, params, opt_state, m, batches):
  """K inner steps (K = leading axis of `batches`): grad -> opt.update ->
  apply_updates, scanned; each step is rematerialised (jax.checkpoint) so the
  backward pass keeps only the K carries, not K steps of activations."""
  @jax.checkpoint
  def body(carry, batch):
    p, s = carry
    g = jax.grad(train_loss)(p, batch, m)
    u, s = opt.update(g, s, p)
    return (optax.apply_updates(p, u), s), None

  (params, opt_state), _ = jax.lax.scan(body, (params, opt_state), batches)
  return params, opt_state


def dag_penalty(m, alpha, rho, c: float = 1.0):
  """alpha * h + rho / 2 * h^2 (rho = 0: the plain Lagrangian of Eq. 5)."""
  h = structure.notears_h(m, c)
  return alpha * h + 0.5 * rho * h * h, h


def hypergrad_fn(train_loss, val_loss, opt, mask, c: float = 1.0):
  """Returns f(m_raw, params, opt_state, batches_K, val_batch, alpha, rho) ->
  ((objective, (params_K, opt_state_K, val_loss, h)), d objective / d m_raw),
  with the effective adjacency m = m_raw * mask. jit-compiled."""
  mask = jnp.asarray(mask, jnp.float32)

  def outer(m_raw, params, opt_state, batches, val_batch, alpha, rho):
    m = m_raw * mask
    p, s = unroll(train_loss, opt, params, opt_state, m, batches)
    lv = val_loss(p, val_batch, m)
    pen, h = dag_penalty(m, alpha, rho, c)
    return lv + pen, (p, s, lv, h)

  return jax.jit(jax.value_and_grad(outer, has_aux=True))


def bilevel_search(train_loss, val_loss, params, batches_fn, val_fn, *, mask, steps: int,
                   unroll_k: int = 1, inner: str = "adam", inner_lr: float = 1e-3,
                   weight_decay: float = 0.0, outer_lr: float = 1e-2, lam_dag: float = 1.0,
                   augmented: bool = False, rho: float = 1.0, rho_max: float = 1e6,
                   dual_every: int = 10, m_init=None, log=None, progress_every: int = 10):
  """Learns a continuous M (4x4, rows = parents) by unrolled bilevel optimisation.

  batches_fn(t) -> the K inner batches of outer step t (leading axis K);
  val_fn(t) -> the validation batch of outer step t. After each outer step the
  inner updates are kept (params continue from W_K), as in one-step unrolled
  architecture search. Fixed Lagrangian: alpha = lam_dag, rho = 0. Augmented:
  alpha starts at lam_dag and every `dual_every` steps alpha += rho * h, and
  rho *= 10 (up to rho_max) when h did not fall below a quarter of its last value.
  Returns dict(m, m_effective, trace, params).
  """
  mask = np.asarray(mask, np.float32)
  opt = inner_optimizer(inner, inner_lr, weight_decay)
  opt_state = opt.init(params)
  m_opt = optax.adam(outer_lr)
  m_raw = jnp.zeros((4, 4), jnp.float32) if m_init is None else jnp.asarray(m_init, jnp.float32)
  m_state = m_opt.init(m_raw)
  f = hypergrad_fn(train_loss, val_loss, opt, mask)
  alpha, rho_now = float(lam_dag), (float(rho) if augmented else 0.0)
  h_last = np.inf
  trace = []
  t0 = time.time()
  for t in range(steps):
    (obj, (params, opt_state, lv, h)), g = f(m_raw, params, opt_state, batches_fn(t), val_fn(t),
                                            alpha, rho_now)
    if not (np.isfinite(float(obj)) and np.all(np.isfinite(np.asarray(g)))):
      raise FloatingPointError(f"non-finite hypergradient at outer step {t + 1}")
    upd, m_state = m_opt.update(g, m_state, m_raw)
    m_raw = optax.apply_updates(m_raw, upd) * jnp.asarray(mask)
    h = float(h)
    if augmented and (t + 1) % dual_every == 0:
      alpha += rho_now * h
      if h > 0.25 * h_last:
        rho_now = min(rho_now * 10.0, rho_max)
      h_last = h
    trace.append(dict(step=t + 1, val_loss=float(lv), h=h, objective=float(obj),
                      alpha=alpha, rho=rho_now, m=np.asarray(m_raw).round(4).tolist()))
    if log and ((t + 1) % progress_every == 0 or t + 1 == steps):
      log(f"unroll step {t + 1}/{steps}: val loss {float(lv):.4f}  h(M) {h:.2e}  "
          f"max|M| {float(jnp.max(jnp.abs(m_raw))):.3f}  ({time.time() - t0:.0f}s)")
  return dict(m=np.asarray(m_raw), m_effective=np.asarray(m_raw) * mask, trace=trace,
              params=params)


def threshold(m, tau: float, binarize: bool = True) -> np.ndarray:
  """Keeps the edges with |M| > tau (set to 1 when binarising), zero diagonal.
  Raises UserError if the result has a cycle: a non-DAG is never returned."""
  m = np.asarray(m, np.float32)
  keep = (np.abs(m) > tau) & ~np.eye(m.shape[0], dtype=bool)
  out = np.where(keep, 1.0 if binarize else m, 0.0).astype(np.float32)
  if not structure.is_dag(out):
    edges = [f"{structure.FACTORS[i]}->{structure.FACTORS[j]}" for i, j in zip(*np.nonzero(out))]
    raise UserError(f"the searched M still has a cycle after thresholding at {tau} "
                    f"(edges {', '.join(edges)}); search longer, raise --lam-dag or "
                    "--threshold, or let the weakest cycle edges drop (--on-cycle drop-weakest)")
  return out


def threshold_to_dag(m, tau: float, binarize: bool = True):
  """Thresholds at tau, raising the threshold to the next |M| value while a
  cycle remains (drops every edge below the weakest cycle edge, on a cycle or
  not). Returns (M, tau used); the result is always a DAG (at worst empty)."""
  vals = sorted(set(np.abs(np.asarray(m)).ravel().tolist()))
  for t in [tau] + [v for v in vals if v > tau]:
    try:
      return threshold(m, t, binarize), t
    except UserError:
      continue
  return np.zeros((4, 4), np.float32), float("inf")


def _reaches(adj, src: int, dst: int) -> bool:
  """True if a directed path src -> ... -> dst exists in the boolean adjacency."""
  seen, todo = {src}, [src]
  while todo:
    for j in np.flatnonzero(adj[todo.pop()]):
      if j == dst:
        return True
      if j not in seen:
        seen.add(j)
        todo.append(j)
  return False


def threshold_dag(m, tau: float, binarize: bool = True):
  """Thresholds at tau (|M| > tau, zero diagonal), then, while a cycle
  remains, drops the weakest edge that lies on a cycle (edge g -> f lies on
  one iff f reaches g). Edges on no cycle are kept whatever their weight.

  Args:
    m: 4x4 continuous adjacency, rows = parents.
    tau: threshold on |M|.
    binarize: set kept edges to 1 (else keep their values).
  Returns:
    (M_4x4 float32, a DAG; dropped: list of (parent, child, weight) in the
    order they were dropped, factor names as in structure.FACTORS).
  """
  m = np.asarray(m, np.float32)
  adj = (np.abs(m) > tau) & ~np.eye(m.shape[0], dtype=bool)
  dropped = []
  while True:
    on_cycle = [(abs(float(m[i, j])), i, j) for i, j in zip(*np.nonzero(adj))
                if _reaches(adj, j, i)]
    if not on_cycle:
      break
    w, i, j = min(on_cycle)
    adj[i, j] = False
    dropped.append((structure.FACTORS[i], structure.FACTORS[j], float(m[i, j])))
  out = np.where(adj, 1.0 if binarize else m, 0.0).astype(np.float32)
  assert structure.is_dag(out)
  return out, dropped


ON_CYCLE = ("drop-weakest", "raise-threshold", "refuse")


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
    with open(path) as fh:
      saved = json.load(fh)
    if saved.get("orders") == list(orders) and saved.get("steps") == cfg.steps:
      return saved["scores"]
  st = structure.candidates(orders, q)
  res = train.fit(cfg, workdir, train_data, None, st, quiet=quiet)
  scores = candidate_scores(cfg, res["nets"], res["state"].params, st, val_data)
  for o, sc in zip(orders, scores):
    sc["order"] = o
  _write_json(path, dict(orders=list(orders), steps=cfg.steps, scores=scores))
  return scores


def _write_json(path, obj):
  tmp = path + ".tmp"
  with open(tmp, "w") as fh:
    json.dump(obj, fh, indent=1)
  os.replace(tmp, path)


def log_line(msg):
  print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------
# The `run.py search` methods on the SCR model.
# ----------------------------------------------------------------------------


def search_orders(cfg, workdir, train_data, val_data, method="bo", n_init=4, n_evals=10,
                  batch=2, objective="val_loss", log=log_line):
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
  bo.plot_trace(trace, os.path.join(workdir, f"{method}_trace.png"), exhaustive=exhaustive)
  s = structure.save_structure(os.path.join(workdir, "structure.json"), order=trace["best_order"],
                               method=method, objective=objective,
                               best_objective=trace["best_objective"],
                               trace=f"{method}_trace.json")
  log(f"best ordering {s['order']} ({objective} {trace['best_objective']:.4g}) -> "
      f"{os.path.join(workdir, 'structure.json')}")
  return s, trace


def search_unroll(cfg, workdir, train_data, val_data, masked_order=None, steps=50, unroll_k=1,
                  inner="adam", outer_lr=5e-2, lam_dag=1.0, augmented=True, tau=0.1,
                  binarize=True, raise_to_dag=False, on_cycle="drop-weakest", log=log_line):
  """Generic SCR by unrolled bilevel optimisation (Eq. 5), or on M * M_dense
  of `masked_order` (Eq. 6). Writes workdir/structure.json (thresholded M),
  unroll_trace.json and unroll_trace.png.

  augmented: the paper's augmented Lagrangian for h(M) (default), else a
  fixed Lagrangian term lam_dag * h(M). on_cycle: what to do if the M
  thresholded at tau still has a cycle: "drop-weakest" (default: drop the
  weakest edge on a cycle until it is a DAG, each named in a log line),
  "raise-threshold" (raise tau to the next |M| value until a DAG;
  raise_to_dag=True is the same) or "refuse" (UserError, nothing written).

  Raises:
    UserError: on_cycle is unknown, or "refuse" and a cycle remains.
  """
  on_cycle = "raise-threshold" if raise_to_dag else on_cycle
  if on_cycle not in ON_CYCLE:
    raise UserError(f"--on-cycle must be one of {', '.join(ON_CYCLE)}, got {on_cycle!r}")
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

  t0 = time.time()
  res = bilevel_search(train_loss, train_loss, state.params, batches_fn, val_fn, mask=mask,
                       steps=steps, unroll_k=unroll_k, inner=inner, inner_lr=cfg.lr,
                       weight_decay=cfg.weight_decay, outer_lr=outer_lr, lam_dag=lam_dag,
                       augmented=augmented, log=log, progress_every=max(1, steps // 10))
  method = "unroll-masked" if masked_order else "unroll"
  trace = dict(method=method, masked_order=masked_order, unroll=unroll_k, inner=inner,
               outer_lr=outer_lr, lam_dag=lam_dag, augmented=augmented, threshold=tau,
               binarize=binarize, on_cycle=on_cycle, seconds=time.time() - t0,
               steps=res["trace"], m_continuous=res["m_effective"].tolist())
  dropped = []
  if on_cycle == "raise-threshold":
    m, used = threshold_to_dag(res["m_effective"], tau, binarize)
    if used != tau:
      log(f"note: a cycle remained at threshold {tau}; raised it to {used:.4g} "
          "(edges below it dropped)")
    tau = used
  elif on_cycle == "drop-weakest":
    m, dropped = threshold_dag(res["m_effective"], tau, binarize)
    for g, f, w in dropped:
      log(f"note: a cycle remained after thresholding at {tau}; dropped its weakest edge "
          f"{g}->{f} (M = {w:.4g})")
  trace.update(threshold_used=tau, dropped_edges=[f"{g}->{f}" for g, f, _ in dropped])
  _write_json(os.path.join(workdir, "unroll_trace.json"), trace)
  plot_unroll(trace, os.path.join(workdir, "unroll_trace.png"))
  if on_cycle == "refuse":
    m = threshold(res["m_effective"], tau, binarize)
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
