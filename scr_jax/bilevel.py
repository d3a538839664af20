"""Generic SCR's search algorithm (paper Sec. 4.3, Eq. 5-6), pure: a continuous
M learned by unrolled bilevel optimisation,
    min_M L_val(W_K(M), M) + penalty(h(M)),  W_K = K inner optimiser steps on L_train,
with the NOTEARS acyclicity h(M) = tr((I + c/n M*M)^n) - n (Zheng et al. 2018),
as a fixed Lagrangian term or by the augmented Lagrangian (dual ascent, growing
rho); then thresholding to a DAG (`threshold_dag`: the weakest edge on a cycle
dropped until none is left; or `threshold_to_dag`: the threshold raised).

`unroll`, `hypergrad_fn` and `bilevel_search` take plain loss functions
(params, batch, m) -> scalar, so the tests drive them with toy problems and
`search.search_unroll` (the driver: data, logging, files) with the SCR model.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from scr_jax import structure
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
  apply_updates, unrolled in Python rather than lax.scan'ed: inside a scan
  XLA:CPU ran the step about 7x slower (cpu_small, K = 1: outer step 7.7 s
  scanned, 1.1 s unrolled, 0.38 s for a training step's value_and_grad, one
  run). For K > 1 each step is rematerialised (jax.checkpoint) so the backward
  pass keeps only the K carries, not K steps of activations; for K = 1 that
  saves nothing and cost 1.5x."""
  def body(p, s, batch):
    g = jax.grad(train_loss)(p, batch, m)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  k = jax.tree_util.tree_leaves(batches)[0].shape[0]
  step = jax.checkpoint(body) if k > 1 else body
  for i in range(k):
    params, opt_state = step(params, opt_state,
                             jax.tree_util.tree_map(lambda b, i=i: b[i], batches))
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


def _initial_arrays(params, opt, m_opt, m_init=None) -> dict:
  m_raw = jnp.zeros((4, 4), jnp.float32) if m_init is None else jnp.asarray(m_init, jnp.float32)
  return dict(step=jnp.asarray(0, jnp.int32), m_raw=m_raw, m_state=m_opt.init(m_raw),
              params=params, opt_state=opt.init(params))


def snapshot_like(params, inner: str = "adam", inner_lr: float = 1e-3,
                  weight_decay: float = 0.0, outer_lr: float = 1e-2) -> dict:
  """The "arrays" of `bilevel_search`'s snapshot at step 0: the tree a saved
  snapshot is restored into (params: the inner network's initial parameters)."""
  return _initial_arrays(params, inner_optimizer(inner, inner_lr, weight_decay),
                         optax.adam(outer_lr))


def bilevel_search(train_loss, val_loss, params, batches_fn, val_fn, *, mask, steps: int,
                   unroll_k: int = 1, inner: str = "adam", inner_lr: float = 1e-3,
                   weight_decay: float = 0.0, outer_lr: float = 1e-2, lam_dag: float = 1.0,
                   augmented: bool = False, rho: float = 1.0, rho_max: float = 1e6,
                   dual_every: int = 10, m_init=None, log=None, progress_every: int = 10,
                   start=None, on_step=None):
  """Learns a continuous M (4x4, rows = parents) by unrolled bilevel optimisation.

  batches_fn(t) -> the K inner batches of outer step t (leading axis K);
  val_fn(t) -> the validation batch of outer step t. After each outer step the
  inner updates are kept (params continue from W_K), as in one-step unrolled
  architecture search. Fixed Lagrangian: alpha = lam_dag, rho = 0. Augmented:
  alpha starts at lam_dag and every `dual_every` steps alpha += rho * h, and
  rho *= 10 (up to rho_max) when h did not fall below a quarter of its last value.

  Resuming: `on_step(t, snapshot)` is called after outer step t (1-based);
  `snapshot()` returns the loop's whole state as {"arrays": pytree (step,
  m_raw, m_state, params, opt_state), "scalars": JSON-able (alpha, rho,
  h_last, trace)}; passing such a snapshot as `start` continues after its step
  exactly as the uninterrupted loop would (the batches are functions of t).
  Returns dict(m, m_effective, trace, params).
  """
  mask = np.asarray(mask, np.float32)
  opt = inner_optimizer(inner, inner_lr, weight_decay)
  m_opt = optax.adam(outer_lr)
  f = hypergrad_fn(train_loss, val_loss, opt, mask)
  if start is None:
    start = dict(arrays=_initial_arrays(params, opt, m_opt, m_init),
                 scalars=dict(alpha=float(lam_dag), rho=float(rho) if augmented else 0.0,
                              h_last=None, trace=[]))
  a, sc = start["arrays"], start["scalars"]
  t_start = int(a["step"])
  m_raw, m_state, params, opt_state = a["m_raw"], a["m_state"], a["params"], a["opt_state"]
  alpha, rho_now, trace = float(sc["alpha"]), float(sc["rho"]), list(sc["trace"])
  h_last = np.inf if sc["h_last"] is None else float(sc["h_last"])
  t0 = time.time()
  for t in range(t_start, steps):
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
    if on_step is not None:
      on_step(t + 1, lambda t=t: dict(
          arrays=dict(step=jnp.asarray(t + 1, jnp.int32), m_raw=m_raw, m_state=m_state,
                      params=params, opt_state=opt_state),
          scalars=dict(alpha=alpha, rho=rho_now, h_last=None if np.isinf(h_last) else h_last,
                       trace=trace)))
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
