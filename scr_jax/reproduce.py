"""The driver of `run.py reproduce`: the paper's Table 1, Table 2, Figure 6 and
Figure 8 and the beyond-default rows, as resumable units with paired seeds and
statistics.

Protocol (issue 21):
- Paired seeds: within a seed every training run starts from the same
  initialisation of the shared networks (`train_step.init_state(cfg,
  PRNGKey(seed))`, the same for every structure: M adds no parameters) and sees
  the same batch order (`dataset.batch_indices(n, batch, seed, step)`); each
  unit records both as hashes (`init_hash`, `batch_hash`) and results.md checks
  them per seed.
- Structures are chosen on val, never on test: BO's objective is the val
  photometric loss (a second, labelled "oracle objective" BO uses val MAD);
  the unrolled searches use val batches; the "best SCR row" carried to the
  harder variants is the one with the lowest mean val MAD.
- Statistics (`scr_jax.stats`): per row mean +- std and per-seed values; each
  SCR row against independent as a paired mean difference with its 95 % t
  interval and p-value, Holm over the SCR rows; "better" only when the Holm
  interval lies below 0.

A unit (a search, a training run + its evaluation, the baselines, one Figure 6
run) writes OUT/units/<name>.json when it finishes; a rerun skips finished
units (an interrupted training run resumes from its last checkpoint). `--jobs N`
runs N units at once as worker processes (`python -m scr_jax.reproduce
--worker NAME --out OUT`). `--report` rewrites OUT/results.md and
OUT/results_readme.md (a README-ready Results section) from the units finished so
far. Layout: OUT/settings.json, units/, runs/<unit>/ (workdirs), search/<unit>/,
logs/<unit>.log, fig6.png, fig8.png, results.md, results_readme.md.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import itertools
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from scr_jax import (checkpoint, cliutil, config, dataset, diagnostics, evaluator, jsonio, lock,
                     metrics, model, nets as nets_lib, parallel, search, stats, structure, train,
                     train_step)
from scr_jax.errors import StopRequested, UserError

TABLE2_ORDERS = ("DLVA", "DAVL", "DVAL")
VARIANTS = ("wide_pose", "albedo_alt")
PARTS = ("table1", "table2", "fig6", "beyond", "dose")
# Item 7: M = alpha x the seed's BO ordering (0 = independent, 1 = dense BO);
# the smallest alpha is a chaos control (a structure too weak to matter by itself).
DOSE_ALPHAS = (0.01, 0.3)

# Table 1 rows trained as SCR models: key -> (label, recipe). A recipe names
# the variant and where its structure comes from: a fixed / random ordering,
# or the result of a search unit of the same data and seed ("bo", "bo-oracle",
# "eq5", "eq6").
SCR_ROWS = {
    "independent": ("independent (M = 0)", dict(variant="independent")),
    "dense-random": ("dense, random ordering (one per seed)",
                     dict(variant="dense", order="random")),
    "dense-bo": ("dense, BO (objective: val photometric loss)",
                 dict(variant="dense", search="bo")),
    "dense-bo-oracle": ("dense, BO, oracle objective (val MAD)",
                        dict(variant="dense", search="bo-oracle")),
    "generic-eq5": ("generic, Eq. 5 (unrolled bilevel + NOTEARS)",
                    dict(variant="generic", search="eq5")),
    "generic-eq6": ("generic, Eq. 6 (masked by the BO ordering)",
                    dict(variant="generic", search="eq6")),
    "dynamic-sigmoid": ("dynamic, sigmoid (mask: the BO ordering)",
                        dict(variant="dynamic", q="sigmoid", search="bo")),
    "dynamic-cosine": ("dynamic, cosine (mask: the BO ordering)",
                       dict(variant="dynamic", q="cosine", search="bo")),
}
SUPERVISED = "supervised (GT depth: upper bound)"
# What each search needs first.
SEARCH_DEPS = {"bo": (), "bo-oracle": (), "eq5": (), "eq6": ("bo",)}


_log = cliutil.log


def _read(path):
  if os.path.exists(path):
    with open(path, encoding="utf-8-sig") as fh:
      return json.load(fh)
  return None


def _save(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  jsonio.write_json(path, obj)


def variant_specs(variants, default: str) -> dict:
  """{data tag: --data spec}: "default" is the reproduction's --data; a
  variant entry NAME is the built-in data of that variant (builtin:NAME),
  NAME=SPEC names any other --data (e.g. a folder exported elsewhere)."""
  out = {"default": default}
  for v in variants:
    name, _, spec = v.partition("=")
    out[name] = spec or f"builtin:{name}"
  return out


# ----------------------------------------------------------------------------
# Budgets and units
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Budget:
  """Every budget of a reproduction (all overridable from the command line).

  steps: training steps per run (None: the preset's); seeds: Table 1 seeds
  0..seeds-1; table2_seeds / fig6_seeds / beyond_seeds likewise for the other
  parts; bo_init / bo_evals / bo_batch: BO's initial design, total orderings
  evaluated, candidates trained together per round; bo_steps: training steps
  per BO evaluation; unroll_steps: outer steps of each unrolled search (one
  inner step each); unroll_seeds: the seeds 0..N-1 whose unrolled searches
  (Eq. 5, Eq. 6, Table 2's Eq. 6) run on that seed; a later seed trains with
  seed 0's searched M (an outer step costs about UNROLL_STEP_COST training
  steps on CPU: per-seed searches add about 5 % to the default budget);
  fig6_steps / fig6_orders: the all-orderings run's steps and how many of
  the 24 orderings (in structure.ALL_ORDERS order); table2_orders; variants:
  the harder data of the beyond rows (built-in variant names, or NAME=SPEC,
  `variant_specs`); parts: which of table1, table2, fig6, beyond, dose to run
  (not part of a reproduction's identity: an invocation runs its parts, and
  settings.json keeps the union for the report); dose_alphas: the structure
  strengths of the dose part (0 < alpha < 1), each trained on the Table 1 seeds.
  """
  preset: str = "cpu_small"
  data: str = "builtin"
  steps: int | None = None
  seeds: int = 5
  table2_seeds: int = 3
  fig6_seeds: int = 3
  beyond_seeds: int = 5
  bo_init: int = 4
  bo_evals: int = 8
  bo_batch: int = 2
  bo_steps: int | None = None
  unroll_steps: int | None = None
  unroll_seeds: int = 1
  fig6_steps: int | None = None
  fig6_orders: int = 24
  table2_orders: tuple = TABLE2_ORDERS
  variants: tuple = VARIANTS
  parts: tuple = PARTS
  sets: tuple = ()
  dose_alphas: tuple = DOSE_ALPHAS

  def resolved(self, cfg) -> "Budget":
    """The budget with the step defaults filled from the config (searches:
    steps / 5; Figure 6: steps)."""
    return dataclasses.replace(
        self, steps=cfg.steps, bo_steps=self.bo_steps or max(cfg.steps // 5, 1),
        unroll_steps=self.unroll_steps or max(cfg.steps // 5, 1),
        fig6_steps=self.fig6_steps or cfg.steps)

  def check(self):
    """Raises UserError on a budget that cannot run."""
    for f in ("seeds", "table2_seeds", "fig6_seeds", "beyond_seeds", "bo_init", "bo_evals",
              "bo_batch", "fig6_orders", "unroll_seeds"):
      if getattr(self, f) < 1:
        raise UserError(f"--{f.replace('_', '-')} must be >= 1, got {getattr(self, f)}")
    for f in ("steps", "bo_steps", "unroll_steps", "fig6_steps"):
      v = getattr(self, f)
      if v is not None and v < 1:
        raise UserError(f"--{f.replace('_', '-')} must be >= 1, got {v}")
    if self.bo_evals < self.bo_init or self.bo_evals > 24:
      raise UserError(f"--bo-evals must be between --bo-init ({self.bo_init}) and 24, "
                      f"got {self.bo_evals}")
    if self.fig6_orders > 24:
      raise UserError(f"--fig6-orders must be <= 24, got {self.fig6_orders}")
    for o in self.table2_orders:
      structure.check_order(o)
    for a in self.dose_alphas:
      if not 0.0 < a < 1.0:
        raise UserError(f"--dose-alphas must lie strictly between 0 (independent) and 1 "
                        f"(dense), got {a:g}")
    if len(set(self.dose_alphas)) != len(self.dose_alphas):
      raise UserError(f"--dose-alphas has a repeat: {', '.join(f'{a:g}' for a in self.dose_alphas)}")
    bad = sorted(set(self.parts) - set(PARTS))
    if bad:
      raise UserError(f"--parts: unknown {', '.join(bad)}; choose from {', '.join(PARTS)}")
    from scr_jax import synthetic
    bad = sorted(v for v in self.variants if "=" not in v and v not in synthetic.VARIANTS)
    if bad:
      raise UserError(f"--variants: unknown {', '.join(bad)}; built-in variants: "
                      f"{', '.join(synthetic.VARIANTS)}")

  def search_seed(self, kind: str, seed: int) -> int:
    """The seed whose search of `kind` a training run at `seed` uses: its own
    for BO and for seeds below unroll_seeds, else seed 0."""
    return seed if kind in ("bo", "bo-oracle") or seed < self.unroll_seeds else 0


@dataclasses.dataclass(frozen=True)
class Unit:
  """One resumable piece of work.

  name: unique, also its file name (OUT/units/<name>.json); kind: baselines |
  train | supervised | search | fig6; data: a data tag ("default" or a
  variant); seed; row: a SCR_ROWS key, "best" (the val-chosen SCR row, resolved
  when it runs) or a Table 2 key; search: the search kind of a search unit;
  order: the ordering of a Table 2 unit; alpha: the structure strength of a
  dose unit; deps: unit names that must be done first; cost: training-step
  equivalents (for the ETA).
  """
  name: str
  kind: str
  data: str = "default"
  seed: int = 0
  row: str = ""
  search: str = ""
  order: str = ""
  alpha: float = 0.0
  deps: tuple = ()
  cost: float = 1.0


def search_name(kind: str, tag: str, seed: int, order: str = "") -> str:
  sfx = f"-{order}" if order else ""
  return f"search.{tag}.{kind}{sfx}.s{seed}"


# An unrolled outer step (one inner step and the hypergradient through it) in
# training steps on CPU, cpu_small: 3.0x a training step's value_and_grad when
# profiled (1.14 s vs 0.38 s, since bilevel.unroll stopped using lax.scan: 20x
# before); a real search's outer step, with its validation batch, took 2.6 s
# beside other jobs (400 in 1039 s), so 4 rounds up. Only the ETA uses it.
UNROLL_STEP_COST = 4


def plan(b: Budget) -> list:
  """The units of a resolved budget, in a dependency-respecting order."""
  units, seen = [], set()

  def add(u):
    if u.name not in seen:
      seen.add(u.name)
      units.append(u)

  # In training-step equivalents (UNROLL_STEP_COST per unrolled outer step).
  search_cost = dict(bo=b.bo_evals * b.bo_steps, **{"bo-oracle": b.bo_evals * b.bo_steps},
                     eq5=UNROLL_STEP_COST * b.unroll_steps, eq6=UNROLL_STEP_COST * b.unroll_steps)

  def add_search(kind, tag, seed, order=""):
    seed = b.search_seed(kind, seed)
    deps = tuple(add_search(d, tag, seed) for d in SEARCH_DEPS[kind] if not order)
    name = search_name(kind, tag, seed, order)
    add(Unit(name, "search", tag, seed, search=kind, order=order, deps=deps,
             cost=search_cost[kind]))
    return name

  t1_train = []
  if "table1" in b.parts or "beyond" in b.parts:
    add(Unit("baselines.default", "baselines", cost=1))
    for s in range(b.seeds):
      add(Unit(f"t1.supervised.s{s}", "supervised", seed=s, row="supervised", cost=b.steps))
      for key, (_, rec) in SCR_ROWS.items():
        deps = (add_search(rec["search"], "default", s),) if "search" in rec else ()
        name = f"t1.{key}.s{s}"
        add(Unit(name, "train", seed=s, row=key, deps=deps, cost=b.steps))
        t1_train.append(name)
  # Table 1 and the harder variants first (the claim), then Table 2 and Figure 6.
  if "beyond" in b.parts:
    for v in variant_specs(b.variants, b.data):
      if v == "default":
        continue
      add(Unit(f"baselines.{v}", "baselines", data=v, cost=1))
      for s in range(b.beyond_seeds):
        add(Unit(f"bey.{v}.independent.s{s}", "train", data=v, seed=s, row="independent",
                 cost=b.steps))
        # The best row is known once Table 1 is; its searches run inside this unit.
        add(Unit(f"bey.{v}.best.s{s}", "train", data=v, seed=s, row="best",
                 deps=tuple(t1_train), cost=b.steps + search_cost["bo"]))
  if "table2" in b.parts:
    for s in range(b.table2_seeds):
      for o in b.table2_orders:
        add(Unit(f"t2.dense-{o}.s{s}", "train", seed=s, row="dense", order=o, cost=b.steps))
        dep = add_search("eq6", "default", s, order=o)
        add(Unit(f"t2.generic-eq6-{o}.s{s}", "train", seed=s, row="generic-eq6", order=o,
                 deps=(dep,), cost=b.steps))
        for q in ("sigmoid", "cosine"):
          add(Unit(f"t2.dynamic-{q}-{o}.s{s}", "train", seed=s, row=f"dynamic-{q}", order=o,
                   cost=b.steps))
  if "fig6" in b.parts:
    for s in range(b.fig6_seeds):
      add(Unit(f"fig6.s{s}", "fig6", seed=s, cost=b.fig6_orders * b.fig6_steps))
  if "dose" in b.parts:
    for s in range(b.seeds):
      for a in b.dose_alphas:
        add(Unit(dose_name(a, s), "train", seed=s, row="dose", alpha=float(a),
                 deps=(add_search("bo", "default", s),), cost=b.steps))
  return units


def distinct_random_order(seed: int) -> str:
  """The dense-random row's ordering of a seed: a different one per seed
  (issue 21), seeds 0, 1, ... in turn. Seed s draws from
  default_rng(s) (as `train --order random` does) until it hits an ordering
  no lower seed holds, so a seed's ordering depends only on the seeds below
  it, and seeds whose first draws differ keep `structure.random_order`'s."""
  taken = []
  for s in range(seed + 1):
    rng = np.random.default_rng(s)
    while (o := structure.ALL_ORDERS[rng.integers(len(structure.ALL_ORDERS))]) in taken:
      pass
    taken.append(o)
  return taken[seed]


def dose_name(alpha: float, seed: int) -> str:
  return f"dose.a{alpha:g}.s{seed}"


# ----------------------------------------------------------------------------
# Running units
# ----------------------------------------------------------------------------

def tree_hash(tree) -> str:
  """BLAKE2b (12 bytes, hex) of a pytree's leaves as float32 / int arrays, in
  jax's leaf order: equal hashes mean bit-identical trees."""
  h = hashlib.blake2b(digest_size=12)
  for leaf in jax.tree_util.tree_leaves(tree):
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(str((a.shape, a.dtype.str)).encode())
    h.update(a.data)
  return h.hexdigest()


def batch_order_hash(n: int, batch_size: int, seed: int, steps: int) -> str:
  """Hash of the training batches' image indices for steps 0..steps-1
  (`dataset.batch_indices`, what `train.fit` reads through `dataset.Batches`)."""
  h = hashlib.blake2b(digest_size=12)
  h.update(f"{n},{batch_size}".encode())
  for t in range(steps):
    h.update(np.asarray(dataset.batch_indices(n, batch_size, seed, t), np.int64).data)
  return h.hexdigest()


def read_curves(workdir: str) -> dict:
  """{key: {step: value}} of a workdir's metrics.csv (val/... rows only)."""
  out = {}
  path = os.path.join(workdir, "metrics.csv")
  if not os.path.exists(path):
    return out
  with open(path) as fh:
    for row in csv.DictReader(fh):
      if row["key"].startswith("val/"):
        out.setdefault(row["key"], {})[int(row["step"])] = float(row["value"])
  return out


SUPERVISED_NORMAL_WEIGHT = 1.0  # weight of the normal term of the supervised objective


def supervised_fns(nets, cfg, normal_weight: float = SUPERVISED_NORMAL_WEIGHT):
  """(objective, predict) of the supervised upper bound.

  predict(params, img_BxSxSx3) -> depth BxSxS: the SCR networks' encoder and
  depth decoder (independent factors) read as input-view depth; objective:
  the L1 between it and the ground-truth depth on the object (gt < max_depth)
  plus normal_weight x the mean (1 - cos) between their normals
  (`metrics.normals`, the ones MAD measures) on the eroded object mask, for
  `train.fit(objective=...)`; its batch is BxSxSx4, the image with the GT
  depth as a 4th channel (so the batches are the SCR runs' batches).

  Why the normal term: with the depth L1 alone the upper bound had the best
  SIDE of Table 1 but not the best MAD (seed 0: SIDE 0.418 vs independent's
  0.545, MAD 11.91 vs 9.49): a depth that is right to within L1 can still have
  noisy central-difference normals, and MAD reads only those."""
  cam, far = model.camera(cfg), cfg.max_depth
  ellipse = config.prior_ellipse(cfg)

  def predict(p, img):
    u = nets.apply(p, model.to_model_range(img), method=nets.encode)
    raw = nets.apply(p, u, method=nets.decode)
    return model.depth_from_raw(raw["D"][..., 0], cam, model.prior_amplitude(cfg), ellipse=ellipse)

  def objective(p, batch, st, step):  # the structure and step play no part
    img, gt = batch[..., :3], batch[..., 3]
    return supervised_loss(predict(p, img), gt, cam, far, normal_weight)

  return objective, predict


def supervised_loss(pred_BxSxS, gt_BxSxS, cam, far: float, normal_weight: float):
  """(loss, {loss, depth_l1, normal}) of the supervised upper bound.

  depth_l1: mean |pred - gt| (depth units) over the object, gt < far - 1e-3;
  normal: mean (1 - cos) between the normals of pred and gt (`metrics.normals`,
  in [0, 2]) over the object eroded by one pixel (every pixel's 8 neighbours
  on it, as MAD's mask); loss = depth_l1 + normal_weight * normal."""
  fg = (gt_BxSxS < far - 1e-3).astype(jnp.float32)
  l1 = jnp.sum(jnp.abs(pred_BxSxS - gt_BxSxS) * fg) / jnp.maximum(jnp.sum(fg), 1.0)
  inner = metrics.erode(fg)
  cos = jnp.sum(metrics.normals(pred_BxSxS, cam) * metrics.normals(gt_BxSxS, cam), -1)
  normal = jnp.sum((1.0 - cos) * inner) / jnp.maximum(jnp.sum(inner), 1.0)
  loss = l1 + normal_weight * normal
  return loss, dict(loss=loss, depth_l1=l1, normal=normal)


def _summary(summ: dict) -> dict:
  """The SIDE / MAD part of a `metrics.summarize` dict, JSON-able."""
  return {k: float(summ[k]) for k in ("side_mean", "side_std", "mad_mean", "mad_std",
                                      "mad_unsup3d_mean") if k in summ} | dict(n=int(summ["n"]))


class Reproduction:
  """The units of one reproduction in OUT: data, structures, runners.

  cfg: the validated training config (steps = budget.steps, eval_every set);
  budget: a resolved `Budget`."""

  def __init__(self, out: str, cfg, budget: Budget):
    self.out, self.cfg, self.b = out, cfg, budget
    self._data, self._init = {}, {}

  # -- paths, data --------------------------------------------------------------
  def result_path(self, name):
    return os.path.join(self.out, "units", name + ".json")

  def result(self, name):
    return _read(self.result_path(name))

  def data(self, tag: str) -> dict:
    """{train, val, test} arrays of a data tag, loaded once per process."""
    if tag not in self._data:
      spec = variant_specs(self.b.variants, self.b.data)[tag]
      self._data[tag] = {s: dataset.load_split(spec, s, self.cfg) for s in ("train", "val", "test")}
    return self._data[tag]

  def seed_cfg(self, seed: int, steps=None):
    sets = [f"seed={seed}"] + ([f"steps={steps}"] if steps else [])
    return config.override(self.cfg, sets)

  def pairing(self, cfg, n: int) -> dict:
    """init_hash and batch_hash of a run: what `train.fit` starts from with
    this config (the run's own, as `fit` returned it) on n training images:
    the hash of `init_state(cfg, PRNGKey(cfg.seed))`'s parameters and of the
    batch indices of every step."""
    key = (cfg, n)
    if key not in self._init:
      _, state = train_step.init_state(cfg, jax.random.PRNGKey(cfg.seed))
      self._init[key] = dict(init_hash=tree_hash(state.params),
                             batch_hash=batch_order_hash(n, cfg.batch_size, cfg.seed, cfg.steps))
    return self._init[key]

  # -- one unit -----------------------------------------------------------------
  def run_unit(self, u: Unit) -> dict:
    """Runs unit u unless its result exists; returns the result."""
    done = self.result(u.name)
    if done is not None:
      return done
    t0 = time.time()
    fn = dict(baselines=self._baselines, train=self._train, supervised=self._supervised,
              search=self._search, fig6=self._fig6)[u.kind]
    res = fn(u)
    res.update(unit=u.name, kind=u.kind, data=u.data, seed=u.seed, row=u.row,
               seconds=time.time() - t0, commit=_commit())
    _save(self.result_path(u.name), res)
    return res

  def _baselines(self, u):
    d = self.data(u.data)
    return dict(rows={k: _summary(v) for k, v in
                      evaluator.baselines(d["test"], d["train"], self.cfg).items()})

  def _search(self, u):
    d = self.data(u.data)
    wd = os.path.join(self.out, "search", u.name)
    if u.search in ("bo", "bo-oracle"):
      cfg = self.seed_cfg(u.seed, self.b.bo_steps)
      objective = "val_mad" if u.search == "bo-oracle" else "val_loss"
      s, trace = search.search_orders(cfg, wd, d["train"], d["val"], method="bo",
                                      n_init=self.b.bo_init, n_evals=self.b.bo_evals,
                                      batch=self.b.bo_batch, objective=objective, log=_log)
      return dict(order=s["order"], objective=objective, best_objective=trace["best_objective"],
                  evaluated={t["order"]: t["objective"] for t in trace["trace"]},
                  scores=trace["scores"],  # every metric of every evaluated ordering
                  budget=dict(n_init=self.b.bo_init, n_evals=self.b.bo_evals,
                              batch=self.b.bo_batch, steps_per_eval=cfg.steps))
    # eq5: unrolled over all edges (augmented Lagrangian on h(M)); eq6: masked by
    # an ordering (the seed's BO ordering, or a Table 2 ordering), no h(M) needed.
    masked = u.search == "eq6"
    order = u.order or (self.dep("bo", u.data, u.seed)["order"] if masked else None)
    cfg = self.seed_cfg(u.seed, self.b.unroll_steps)
    s, _ = search.search_unroll(cfg, wd, d["train"], d["val"], masked_order=order,
                                steps=self.b.unroll_steps, unroll_k=1, augmented=not masked,
                                tau=0.1, raise_to_dag=True, log=_log)
    m = np.asarray(structure.load_structure(os.path.join(wd, "structure.json"))["M"], np.float32)
    return dict(M=m.tolist(), order=structure.order_of(m), mask_order=order,
                edges=int((m != 0).sum()), m_continuous=s.get("m_continuous"),
                budget=dict(outer_steps=self.b.unroll_steps, unroll_k=1, threshold=0.1))

  def dep(self, kind, tag, seed, order=""):
    """The result of a search unit, run here first if it is not done (the
    beyond rows' searches, whose kind is known only once Table 1 is). An
    unrolled search of a seed >= unroll_seeds is seed 0's."""
    seed = self.b.search_seed(kind, seed)
    name = search_name(kind, tag, seed, order)
    res = self.result(name)
    if res is None:
      res = self.run_unit(Unit(name, "search", tag, seed, search=kind, order=order))
    return res

  def best_row(self) -> str:
    """The SCR row (not independent) with the lowest mean val MAD over the
    Table 1 seeds: chosen on val, never on test."""
    scores = {}
    for key in SCR_ROWS:
      if key == "independent":
        continue
      vals = [r["val"]["mad_mean"] for s in range(self.b.seeds)
              if (r := self.result(f"t1.{key}.s{s}")) is not None]
      if len(vals) == self.b.seeds:
        scores[key] = float(np.mean(vals))
    if not scores:
      raise UserError("the best SCR row needs Table 1's runs first")
    return min(scores, key=scores.get)

  def structure_for(self, u: Unit):
    """(Structure, row key, label) of a training unit."""
    S = structure.Structure
    row = self.best_row() if u.row == "best" else u.row
    if row == "dose":  # a fraction of the seed's BO ordering: generic, continuous M
      order = self.dep("bo", u.data, u.seed)["order"]
      return (S(m=u.alpha * structure.dense_matrix(order), variant="generic"), row,
              f"{u.alpha:g} x {order}")
    if u.order:  # Table 2: a fixed ordering
      dense = structure.dense_matrix(u.order)
      if row == "dense":
        return S(m=dense, variant="dense"), row, u.order
      if row == "generic-eq6":
        m = np.asarray(self.dep("eq6", u.data, u.seed, u.order)["M"], np.float32)
        return S(m=m, variant="generic"), row, f"{structure.order_of(m)} (mask {u.order})"
      return S(m=dense, q=row.split("-")[1], variant="dynamic"), row, u.order
    rec = SCR_ROWS[row][1]
    if rec["variant"] == "independent":
      return S(m=np.zeros((4, 4), np.float32), variant="independent"), row, "M = 0"
    if rec.get("order") == "random":
      order = distinct_random_order(u.seed)
      return S(m=structure.dense_matrix(order), variant="dense"), row, order
    found = self.dep(rec["search"], u.data, u.seed)
    if rec["variant"] == "generic":
      m = np.asarray(found["M"], np.float32)
      edges = int((m != 0).sum())
      label = f"{structure.order_of(m)}, {edges} edges" if edges else "0 edges (= independent)"
      return S(m=m, variant="generic"), row, label
    return (S(m=structure.dense_matrix(found["order"]), q=rec.get("q"), variant=rec["variant"]),
            row, found["order"])

  def _evaluate(self, nets, cfg, params, st, d) -> dict:
    ev = evaluator.Evaluator(nets, cfg)
    test, _, _ = ev.evaluate(params, d["test"], st)
    val, _, _ = ev.evaluate(params, d["val"], st)
    out = dict(test=_summary(test), val=_summary(val),
               val_loss=float(ev.val_loss(params, d["val"]["images"], st)))
    if d["test"].get("gt") is not None:  # what each factor learned (item 7 of the issue)
      out["diag"] = {k: float(v) for k, v in
                     diagnostics.evaluate(nets, params, d["test"], st, cfg).items()}
    return out

  def _train(self, u):
    d = self.data(u.data)
    st, row, label = self.structure_for(u)
    cfg = self.seed_cfg(u.seed)
    wd = os.path.join(self.out, "runs", u.name)
    r = train.fit_workdir(cfg, wd, d["train"], d["val"], st, quiet=True)
    res = self._evaluate(r["nets"], r["cfg"], r["state"].params, st, d)
    res.update(resolved_row=row, label=label, structure=st.record(), steps=int(r["step"]),
               curves=read_curves(wd),
               **self.pairing(r["cfg"], d["train"]["images"].shape[0]))
    return res

  def _supervised(self, u):
    d = self.data(u.data)
    tr = d["train"]
    wd = os.path.join(self.out, "runs", u.name)
    # The objective needs the prior's ellipse now (as the SCR runs': from the images).
    cfg = train.resolve_prior_ellipse(self.seed_cfg(u.seed), tr)
    objective, predict = supervised_fns(nets_lib.make_nets(cfg), cfg)
    both = dict(images=np.concatenate([tr["images"], tr["depth"][..., None]], -1)
                .astype(np.float32))
    none = structure.Structure(m=np.zeros((4, 4), np.float32))
    r = train.fit_workdir(cfg, wd, both, None, none, quiet=True, objective=objective,
                          run_info=dict(data="supervised: images with GT depth as a 4th channel"))
    params = r["state"].params
    fn = jax.jit(predict)
    ev = evaluator.Evaluator(r["nets"], r["cfg"])
    cam = model.camera(cfg)
    out = {}
    for split in ("test", "val"):
      pred = ev.map(lambda img: fn(params, img), d[split]["images"])
      out[split] = _summary(evaluator.depth_summary(pred, np.ones_like(pred), d[split]["depth"],
                                                   cam, cfg.batch_size))
    out.update(label="GT depth, L1 + normals", steps=int(r["step"]),
               **self.pairing(r["cfg"], tr["images"].shape[0]))
    return out

  def _fig6(self, u):
    d = self.data(u.data)
    orders = list(structure.ALL_ORDERS)[:self.b.fig6_orders]
    st = structure.candidates(orders)
    cfg = self.seed_cfg(u.seed, self.b.fig6_steps)
    wd = os.path.join(self.out, "runs", u.name)
    r = train.fit_workdir(cfg, wd, d["train"], None, st, quiet=True)
    ev = evaluator.Evaluator(r["nets"], r["cfg"])
    val_loss = ev.val_loss(r["state"].params, d["val"]["images"], st)
    res = {}
    for i, (o, (p_i, st_i)) in enumerate(zip(orders, evaluator.each_candidate(r["state"].params,
                                                                             st))):
      test, _, _ = ev.evaluate(p_i, d["test"], st_i)
      val, _, _ = ev.evaluate(p_i, d["val"], st_i)
      res[o] = dict(test_mad=float(test["mad_mean"]), test_side=float(test["side_mean"]),
                    val_mad=float(val["mad_mean"]), val_loss=float(val_loss[i]))
    return dict(orders=res, steps=int(r["step"]),
                **self.pairing(r["cfg"], d["train"]["images"].shape[0]))


# ----------------------------------------------------------------------------
# The scheduler
# ----------------------------------------------------------------------------

def _fmt_s(s: float) -> str:
  s = int(round(s))
  return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
  """One line per finished unit: done / total, running, elapsed, ETA (from the
  cost finished in this invocation, in training-step equivalents)."""

  def __init__(self, units, done):
    self.total = len(units)
    self.cost = {u.name: u.cost for u in units}
    self.done = set(done)
    self.left = sum(u.cost for u in units if u.name not in self.done)
    self.spent, self.t0 = 0.0, time.time()

  def finish(self, name, running: int):
    self.done.add(name)
    self.spent += self.cost[name]
    self.left -= self.cost[name]
    el = time.time() - self.t0
    eta = _fmt_s(el / self.spent * self.left) if self.spent > 0 else "?"
    _log(f"[reproduce] {len(self.done)}/{self.total} units done, {running} running, "
         f"{_fmt_s(el)} elapsed, ETA {eta}: {name}")


def run_all(rep: Reproduction, units, jobs: int = 1):
  """Runs every unfinished unit, dependencies first: in this process with
  jobs=1, else as up to `jobs` worker processes (logs in OUT/logs/).

  Raises:
    UserError: a unit failed (the others that could run have finished; its
      log is named).
  """
  pending = [u for u in units if rep.result(u.name) is None]
  prog = Progress(units, [u.name for u in units if u not in pending])
  if pending:
    _log(f"[reproduce] {len(units) - len(pending)}/{len(units)} units already done, "
         f"{len(pending)} to run with {jobs} job(s)")
  ready = lambda u: all(rep.result(d) is not None for d in u.deps)
  if jobs <= 1:
    for u in pending:  # plan() order respects the dependencies
      _log(f"[reproduce] start {u.name}")
      rep.run_unit(u)
      prog.finish(u.name, 0)
      parallel.release_programs()  # tens of units in one process: stay under max_map_count
    return
  running, failed = {}, []
  # Workers import this very scr_jax (not another checkout's installed copy).
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  logs = os.path.join(rep.out, "logs")
  os.makedirs(logs, exist_ok=True)
  cores = parallel.core_slots(jobs)  # one core per worker: less thread contention
  slot_of = {}  # running unit -> its slot
  try:
    while pending or running:
      for u in [u for u in pending if ready(u)][:max(jobs - len(running), 0)] if not failed else []:
        pending.remove(u)
        slot = min(set(range(jobs)) - set(slot_of.values()))
        slot_of[u.name] = slot
        fh = open(os.path.join(logs, u.name + ".log"), "a")
        cmd = parallel.on_core([sys.executable, "-m", "scr_jax.reproduce", "--worker", u.name,
                                "--out", rep.out], cores[slot] if cores else None)
        running[u.name] = (subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env),
                           fh)
        on = f", core {cores[slot]}" if cores else ""
        _log(f"[reproduce] start {u.name} (pid {running[u.name][0].pid}{on})")
      if not running:
        if pending and not failed:  # nothing can start: a dependency is missing
          raise UserError(f"units {', '.join(u.name for u in pending[:3])} wait for units that "
                          "are not planned")
        break
      time.sleep(0.5)
      for name, (proc, fh) in list(running.items()):
        if proc.poll() is None:
          continue
        fh.close()
        del running[name]
        del slot_of[name]
        if proc.returncode or rep.result(name) is None:
          failed.append(name)
          _log(f"[reproduce] FAILED {name} (exit {proc.returncode}): see "
               f"{os.path.join(logs, name + '.log')}")
        else:
          prog.finish(name, len(running))
  finally:  # stopped (a signal, an error): workers save their checkpoints and exit
    for proc, fh in running.values():
      if proc.poll() is None:
        proc.terminate()
    for name, (proc, fh) in running.items():
      proc.wait()
      fh.close()
      _log(f"[reproduce] stopped {name}: a rerun resumes a training from its checkpoint "
           "(an unrolled search from its last snapshot, every 25 outer steps)")
  if failed:
    raise UserError(f"{len(failed)} unit(s) failed ({', '.join(failed)}); their logs are in "
                    f"{logs}; rerun to retry (finished units are kept)")


