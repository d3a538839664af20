"""Causal structure over the latent factors (V, D, L, A): adjacency matrices.

M is 4x4 with rows = parents, columns = children, in the factor order
(V, D, L, A): M[g, f] is the weight of the edge g -> f. Factor f receives
(M^T u)_f = sum_g M[g, f] u_g added to its own embedding (paper Eq. 3).
"""
from __future__ import annotations

import itertools
import json
import os

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

from scr_jax import jsonio
from scr_jax.config import FACTORS
from scr_jax.errors import UserError

ALL_ORDERS = tuple("".join(p) for p in itertools.permutations("VDLA"))  # 24


def check_order(order: str) -> str:
  order = order.upper()
  if sorted(order) != sorted("VDLA"):
    raise UserError(f"ordering {order!r} is not a permutation of V, D, L, A (e.g. DVAL)")
  return order


def dense_matrix(order: str) -> np.ndarray:
  """All edges consistent with `order`: earlier factors feed all later ones.

  dense_matrix("DVAL"): D -> V, A, L; V -> A, L; A -> L.
  """
  order = check_order(order)
  m = np.zeros((4, 4), np.float32)
  for i, parent in enumerate(order):
    for child in order[i + 1:]:
      m[FACTORS.index(parent), FACTORS.index(child)] = 1.0
  return m


def random_order(seed: int) -> str:
  return ALL_ORDERS[np.random.default_rng(seed).integers(len(ALL_ORDERS))]


def mix(u_Bx4xd, m, scale: str = "sum", parent_grad: bool = True):
  """Embeddings seen by the decoders f2 (paper Eq. 3, element-wise addition).

  u_Bx4xd: the f1 embeddings, factor order V, D, L, A.
  m: 4x4 (shared) or Bx4x4 (per image, dynamic SCR); m[g, f] weights parent g
    into child f.
  scale: "sum": u_f + sum_g m[g, f] u_g, as the paper writes it. "balanced":
    each parent's embedding is first rescaled to the child's own norm, per
    image, u_f + sum_g m[g, f] (|u_f| / |u_g|) u_g, the ratio outside the
    gradient, so a structure cannot drown a child's own embedding merely
    because the parent's encoder has a larger output scale.
  parent_grad: False takes the parents' embeddings out of the gradient (m
    keeps its own): a child reads them, but its loss does not train their
    encoders.
  Returns Bx4xd. With m = 0 every setting gives u exactly (independent SCR).
  """
  parents_Bx4xd = jax.lax.stop_gradient(u_Bx4xd) if not parent_grad else u_Bx4xd
  return u_Bx4xd + _parents_term(parents_Bx4xd, m, scale)


def _parents_term(u_Bx4xd, m, scale: str):
  """sum_g m[g, f] (scaled) u_g, Bx4xd; "sum" uses the ops of before
  mix_scale existed, so such runs stay bit-identical."""
  if scale == "sum":
    if m.ndim == 2:
      return jnp.einsum("gf,bgd->bfd", m, u_Bx4xd)
    return jnp.einsum("bgf,bgd->bfd", m, u_Bx4xd)
  if scale != "balanced":
    raise UserError(f"unknown mix_scale {scale!r} (sum or balanced)")
  n_Bx4 = jnp.linalg.norm(u_Bx4xd, axis=-1) + 1e-6
  ratio_Bx4x4 = jax.lax.stop_gradient(n_Bx4[:, None, :] / n_Bx4[:, :, None])  # |u_f| / |u_g|
  return jnp.einsum("bgf,bgd->bfd", m * ratio_Bx4x4, u_Bx4xd)


def parent_norms(u_Bx4xd, m, scale: str = "sum"):
  """How much of each decoder's input is the factor's own embedding and how
  much its parents' (issue 21 item 7: does a structure drown a factor?).

  u_Bx4xd: f1 embeddings (V, D, L, A); m: 4x4 or Bx4x4 as in `mix`.
  Returns (own_4, parents_4): the batch means of |u_f| and of
  |mix(u, m, scale)_f - u_f| (L2 over d), numpy float arrays; parents_4 is 0
  for a factor without parents.
  """
  u = jnp.asarray(u_Bx4xd)
  parents = mix(u, jnp.asarray(m), scale) - u
  return (np.asarray(jnp.linalg.norm(u, axis=-1).mean(0)),
          np.asarray(jnp.linalg.norm(parents, axis=-1).mean(0)))