# ----------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------

def _ms(xs, fmt="{:.2f}"):
  if not xs:
    return "n/a"
  m, s = stats.mean_std(xs)
  return (fmt + " ± " + fmt).format(m, s)


def _diff_cell(row: dict, ref: dict, seeds, star: bool = False) -> str:
  """"mean [lo, hi]" of the paired difference row - ref over `seeds` ({seed:
  value} each), its unadjusted 95 % t interval; star=True gives the mean alone,
  with * when that interval excludes 0."""
  d = stats.paired_difference([row[s] for s in seeds], [ref[s] for s in seeds])
  if star:
    return f"{d['mean']:+.2f}" + ("*" if d["lo"] > 0 or d["hi"] < 0 else "")
  return f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]"


def _per_seed(results, key="mad_mean", split="test"):
  return {r["seed"]: r[split][key] for r in results}


def collect(rep: Reproduction) -> dict:
  """Every finished unit's result, {name: result}."""
  folder = os.path.join(rep.out, "units")
  out = {}
  if os.path.isdir(folder):
    for f in sorted(os.listdir(folder)):
      if f.endswith(".json"):
        out[f[:-5]] = _read(os.path.join(folder, f))
  return out


def compare(rows: dict, ref: str, keys, alpha=0.05) -> dict:
  """Paired comparisons of rows[k] (per-seed {seed: value}) against rows[ref]
  on their common seeds, Holm over `keys` (those with >= 2 common seeds).
  Returns {key: stats.holm_intervals entry + seeds}."""
  pairs, used = [], []
  for k in keys:
    common = sorted(set(rows.get(k, {})) & set(rows.get(ref, {})))
    if len(common) >= 2:
      pairs.append(([rows[k][s] for s in common], [rows[ref][s] for s in common]))
      used.append((k, common))
  out = {}
  for (k, common), r in zip(used, stats.holm_intervals(pairs, alpha)):
    out[k] = dict(r, seeds=common, ref_mean=float(np.mean([rows[ref][s] for s in common])))
  return out


def verdict(c: dict) -> str:
  """"better" / "worse" only when the Holm interval of (row - ref) excludes 0."""
  if c["holm_hi"] < 0:
    return "**better**"
  if c["holm_lo"] > 0:
    return "worse"
  return "no difference shown"


def _cmp_line(label, c):
  pct = 100.0 * c["mean"] / c["ref_mean"] if c["ref_mean"] else float("nan")
  return (f"| {label} | {len(c['seeds'])} | {c['mean']:+.2f} ({pct:+.1f} %) | "
          f"[{c['lo']:+.2f}, {c['hi']:+.2f}] | {c['p']:.3g} | {c['p_holm']:.3g} | "
          f"[{c['holm_lo']:+.2f}, {c['holm_hi']:+.2f}] (level {100 * (1 - c['level']):.1f} %) | "
          f"{verdict(c)} |")


CMP_HEAD = ["| row | seeds | MAD difference vs independent (% of independent) | 95 % CI | p | "
            "Holm p | Holm interval | verdict |", "|---|---|---|---|---|---|---|---|"]


def _commits_line(res: dict) -> str:
  """`sha10` (n units), ...: the commits the finished units record, most
  units first; units from before b0f4b98 (no commit field) count as "not recorded"."""
  n = {}
  for r in res.values():
    c = r.get("commit") or "not recorded"
    c = c if c in ("not recorded", "unknown") else c[:10] + c[40:]
    n[c] = n.get(c, 0) + 1
  return ", ".join(f"`{c}` ({k} unit{'s' if k != 1 else ''})"
                   for c, k in sorted(n.items(), key=lambda kv: -kv[1])) or "none yet"