def dynamic_matrix(u_Bx4xd, m_dense, q: str):
  """Per-image M = q(u) * M_dense (paper Sec. 4.4); a DAG because M_dense is."""
  if q == "sigmoid":
    att = jax.nn.sigmoid(jnp.einsum("bid,bjd->bij", u_Bx4xd, u_Bx4xd))
  elif q == "cosine":
    un = u_Bx4xd / (jnp.linalg.norm(u_Bx4xd, axis=-1, keepdims=True) + 1e-8)
    att = jnp.einsum("bid,bjd->bij", un, un)
  else:
    raise UserError(f"unknown dynamic attention q={q!r} (sigmoid or cosine)")
  return att * m_dense


@struct.dataclass
class Structure:
  """The causal structure a model is trained with, as one value.

  m: 4x4 adjacency (rows = parents, columns = children, factor order
    V, D, L, A) or, for K candidates trained together, a Kx4x4 stack. With q,
    the dense mask that q(u) multiplies (dynamic SCR).
  q: None, or dynamic SCR's attention ("sigmoid" | "cosine").
  variant: "independent" | "dense" | "generic" | "dynamic" (what is recorded
    with the run; not used by the numerics).
  orders: the K candidates' labels (orderings, or "independent" for M = 0)
    when m is a stack, else None.

  `m` is the only array (a pytree leaf): a Structure goes through jit as an
  argument (`structure.jit` drops the labels there), and
  `jax.vmap(..., in_axes=0)` over it maps the candidate axis.
  """
  m: jax.Array
  q: str | None = struct.field(pytree_node=False, default=None)
  variant: str | None = struct.field(pytree_node=False, default="independent")
  orders: tuple | None = struct.field(pytree_node=False, default=None)

  @property
  def k(self) -> int:
    """Number of candidates (0: a single structure)."""
    return int(self.m.shape[0]) if self.m.ndim == 3 else 0

  def adjacency(self, u_Bx4xd):
    """The adjacency applied to a batch of embeddings: M (4x4, shared) or,
    with q, q(u) * M per image (Bx4x4). A single structure only (under vmap
    over candidates, each one is single)."""
    return dynamic_matrix(u_Bx4xd, self.m, self.q) if self.q else self.m

  def bare(self) -> "Structure":
    """This structure without its labels (variant None, orders None): only
    what the numerics read (m, q). Labels are static pytree fields, so two
    structures that differ only in labels would compile twice; `jit` strips
    them at the boundary."""
    return Structure(m=self.m, q=self.q, variant=None, orders=None)

  def candidate(self, i: int) -> "Structure":
    """Candidate i of a stack, as a single structure."""
    m = self.m[i]
    label = self.orders[i] if self.orders else None
    variant = "independent" if label == "independent" else self.variant
    return Structure(m=m, q=self.q, variant=variant)

  def record(self) -> dict:
    """JSON-able {variant, q, M, orders}, as saved with each checkpoint."""
    return dict(variant=self.variant, q=self.q, M=np.asarray(self.m, np.float32).tolist(),
                orders=list(self.orders) if self.orders else None)

  @classmethod
  def from_record(cls, rec: dict) -> "Structure":
    """The inverse of `record` (a checkpoint's settings["structure"])."""
    orders = rec.get("orders")
    return cls(m=np.asarray(rec["M"], np.float32), q=rec.get("q"),
               variant=rec.get("variant") or "independent",
               orders=tuple(orders) if orders else None)


def bare_args(args) -> tuple:
  """`args` with every Structure replaced by its `bare()` self."""
  return tuple(a.bare() if isinstance(a, Structure) else a for a in args)


class jit:  # noqa: N801  (used like jax.jit)
  """`jax.jit(fn, **jit_kwargs)` for functions that take a Structure as a
  positional argument: the Structure enters without its labels (`bare`), so
  every structure with the same q and m shape reuses one compiled program
  (labels are static pytree fields and would otherwise force a re-trace).
  `lower(*args)` strips the same way (ahead-of-time compilation)."""

  def __init__(self, fn, **jit_kwargs):
    self._jitted = jax.jit(fn, **jit_kwargs)
    self.__name__ = getattr(fn, "__name__", "fn")

  def __call__(self, *args):
    return self._jitted(*bare_args(args))

  def lower(self, *args):
    return self._jitted.lower(*bare_args(args))


def candidates(orders, q=None) -> Structure:
  """K dense orderings (or "independent": M = 0) as one stacked Structure."""
  ms = [np.zeros((4, 4), np.float32) if o == "independent" else dense_matrix(o) for o in orders]
  return Structure(m=np.stack(ms), q=q, variant="dynamic" if q else "dense",
                   orders=tuple(orders))


def notears_h(m, c: float = 1.0):
  """Acyclicity penalty tr((I + c/n M*M)^n) - n: zero iff M is a DAG."""
  n = m.shape[-1]
  a = jnp.eye(n, dtype=m.dtype) + (c / n) * m * m
  return jnp.trace(jnp.linalg.matrix_power(a, n)) - n