def bo_scores(rep: Reproduction, name: str, r: dict) -> dict:
  """{order: {val_loss, val_mad, ...}} of a BO search unit: from the unit, or
  (units written before it kept them) from OUT/search/<name>/bo_trace.json;
  {} when neither has them."""
  if r.get("scores"):
    return r["scores"]
  path = os.path.join(rep.out, "search", name, "bo_trace.json")
  return (_read(path).get("scores") or {}) if os.path.exists(path) else {}


def objective_agreement(rep: Reproduction, res: dict) -> list:
  """Markdown lines: per BO search, the Spearman rank correlation between the
  label-free objective (val photometric loss) and val MAD over the orderings it
  evaluated: does the objective a user without depth has rank orderings as
  the depth error does?"""
  out = []
  for name, r in res.items():
    if r.get("kind") != "search" or "evaluated" not in r:
      continue
    sc = bo_scores(rep, name, r)
    orders = [o for o in sc if "val_loss" in sc[o] and "val_mad" in sc[o]]
    if len(orders) >= 3:
      rho = stats.spearman([sc[o]["val_loss"] for o in orders], [sc[o]["val_mad"] for o in orders])
      best_mad = min(orders, key=lambda o: sc[o]["val_mad"])
      out.append(f"- {name}: over its {len(orders)} evaluated orderings, Spearman(val "
                 f"photometric loss, val MAD) = {rho:+.2f}; lowest val MAD among them "
                 f"{best_mad} ({sc[best_mad]['val_mad']:.2f})")
  if out:
    out = ["", "Does the label-free objective rank orderings as the depth error does "
           "(each BO evaluation records both)?", ""] + out
  return out


def dose_section(res: dict, b: Budget, mad: dict) -> list:
  """Markdown lines of the dose part: test MAD against the structure's strength
  alpha (M = alpha x the seed's BO ordering; 0 = independent, 1 = dense BO),
  per seed. A structure whose effect is systematic moves MAD monotonically
  with alpha on every seed; chaos alone moves it by about as much at the
  smallest alpha as at 1."""
  alphas = [0.0] + sorted(b.dose_alphas) + [1.0]
  per = {0.0: mad.get("independent", {}), 1.0: mad.get("dense-bo", {})}
  for a in b.dose_alphas:
    per[a] = {s: res[n]["test"]["mad_mean"] for s in range(b.seeds)
              if (n := dose_name(a, s)) in res}
  ind = per[0.0]
  out = ["", "## Item 7: the structure's strength (dose)", "",
         "M = alpha x the seed's BO ordering (alpha 0: independent, 1: dense BO), the same "
         f"{b.seeds} paired seeds and {b.steps} steps. Difference = row - independent in test "
         "MAD with its unadjusted 95 % t interval; mean |difference| is how far the row moves "
         "from independent whatever the direction: at the smallest alpha the structure barely "
         "enters the forward pass, so that row measures how far training's chaos alone moves "
         "a run.", "",
         "| alpha | test MAD | per seed | difference vs independent [95 % CI] | mean abs difference |",
         "|---|---|---|---|---|"]
  for a in alphas:
    vals = per[a]
    common = sorted(set(vals) & set(ind))
    if a == 0.0 or len(common) < 2:
      diff = absd = "-" if a == 0.0 else "n/a"
    else:
      diff = _diff_cell(vals, ind, common)
      absd = f"{np.mean([abs(vals[s] - ind[s]) for s in common]):.2f}"
    out.append(f"| {a:g} | {_ms(list(vals.values()))} | "
               + ", ".join(f"s{s} {v:.2f}" for s, v in sorted(vals.items())) + f" | {diff} | {absd} |")
  rhos = {}
  for s in range(b.seeds):
    xs = [(a, per[a][s]) for a in alphas if s in per[a]]
    if len(xs) == len(alphas):
      rhos[s] = stats.spearman([a for a, _ in xs], [v for _, v in xs])
  if rhos:
    out += ["", "Spearman rank correlation of test MAD with alpha, per seed (+1: more "
            "structure, more error on every step of alpha; -1: less): "
            + ", ".join(f"s{s} {r:+.2f}" for s, r in rhos.items())
            + f"; mean {np.mean(list(rhos.values())):+.2f}."]
  return out


# Issue 21 item 7: does a structure move the view, the light or the shape?
FACTOR_KEYS = (("view_mae_deg", "view error (deg)"), ("light_dir_deg", "light direction error (deg)"),
               ("shape_spread_ratio", "shape spread / truth's"), ("shape_corr", "per-image shape corr"))


def factor_differences(t1: dict, labels: dict, keys) -> list:
  """Markdown lines: per SCR row, the paired (by seed) mean difference row -
  independent of each per-factor diagnostic in FACTOR_KEYS, with its
  unadjusted 95 % t interval (exploratory: not Holm-corrected). A cell needs
  the diagnostic on >= 2 common seeds, else n/a."""
  ref = {r["seed"]: r.get("diag", {}) for r in t1.get("independent", [])}
  out = ["", "### Per factor, paired against independent (test)", "",
         "Mean over seeds of (row - independent) with the unadjusted 95 % t interval "
         "(exploratory, no multiplicity correction). Negative errors and positive "
         "spread / corr are the better direction.", "",
         "| row | " + " | ".join(name for _, name in FACTOR_KEYS) + " |",
         "|---" * (len(FACTOR_KEYS) + 1) + "|"]
  for key in keys:
    rows = {r["seed"]: r.get("diag", {}) for r in t1.get(key, [])}
    cells = []
    for k, _ in FACTOR_KEYS:
      seeds = sorted(s for s in set(rows) & set(ref) if k in rows[s] and k in ref[s]
                     and np.isfinite(rows[s][k]) and np.isfinite(ref[s][k]))
      if len(seeds) < 2:
        cells.append("n/a")
        continue
      cells.append(_diff_cell({s: rows[s][k] for s in seeds}, {s: ref[s][k] for s in seeds},
                              seeds))
    out.append(f"| {labels[key]} | " + " | ".join(cells) + " |")
  return out


def curve_differences(t1: dict, labels: dict, keys, metric="val/mad_mean") -> list:
  """Markdown lines: per SCR row and evaluated step, the paired (by seed) mean
  difference row - independent of the validation curve `metric`; * marks an
  unadjusted 95 % t interval that excludes 0 (exploratory). It measures the
  paper's Fig. 8 claim (SCR converges faster than independent) at every step,
  not only at the end. A cell needs the step on >= 2 common seeds, else n/a."""
  ref = {r["seed"]: r.get("curves", {}).get(metric, {}) for r in t1.get("independent", [])}
  steps = sorted({int(k) for c in ref.values() for k in c})
  if not steps:
    return []
  out = ["", "### Convergence: validation MAD during training, paired against independent", "",
         "Mean over seeds of (row - independent) in val MAD at each evaluated step (negative: "
         "the row is ahead); * marks an unadjusted 95 % t interval excluding 0 (exploratory, "
         "no multiplicity correction). The first line is independent's own mean val MAD.", "",
         "| row | " + " | ".join(str(k) for k in steps) + " |", "|---" * (len(steps) + 1) + "|"]
  def at(curves, k):
    return {s: c[str(k)] for s, c in curves.items() if str(k) in c and np.isfinite(c[str(k)])}
  out.append("| independent (val MAD) | " + " | ".join(
      f"{np.mean(list(v.values())):.2f}" if (v := at(ref, k)) else "n/a" for k in steps) + " |")
  for key in keys:
    rows = {r["seed"]: r.get("curves", {}).get(metric, {}) for r in t1.get(key, [])}
    cells = []
    for k in steps:
      row, base = at(rows, k), at(ref, k)
      seeds = sorted(set(row) & set(base))
      cells.append(_diff_cell(row, base, seeds, star=True) if len(seeds) >= 2 else "n/a")
    out.append(f"| {labels[key]} | " + " | ".join(cells) + " |")
  return out