def is_dag(m, tol: float = 0.0) -> bool:
  """Exact check on the support (|M| > tol) by repeated leaf removal."""
  adj = np.abs(np.asarray(m)) > tol
  alive = np.ones(adj.shape[0], bool)
  while alive.any():
    sub = adj[np.ix_(alive, alive)]
    roots = ~sub.any(axis=0)  # nodes without parents among the alive ones
    if not roots.any():
      return False
    alive[np.flatnonzero(alive)[roots]] = False
  return True


def order_of(m) -> str:
  """A topological order of a DAG's support, as a string of factors."""
  adj = np.abs(np.asarray(m)) > 0
  if not is_dag(adj):
    raise UserError("adjacency matrix has a cycle")
  order, alive = [], np.ones(4, bool)
  while alive.any():
    idx = np.flatnonzero(alive)
    roots = idx[~adj[np.ix_(alive, alive)].any(axis=0)]
    order.append(roots[0])
    alive[roots[0]] = False
  return "".join(FACTORS[i] for i in order)


def resolve(cfg):
  """(m, q) for the configured variant: m is the 4x4 adjacency (for dynamic
  SCR, the dense mask that q(u) multiplies), q is None or the attention."""
  if cfg.variant == "independent":
    if cfg.structure:
      raise UserError("--structure needs --variant dense, generic or dynamic (the variant "
                      "is independent)")
    return np.zeros((4, 4), np.float32), None
  if cfg.variant in ("dense", "dynamic"):
    if not cfg.order and not cfg.structure:
      raise UserError(f"variant {cfg.variant} needs --order (e.g. DVAL, or random) or --structure")
    order = cfg.order or load_structure(cfg.structure)["order"]
    if order.lower() == "random":
      order = random_order(cfg.seed)
    m = dense_matrix(order)
    return m, (cfg.q if cfg.variant == "dynamic" else None)
  # generic
  if not cfg.structure:
    raise UserError("variant generic needs --structure FILE (from `run.py search`)")
  s = load_structure(cfg.structure)
  if "M" not in s:
    return dense_matrix(s["order"]), None
  return np.asarray(s["M"], np.float32), None


def resolve_structure(cfg) -> Structure:
  """`resolve(cfg)` as a Structure recording the configured variant."""
  m, q = resolve(cfg)
  return Structure(m=m, q=q, variant=cfg.variant)


def load_structure(path: str) -> dict:
  """Reads and validates a structure.json: factors, order and/or M (rows = parents)."""
  if not os.path.exists(path):
    raise UserError(f"structure file {path} not found")
  try:
    with open(path, encoding="utf-8-sig") as fh:  # utf-8-sig: Notepad's byte-order mark
      s = json.load(fh)
  except (OSError, ValueError) as e:
    raise UserError(f"structure file {path} is not valid JSON: {e}") from None
  if not isinstance(s, dict):
    raise UserError(f"structure file {path}: expected a JSON object")
  factors = s.get("factors", list(FACTORS))
  if list(factors) != list(FACTORS):
    raise UserError(f"structure file {path}: factors must be {list(FACTORS)}, got {factors}")
  if "M" in s:
    m = np.asarray(s["M"], dtype=object)
    try:
      m = np.asarray(s["M"], np.float32)
    except (TypeError, ValueError):
      raise UserError(f"structure file {path}: M must be a 4x4 matrix of numbers") from None
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
      raise UserError(f"structure file {path}: M must be a finite 4x4 matrix, got shape {m.shape}")
    if not is_dag(m):
      raise UserError(f"structure file {path}: M has a cycle (not a DAG)")
    if np.any(np.diag(m) != 0):
      raise UserError(f"structure file {path}: M has self-loops on the diagonal")
  elif "order" not in s:
    raise UserError(f"structure file {path}: needs 'order' or 'M'")
  if "order" in s:
    s["order"] = check_order(str(s["order"]))
  return s


def save_structure(path: str, order: str | None = None, m=None, **extra) -> dict:
  """Writes structure.json ({"factors", "order"} for a dense result, plus "M"
  for a generic one; rows = parents). Refuses a cyclic or malformed M: a
  non-DAG is never written. Atomic (temp file + rename)."""
  s = dict(factors=list(FACTORS))
  if m is not None:
    m = np.asarray(m, np.float32)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
      raise UserError(f"refusing to write {path}: M must be a finite 4x4 matrix, got {m.shape}")
    if np.any(np.diag(m) != 0) or not is_dag(m):
      raise UserError(f"refusing to write {path}: M is not a DAG")
    s["M"] = m.tolist()
    order = order or order_of(m)
  if order is None:
    raise UserError(f"refusing to write {path}: needs an ordering or M")
  s["order"] = check_order(order)
  s.update(extra)
  jsonio.write_json(path, s)
  return s