def report(rep: Reproduction, settings: dict) -> str:
  """Writes OUT/results.md, OUT/results_readme.md and the figures from the
  finished units; returns results.md's text. Missing units show as n/a."""
  b = rep.b
  res = collect(rep)
  lines = ["# Reproduction of SCR (Liu et al., ECCV 2022) with scr-jax", "",
           f"Command: `{settings.get('command', '')}`", "",
           f"Commit of the last invocation: `{settings.get('commit', '?')}`; units finished: "
           f"{sum(1 for n in res)} of {len(plan(b))}.", "",
           "Units per commit they were computed at (a resumed reproduction can span several): "
           + _commits_line(res), "",
           "Budget (every search's included): `" + json.dumps(dataclasses.asdict(b)) + "`", "",
           "Training config (`config.json` in this folder; per unit `seed` and, for searches, "
           "`steps` change):", "", "```json", rep.cfg.to_json(), "```", ""]
  readme = []
  # -- Table 1 ------------------------------------------------------------------
  t1 = {}
  for key in ["supervised"] + list(SCR_ROWS):
    t1[key] = [res[f"t1.{key}.s{s}"] for s in range(b.seeds) if f"t1.{key}.s{s}" in res]
  mad = {k: _per_seed(v) for k, v in t1.items()}
  base = (res.get("baselines.default") or {}).get("rows", {})
  labels = dict(supervised=SUPERVISED, **{k: v[0] for k, v in SCR_ROWS.items()})
  lines += ["## Table 1: test split, default data", "",
            f"{b.seeds} paired seeds ({', '.join(map(str, range(b.seeds)))}), {b.steps} steps "
            f"each. SIDE (x1e-2) and MAD (degrees): mean ± std over seeds of each seed's "
            "test mean; baselines are deterministic (± over test images).", "",
            "| row | structure per seed | SIDE | MAD | MAD per seed |", "|---|---|---|---|---|"]
  tab = []
  for key, rs in t1.items():
    struct = "; ".join(r.get("label", "") for r in rs) or "-"
    side = _ms([r["test"]["side_mean"] for r in rs], "{:.3f}")
    mad_ms = _ms([r["test"]["mad_mean"] for r in rs])
    tab.append(f"| {labels[key]} | {struct} | {side} | {mad_ms} | "
               + ", ".join(f"{r['test']['mad_mean']:.2f}" for r in rs) + " |")
  for name, v in base.items():
    tab.append(f"| {name} (baseline) | - | {v['side_mean']:.3f} ± {v['side_std']:.3f} | "
               f"{v['mad_mean']:.2f} ± {v['mad_std']:.2f} | - |")
  lines += tab
  scr_keys = [k for k in SCR_ROWS if k != "independent"]
  cmp1 = compare(mad, "independent", scr_keys)
  lines += ["", "### SCR rows against independent (paired by seed)", "",
            "Difference = row − independent in test MAD (negative: lower error). 95 % CI and p: "
            "paired t over seeds; Holm: over the SCR rows listed; the Holm interval is at "
            "Holm's adjusted level, so it excludes 0 exactly when Holm rejects. A row is "
            "\"better\" only when its Holm interval lies below 0.", ""] + CMP_HEAD
  cmp_lines = [_cmp_line(labels[k], cmp1[k]) for k in scr_keys if k in cmp1]
  lines += cmp_lines or ["| (fewer than 2 paired seeds so far) | | | | | | | |"]
  # The row carried beyond the default data: lowest mean val MAD.
  try:
    best = rep.best_row()
  except UserError:
    best = None
  goal_lines = []
  if best:
    val_means = {k: float(np.mean([r["val"]["mad_mean"] for r in t1[k]])) for k in scr_keys
                 if len(t1[k]) == b.seeds}
    goal_lines.append(
        f"Chosen on val (lowest mean val MAD over the seeds, never test): **{labels[best]}** "
        f"(val MAD " + ", ".join(f"{labels[k].split(' (')[0]} {v:.2f}"
                                 for k, v in sorted(val_means.items(), key=lambda kv: kv[1]))
        + ").")
    if best in cmp1:
      c = cmp1[best]
      gain = -100.0 * c["mean"] / c["ref_mean"]
      ok = gain >= 10 and c["holm_hi"] < 0
      goal_lines.append(
          f"Goal (best SCR row >= 10 % lower test MAD than independent, Holm interval below 0) "
          f"on the default data: {'**met**' if ok else '**not met**'} ({gain:+.1f} % lower, "
          f"Holm interval [{c['holm_lo']:+.2f}, {c['holm_hi']:+.2f}]).")
  avg = base.get("average GT depth")
  if avg and mad["independent"]:
    ratios = [v / avg["mad_mean"] for v in mad["independent"].values()]
    goal_lines.append(
        f"Goal (independent below 0.55 x average-GT on every seed): "
        f"{'met' if all(x < 0.55 for x in ratios) else 'not met'} (ratios "
        + ", ".join(f"{x:.2f}" for x in ratios) + ").")
  lines += [""] + goal_lines
  # -- pairing --------------------------------------------------------------------
  lines += ["", "### Pairing check", "",
            "Per seed, over every Table 1 training unit: the hash of the initial parameters "
            "(`init_state(cfg, PRNGKey(seed))` of the config each run trained with) and of "
            "its batch indices at every step (the supervised row's batches add the GT depth "
            "as a channel to the same images).",
            ""]
  for s in range(b.seeds):
    rs = [r for k in t1 for r in t1[k] if r["seed"] == s]
    inits = sorted({r["init_hash"] for r in rs})
    orders = sorted({r["batch_hash"] for r in rs})
    ok = len(inits) == 1 and len(orders) == 1
    lines.append(f"- seed {s}: {len(rs)} units, init {', '.join(inits) or '-'}, batch order "
                 f"{', '.join(orders) or '-'}: {'paired' if ok else 'NOT PAIRED' if rs else '-'}")
  # -- searches -------------------------------------------------------------------
  lines += ["", "### Searches (on train / val only)", "",
            f"BO: {b.bo_init} initial orderings, {b.bo_evals} evaluated in all, {b.bo_batch} "
            f"trained together per round, {b.bo_steps} training steps per evaluation; objective "
            "val photometric loss (oracle row: val MAD). Unrolled (Eq. 5: all 12 edges, "
            f"augmented Lagrangian on h(M); Eq. 6: masked by an ordering): {b.unroll_steps} "
            "outer steps of 1 inner step, threshold 0.1 (raised until a DAG). Each search "
            "uses its seed's initialisation and batches. BO is searched per seed; "
            + ("the unrolled searches too." if b.unroll_seeds >= max(b.seeds, b.table2_seeds,
                                                                     b.beyond_seeds) else
               f"the unrolled searches on seeds 0-{b.unroll_seeds - 1} only: a later seed "
               f"trains with seed 0's M (an outer step costs about {UNROLL_STEP_COST} training "
               f"steps on CPU)." if b.unroll_seeds > 1 else
               "the unrolled searches once, on seed 0: every seed trains with seed 0's M (an "
               f"outer step costs about {UNROLL_STEP_COST} training steps on CPU)."), "",
            "| search | seed | found | objective / edges | seconds |", "|---|---|---|---|---|"]
  for name, r in res.items():
    if r.get("kind") != "search":
      continue
    found = r.get("order", "")
    if "M" in r:
      extra = f"{r['edges']} edges" + (f", mask {r['mask_order']}" if r.get("mask_order") else "")
    else:
      extra = f"{r['objective']} {r['best_objective']:.4g}"
    lines.append(f"| {name.split('.s')[0]} | {r['seed']} | {found} | {extra} | "
                 f"{r['seconds']:.0f} |")
  lines += objective_agreement(rep, res)
  # -- diagnostics ------------------------------------------------------------------
  dk = ("view_yaw_mae_deg", "view_pitch_mae_deg", "light_dir_deg", "light_oblique_slope",
        "depth_sign", "shape_spread_ratio", "relief_ratio", "shape_corr")
  if any(r.get("diag") for rs in t1.values() for r in rs):
    have = [k for k in dk if any(k in r.get("diag", {}) for rs in t1.values() for r in rs)]
    lines += ["", "### What each factor learned (test, mean over seeds)", "",
              "| row | " + " | ".join(have) + " |", "|---" * (len(have) + 1) + "|"]
    for key, rs in t1.items():
      ds = [r["diag"] for r in rs if r.get("diag")]
      if ds:
        vals = [[d[k] for d in ds if np.isfinite(d.get(k, np.nan))] for k in have]
        lines.append(f"| {labels[key]} | " + " | ".join(
            f"{np.mean(v):.2f}" if v else "n/a" for v in vals) + " |")
    lines += factor_differences(t1, labels, scr_keys)
  # -- Table 2 ----------------------------------------------------------------------
  if "table2" in b.parts:
    cols = ("dense", "generic-eq6", "dynamic-sigmoid", "dynamic-cosine")
    ind2 = [mad["independent"][s] for s in range(b.table2_seeds) if s in mad["independent"]]
    lines += ["", "## Table 2: test MAD per ordering", "",
              f"Mean ± std over {b.table2_seeds} paired seeds; generic (Eq. 6) searched per "
              "seed with the ordering as its mask. Independent (same seeds) for reference: "
              f"{_ms(ind2)}.",
              "", "| ordering | dense | generic (Eq. 6) | dynamic (sigmoid) | dynamic (cosine) |",
              "|---|---|---|---|---|"]
    for o in b.table2_orders:
      cells = []
      for c in cols:
        rs = [res[n]["test"]["mad_mean"] for s in range(b.table2_seeds)
              if (n := f"t2.{c}-{o}.s{s}") in res]
        cells.append(_ms(rs))
      lines.append(f"| {o} | " + " | ".join(cells) + " |")
  # -- Figure 6 ---------------------------------------------------------------------
  if "fig6" in b.parts:
    f6 = {s: res[f"fig6.s{s}"]["orders"] for s in range(b.fig6_seeds) if f"fig6.s{s}" in res}
    lines += ["", "## Figure 6: the dense orderings trained together", "",
              f"{b.fig6_orders} orderings, one vmapped run per seed ({b.fig6_steps} steps, the "
              "seed's initialisation and batches for all).", "", "![fig6](fig6.png)", ""]
    if f6:
      plot_fig6(f6, mad.get("independent", {}), os.path.join(rep.out, "fig6.png"))
      for s, o in f6.items():
        best_o = min(o, key=lambda k: o[k]["test_mad"])
        best_v = min(o, key=lambda k: o[k]["val_loss"])
        ind = mad.get("independent", {}).get(s)
        below = ("" if ind is None else
                 f"; {sum(v['test_mad'] < ind for v in o.values())} of {len(o)} below "
                 f"independent ({ind:.2f})")
        lines.append(f"- seed {s}: best test MAD {best_o} {o[best_o]['test_mad']:.2f}, worst "
                     f"{max(o, key=lambda k: o[k]['test_mad'])} "
                     f"{max(v['test_mad'] for v in o.values()):.2f}; lowest val loss {best_v}"
                     + below)
      rhos = []
      for s1, s2 in itertools.combinations(sorted(f6), 2):
        common = sorted(set(f6[s1]) & set(f6[s2]))
        if len(common) >= 2:
          rho = stats.spearman([f6[s1][o]["test_mad"] for o in common],
                               [f6[s2][o]["test_mad"] for o in common])
          rhos.append(rho)
          lines.append(f"- Spearman rank correlation of the orderings' test MAD, seeds {s1} "
                       f"and {s2}: {rho:+.2f}")
      if rhos:
        lines.append(f"- mean over seed pairs: {np.nanmean(rhos):+.2f} (near 0: which ordering "
                     "is best is a property of the seed, not of the data)")
  # -- Figure 8 ---------------------------------------------------------------------
  curves = {labels[k]: [r["curves"].get("val/mad_mean", {}) for r in rs]
            for k, rs in t1.items() if k != "supervised" and rs}
  if any(c for cs in curves.values() for c in cs):
    plot_fig8(curves, os.path.join(rep.out, "fig8.png"))
    lines += ["", "## Figure 8: validation MAD during training", "",
              "Mean over the seeds of each Table 1 row.", "", "![fig8](fig8.png)"]
    lines += curve_differences(t1, labels, scr_keys)
  if "dose" in b.parts:
    lines += dose_section(res, b, mad)
  # -- beyond -----------------------------------------------------------------------
  bey_cmp = {}
  if "beyond" in b.parts:
    lines += ["", "## Beyond the default data: the val-chosen SCR row against independent", "",
              f"{b.beyond_seeds} paired seeds per variant; the row's searches rerun on the "
              "variant's data. Holm over the variants.", "",
              "| data | baselines (constant / average GT / template) | independent | best SCR row "
              "| per seed (independent / best) |", "|---|---|---|---|---|"]
    rows = {}
    tags = [v for v in variant_specs(b.variants, b.data) if v != "default"]
    for v in tags:
      ind = [res[n] for s in range(b.beyond_seeds) if (n := f"bey.{v}.independent.s{s}") in res]
      bst = [res[n] for s in range(b.beyond_seeds) if (n := f"bey.{v}.best.s{s}") in res]
      rows[f"{v}/ind"], rows[f"{v}/best"] = _per_seed(ind), _per_seed(bst)
      bl = (res.get(f"baselines.{v}") or {}).get("rows", {})
      which = sorted({r["resolved_row"] for r in bst})
      lines.append(f"| {v} | " + " / ".join(f"{bl[k]['mad_mean']:.2f}" for k in bl) + " | "
                   f"{_ms([r['test']['mad_mean'] for r in ind])} | "
                   f"{', '.join(which) or '-'}: {_ms([r['test']['mad_mean'] for r in bst])} | "
                   + ", ".join(f"{rows[f'{v}/ind'].get(s, float('nan')):.2f} / "
                               f"{rows[f'{v}/best'].get(s, float('nan')):.2f}"
                               for s in range(b.beyond_seeds)) + " |")
    pairs = {v: (rows[f"{v}/best"], rows[f"{v}/ind"]) for v in tags}
    # compare() takes one reference: the common seeds per variant, then Holm over variants.
    per = {v: compare({"best": pairs[v][0], "ind": pairs[v][1]}, "ind", ["best"]).get("best")
           for v in tags}
    have = [v for v in tags if per[v]]
    if have:
      fam = stats.holm_intervals([([pairs[v][0][s] for s in per[v]["seeds"]],
                                   [pairs[v][1][s] for s in per[v]["seeds"]]) for v in have])
      lines += [""] + CMP_HEAD
      for v, c in zip(have, fam):
        c = dict(c, seeds=per[v]["seeds"], ref_mean=per[v]["ref_mean"])
        bey_cmp[v] = c
        lines.append(_cmp_line(f"{v}: best SCR row", c))
  text = "\n".join(lines) + "\n"
  with open(os.path.join(rep.out, "results.md"), "w") as fh:
    fh.write(text)
  # -- README-ready section ----------------------------------------------------------
  readme = ["## Results", "",
            f"`{settings.get('command', '')}` (commit `{settings.get('commit', '?')[:10]}`; "
            f"{b.seeds} paired seeds, {b.steps} steps, `{b.preset}`, built-in data unless "
            "named; full tables, searches, figures and the pairing check in the run's "
            "`results.md`).", "",
            "| row | test MAD (mean ± std over seeds) |", "|---|---|"] + [
                f"| {labels[k]} | {_ms([r['test']['mad_mean'] for r in rs])} |"
                for k, rs in t1.items()] + [
                f"| {n} (baseline) | {v['mad_mean']:.2f} |" for n, v in base.items()]
  readme += ["", "Against independent, paired by seed (Holm over the SCR rows):", ""] + CMP_HEAD
  readme += cmp_lines + [""] + goal_lines
  if bey_cmp:
    readme += ["", "Harder variants (the val-chosen row, Holm over the variants):", ""] + CMP_HEAD
    readme += [_cmp_line(f"{v}: best SCR row", c) for v, c in bey_cmp.items()]
  with open(os.path.join(rep.out, "results_readme.md"), "w") as fh:
    fh.write("\n".join(readme) + "\n")
  return text


def _figure(w, h):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(w, h), dpi=100)
  FigureCanvasAgg(fig)
  return fig


def plot_fig6(f6: dict, independent: dict, path: str):
  """Bars: mean test MAD per ordering over seeds (sorted), dots: each seed;
  dashed: independent's mean over the same seeds."""
  fig = _figure(12, 4)
  ax = fig.add_subplot(1, 1, 1)
  orders = sorted(set.intersection(*[set(o) for o in f6.values()]))
  mean = {o: np.mean([f6[s][o]["test_mad"] for s in f6]) for o in orders}
  srt = sorted(orders, key=mean.get)
  ax.bar(range(len(srt)), [mean[o] for o in srt], color="tab:blue", alpha=0.6)
  for s in f6:
    ax.plot(range(len(srt)), [f6[s][o]["test_mad"] for o in srt], "o", ms=3, label=f"seed {s}")
  ind = [independent[s] for s in f6 if s in independent]
  if ind:
    ax.axhline(np.mean(ind), c="tab:red", ls="--", label="independent")
  ax.set_xticks(range(len(srt)))
  ax.set_xticklabels(srt, rotation=90, fontsize=7)
  ax.set_ylabel("test MAD (deg)")
  vals = [f6[s][o]["test_mad"] for s in f6 for o in orders] + ind
  lo, hi = min(vals), max(vals)
  ax.set_ylim(lo - 0.1 * (hi - lo + 1e-6), hi + 0.1 * (hi - lo + 1e-6))
  ax.legend(fontsize=7)
  fig.suptitle("Figure 6: dense SCR orderings (sorted by mean over seeds), test split")
  fig.tight_layout()
  fig.savefig(path)


def plot_fig8(curves: dict, path: str):
  """Mean over seeds of each row's val MAD curve (steps all seeds share)."""
  fig = _figure(8, 4)
  ax = fig.add_subplot(1, 1, 1)
  for name, cs in curves.items():
    cs = [c for c in cs if c]
    if not cs:
      continue
    steps = sorted(set.intersection(*[set(map(int, c)) for c in cs]))
    get = lambda c, t: c[t] if t in c else c[str(t)]
    ax.plot(steps, [np.mean([get(c, t) for c in cs]) for t in steps], marker="o", ms=3,
            label=name)
  ax.set_xlabel("step")
  ax.set_ylabel("val MAD (deg)")
  ax.legend(fontsize=7)
  fig.suptitle("Figure 8: validation convergence (mean over seeds)")
  fig.tight_layout()
  fig.savefig(path)


# ----------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------

def _commit() -> str:
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                         timeout=10).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                           capture_output=True, text=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "unknown"
  return (sha or "unknown") + (" (with uncommitted changes)" if dirty else "")


def make_config(budget: Budget):
  """The training config of a budget: preset + --set + steps, eval_every =
  steps / 10 unless set (Figure 8 needs points along the way)."""
  cfg = config.get_config(budget.preset)
  cfg = config.override(cfg, list(budget.sets) + ([f"steps={budget.steps}"] if budget.steps
                                                   else []))
  cfg = config.without_missing_vgg(cfg, _log)
  if not any(s.split("=", 1)[0].strip() == "eval_every" for s in budget.sets):
    cfg = config.override(cfg, [f"eval_every={max(cfg.steps // 10, 1)}"])
  return config.validate(cfg)


def open_reproduction(out: str, budget: Budget | None = None, command: str = ""):
  """The Reproduction in OUT: with a budget, a new one (settings.json written)
  or the same one continued; without, the one OUT holds.

  Raises:
    UserError: OUT holds a reproduction with another budget, or none (budget None).
  """
  path = os.path.join(out, "settings.json")
  prev = _read(path)
  if budget is None:
    if prev is None:
      raise UserError(f"{out} holds no reproduction (no settings.json)")
    b = Budget(**{k: tuple(v) if isinstance(v, list) else v for k, v in prev["budget"].items()})
    return Reproduction(out, config.Config.from_json(json.dumps(prev["config"])), b), prev
  budget.check()
  cfg = make_config(budget)
  b = budget.resolved(cfg)
  if prev is not None:  # this invocation's parts join those run before (for the report)
    done = set(prev["budget"].get("parts", ())) | set(b.parts)
    b = dataclasses.replace(b, parts=tuple(p for p in PARTS if p in done))
  settings = dict(budget=json.loads(json.dumps(dataclasses.asdict(b))),
                  config=json.loads(cfg.to_json()))
  if prev is not None:  # a field added since prev was written takes its default
    prev = dict(prev, budget={**json.loads(json.dumps(dataclasses.asdict(Budget()))),
                              **prev["budget"], "parts": settings["budget"]["parts"]},
                config=json.loads(config.Config.from_json(json.dumps(prev["config"])).to_json()))
  if prev is not None and (prev["budget"], prev["config"]) != (settings["budget"],
                                                               settings["config"]):
    diff = sorted(k for k in settings["budget"] if prev["budget"].get(k) != settings["budget"][k])
    raise UserError(f"{out} holds a reproduction with other settings ({', '.join(diff) or 'config'}"
                    " differ); use another --out, or the same flags to continue it")
  settings.update(command=command or (prev or {}).get("command", ""), commit=_commit())
  _save(path, settings)
  checkpoint.save_config(out, cfg)
  return Reproduction(out, cfg, b), settings


def reproduce(out: str, budget: Budget, jobs: int = 1, command: str = "") -> str:
  """Runs every unfinished unit of `budget` in OUT, then writes the report.
  Returns results.md's text.

  Raises:
    UserError: bad budget, another budget already in OUT, OUT in use, a unit failed.
  """
  if jobs < 1:
    raise UserError(f"--jobs must be >= 1, got {jobs}")
  with lock.hold(out, _log):  # one reproduction per folder; workers lock their own workdirs
    rep, settings = open_reproduction(out, budget, command)
    parallel.check_batch_size(rep.cfg.batch_size)
    units = plan(dataclasses.replace(rep.b, parts=budget.parts))  # only this invocation's
    for tag in sorted({u.data for u in units}):  # generate / prepare data once, before workers
      rep.data(tag)
    t0 = time.time()
    run_all(rep, units, jobs)
    text = report(rep, settings)
    _log(f"reproduce: {len(units)} units done ({_fmt_s(time.time() - t0)} this invocation): "
         f"{os.path.join(out, 'results.md')}")
    return text


def add_arguments(p):
  """The reproduce flags (shared by `run.py reproduce` and `python -m
  scr_jax.reproduce`)."""
  d = Budget()
  p.add_argument("--out", required=True)
  p.add_argument("--preset", default=d.preset)
  p.add_argument("--data", default=d.data, help="default data (the beyond rows use "
                 "builtin:VARIANT)")
  p.add_argument("--steps", type=int, help="training steps per run (default: the preset's)")
  p.add_argument("--seeds", type=int, default=d.seeds, help="Table 1 seeds 0..N-1")
  p.add_argument("--table2-seeds", type=int, default=d.table2_seeds)
  p.add_argument("--fig6-seeds", type=int, default=d.fig6_seeds)
  p.add_argument("--beyond-seeds", type=int, default=d.beyond_seeds)
  p.add_argument("--bo-init", type=int, default=d.bo_init)
  p.add_argument("--bo-evals", type=int, default=d.bo_evals)
  p.add_argument("--bo-batch", type=int, default=d.bo_batch)
  p.add_argument("--search-steps", type=int, help="default of --bo-steps and --unroll-steps "
                 "(default steps / 5)")
  p.add_argument("--bo-steps", type=int, help="training steps per BO evaluation")
  p.add_argument("--unroll-steps", type=int, help="outer steps of each unrolled search")
  p.add_argument("--unroll-seeds", type=int, default=d.unroll_seeds,
                 help="seeds 0..N-1 run their own unrolled searches (Eq. 5 / Eq. 6); later "
                 "seeds train with seed 0's M (default 1: searched once, on seed 0)")
  p.add_argument("--fig6-steps", type=int, help="steps of the all-orderings runs (default "
                 "--steps)")
  p.add_argument("--fig6-orders", type=int, default=d.fig6_orders)
  p.add_argument("--table2-orders", default=",".join(d.table2_orders))
  p.add_argument("--variants", default=",".join(d.variants))
  p.add_argument("--parts", default=",".join(d.parts),
                 help=f"which of {', '.join(PARTS)} to run (default all; a later invocation "
                 "may run others in the same --out)")
  p.add_argument("--dose-alphas", default=",".join(f"{x:g}" for x in d.dose_alphas),
                 help="the dose part's structure strengths: M = alpha x the seed's BO ordering")
  p.add_argument("--set", action="append", metavar="KEY=VALUE")
  p.add_argument("--jobs", type=int, default=1, help="units run at once (worker processes)")
  p.add_argument("--report", action="store_true",
                 help="only rewrite results.md / results_readme.md from the finished units")


def budget_from_args(a) -> Budget:
  split = lambda s: tuple(x.strip() for x in s.split(",") if x.strip())

  def floats(s):
    try:
      return tuple(float(x) for x in split(s))
    except ValueError:
      raise UserError(f"--dose-alphas must be numbers separated by commas, got {s!r}") from None
  return Budget(preset=a.preset, data=a.data, steps=a.steps, seeds=a.seeds,
                table2_seeds=a.table2_seeds, fig6_seeds=a.fig6_seeds,
                beyond_seeds=a.beyond_seeds, bo_init=a.bo_init, bo_evals=a.bo_evals,
                bo_batch=a.bo_batch, bo_steps=a.bo_steps or a.search_steps,
                unroll_steps=a.unroll_steps or a.search_steps, unroll_seeds=a.unroll_seeds,
                fig6_steps=a.fig6_steps,
                fig6_orders=a.fig6_orders, table2_orders=split(a.table2_orders),
                variants=split(a.variants), parts=split(a.parts), sets=tuple(a.set or ()),
                dose_alphas=floats(a.dose_alphas))


def from_args(a, command: str = "") -> str:
  """Runs (or, with --report, only reports) what the parsed flags ask for."""
  if a.report:
    rep, settings = open_reproduction(a.out)
    return report(rep, settings)
  return reproduce(a.out, budget_from_args(a), jobs=a.jobs, command=command)


def main(argv=None):
  """`python -m scr_jax.reproduce`: the same flags as `run.py reproduce`, plus
  --worker NAME (one unit of the reproduction in --out; what --jobs starts)."""
  p = cliutil.Parser(prog="python -m scr_jax.reproduce")
  add_arguments(p)
  p.add_argument("--worker", help=argparse.SUPPRESS)
  p.set_defaults(out=None)
  a = p.parse_args(argv)
  try:
    if a.worker:
      rep, _ = open_reproduction(a.out)
      units = {u.name: u for u in plan(rep.b)}
      if a.worker not in units:
        raise UserError(f"no unit {a.worker!r} in {a.out}")
      rep.run_unit(units[a.worker])
      return
    text = from_args(a, "python -m scr_jax.reproduce " + " ".join(argv or sys.argv[1:]))
    if a.report:
      print(text)
  except UserError as e:
    cliutil.fail(e, 2)
  except StopRequested as e:  # the unit's checkpoint is saved; no result is written
    cliutil.log(str(e))
    sys.exit(e.exit_code)


if __name__ == "__main__":
  main()
