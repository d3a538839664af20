"""The driver of `run.py reproduce`: the paper's Table 1, Table 2, Figure 6, Figure 8 and the
qualitative grids, from one command, resumably.

Every unit of work (a search, a training run, an evaluation) writes its result
file when it finishes; a rerun reads finished results back and redoes only the
rest (an interrupted training run itself resumes from its last checkpoint).
Layout of OUT: search/{bo,unroll,unroll-masked}, runs/<method>_s<seed>,
table2/<variant>_<order>, fig6/, results.md, *.png, reproduce.json.
"""
from __future__ import annotations

import csv
import glob
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from scr_jax import (checkpoint, config, dataset, evaluator, lock, model, parallel, render,
                     search, structure, train, train_step, visualize, workdir as workdir_lib)
from scr_jax.evaluator import Evaluator, each_candidate
from scr_jax.errors import UserError

TABLE2_ORDERS = ("DLVA", "DAVL", "DVAL")
# Table 1 rows trained as SCR models: (name, variant, how the structure is chosen).
SCR_ROWS = (
    ("independent SCR", "independent", None),
    ("dense SCR (random ordering)", "dense", "random"),
    ("dense SCR (BO)", "dense", "bo"),
    ("generic SCR (Eq. 5)", "generic", "unroll"),
    ("generic SCR (Eq. 6)", "generic", "unroll-masked"),
    ("dynamic SCR (sigmoid)", "dynamic", "sigmoid"),
    ("dynamic SCR (cosine)", "dynamic", "cosine"),
)


def _log(msg):
  print(msg, file=sys.stderr, flush=True)


def _done(path):
  if os.path.exists(path):
    with open(path, encoding="utf-8-sig") as fh:
      return json.load(fh)
  return None


def _save(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as fh:
    json.dump(obj, fh, indent=1)
  os.replace(tmp, path)


class Reproduction:
  """Holds the data and settings; each method below is one resumable unit."""

  def __init__(self, out, cfg, data_spec, seeds, search_steps, fig6_steps, table2, load):
    self.out, self.cfg, self.seeds = out, cfg, seeds
    self.search_steps, self.fig6_steps = search_steps, fig6_steps
    self.train_data, self.val = load("train"), load("val")
    self.test = load("test")
    self.data_spec = data_spec
    self.cam = model.camera(cfg)

  # -- structures ------------------------------------------------------------
  def structure_for(self, how, seed):
    """(Structure, label) for a Table 1 row."""
    S = structure.Structure
    if how is None:
      return S(m=np.zeros((4, 4), np.float32), variant="independent"), "M = 0"
    if how == "random":
      order = structure.random_order(seed)
      return S(m=structure.dense_matrix(order), variant="dense"), order
    if how in ("sigmoid", "cosine"):
      order = self.bo_order()
      return S(m=structure.dense_matrix(order), q=how, variant="dynamic"), order
    if how == "bo":
      order = self.bo_order()
      return S(m=structure.dense_matrix(order), variant="dense"), order
    m = self.unroll_m(masked=(how == "unroll-masked"))
    return S(m=m, variant="generic"), structure.order_of(m)

  def search_cfg(self):
    return config.override(self.cfg, [f"steps={self.search_steps}", "seed=0"])

  def bo_order(self):
    path = os.path.join(self.out, "search", "bo", "structure.json")
    if not os.path.exists(path):
      _log("== search: dense SCR by Bayesian optimisation")
      search.search_orders(self.search_cfg(), os.path.dirname(path), self.train_data, self.val,
                           method="bo", n_init=4, n_evals=8, batch=2)
    return structure.load_structure(path)["order"]

  def unroll_m(self, masked, order=None):
    order = order or (self.bo_order() if masked else None)
    name = f"unroll-masked_{order}" if masked else "unroll"
    path = os.path.join(self.out, "search", name, "structure.json")
    if not os.path.exists(path):
      _log(f"== search: generic SCR by unrolling ({'Eq. 6, mask ' + order if masked else 'Eq. 5'})")
      search.search_unroll(self.search_cfg(), os.path.dirname(path), self.train_data, self.val,
                           masked_order=order, steps=self.search_steps, unroll_k=1,
                           augmented=not masked, tau=0.1, raise_to_dag=True)
    s = structure.load_structure(path)
    return np.asarray(s["M"], np.float32)

  # -- training + evaluation ---------------------------------------------------
  def run(self, workdir, st, seed, cfg=None):
    """Trains Structure `st` (resumably) and evaluates on the test split;
    returns the summary."""
    res_path = os.path.join(workdir, "test.json")
    done = _done(res_path)
    if done:
      return done
    cfg = config.override(cfg or self.cfg, [f"seed={seed}"])
    _log(f"== train {os.path.relpath(workdir, self.out)} ({cfg.steps} steps)")
    r = train.fit_workdir(cfg, workdir, self.train_data, self.val, st, quiet=True)
    summ, _, _ = Evaluator(r["nets"], r["cfg"]).evaluate(r["state"].params, self.test,
                                                    r["structure"])
    summ.update(steps=r["step"], seconds=r["seconds"])
    _save(res_path, summ)
    _log(f"   test SIDE {summ['side_mean']:.3f}  MAD {summ['mad_mean']:.2f}")
    return summ

  def supervised(self, seed):
    """Upper bound: the depth encoder-decoder regressing ground-truth depth
    (input view) with an L1 loss on the object, same steps and batch."""
    workdir = os.path.join(self.out, "runs", f"supervised_s{seed}")
    res_path = os.path.join(workdir, "test.json")
    if _done(res_path):
      return _done(res_path)
    cfg = self.cfg
    _log(f"== train runs/supervised_s{seed} ({cfg.steps} steps)")
    nets, state = train_step.init_state(cfg, jax.random.PRNGKey(seed))
    far = cfg.max_depth

    def predict(p, img):
      u = nets.apply(p, model.to_model_range(img), method=nets.encode)
      raw = nets.apply(p, u, method=nets.decode)
      return model.depth_from_raw(raw["D"][..., 0], self.cam, cfg.depth_prior,
                                  ellipse=config.prior_ellipse(cfg))

    def l1_on_object(p, batch, structure, step):  # the structure plays no part
      img, gt = batch
      fg = (gt < far - 1e-3).astype(jnp.float32)
      loss = jnp.sum(jnp.abs(predict(p, img) - gt) * fg) / jnp.maximum(jnp.sum(fg), 1.0)
      return loss, dict(loss=loss)

    # The same train step as SCR (optimiser, non-finite rule), another objective.
    step = train_step.make_train_step(nets, cfg, l1_on_object)
    none = structure.Structure(m=jnp.zeros((4, 4), jnp.float32))
    imgs, gts = self.train_data["images"], self.train_data["depth"]
    t0 = time.time()
    for i in range(cfg.steps):
      idx = train.batch_indices(imgs.shape[0], cfg.batch_size, seed, i)
      state, _ = step(state, (jnp.asarray(imgs[idx]), jnp.asarray(gts[idx])), none)
    params = state.params
    pred_fn = jax.jit(predict)
    pred = Evaluator(nets, cfg).map(lambda img: pred_fn(params, img), self.test["images"])
    summ = evaluator.depth_summary(pred, np.ones_like(pred), self.test["depth"], self.cam,
                                   cfg.batch_size)
    summ.update(steps=cfg.steps, seconds=time.time() - t0)
    _save(res_path, summ)
    return summ

  # -- the experiments ---------------------------------------------------------
  def table1(self):
    rows = {}
    base = evaluator.baselines(self.test, self.train_data, self.cfg)
    rows["supervised (GT depth)"] = [self.supervised(s) for s in self.seeds]
    for name, summ in base.items():
      rows[name] = [summ]
    labels = {}
    for name, variant, how in SCR_ROWS:
      per_seed = []
      for s in self.seeds:
        st, label = self.structure_for(how, s)
        key = name.split(" (")[0].replace(" ", "-") + (f"-{how}" if how else "")
        per_seed.append(self.run(os.path.join(self.out, "runs", f"{key}_s{s}"), st, s))
        labels.setdefault(name, set()).add(label)
      rows[name] = per_seed
    return rows, {k: sorted(v) for k, v in labels.items()}

  def table2(self):
    rows = {}
    for order in TABLE2_ORDERS:
      dense = structure.dense_matrix(order)
      S = structure.Structure
      base = os.path.join(self.out, "table2")
      rows[(order, "dense")] = self.run(os.path.join(base, f"dense_{order}"),
                                        S(m=dense, variant="dense"), 0)
      m6 = self.unroll_m(masked=True, order=order)
      rows[(order, "generic (Eq. 6)")] = self.run(os.path.join(base, f"generic6_{order}"),
                                                  S(m=m6, variant="generic"), 0)
      for q in ("sigmoid", "cosine"):
        rows[(order, f"dynamic ({q})")] = self.run(os.path.join(base, f"dynamic-{q}_{order}"),
                                                   S(m=dense, q=q, variant="dynamic"), 0)
    return rows

  def fig6(self):
    """All 24 dense orderings plus independent (M = 0) as a 25th candidate,
    trained together (vmapped) for fig6_steps, evaluated on test."""
    path = os.path.join(self.out, "fig6", "results.json")
    done = _done(path)
    if done:
      return done
    orders = list(structure.ALL_ORDERS) + ["independent"]
    st = structure.candidates(orders)
    cfg = config.override(self.cfg, [f"steps={self.fig6_steps}", "seed=0",
                                     f"eval_every={10 ** 9}"])
    _log(f"== fig6: 24 orderings + independent, vmapped, {cfg.steps} steps")
    r = train.fit_workdir(cfg, os.path.join(self.out, "fig6"), self.train_data, None, st,
                          quiet=True)
    ev = Evaluator(r["nets"], r["cfg"])
    res = {}
    for o, (params_i, st_i) in zip(orders, each_candidate(r["state"].params, st)):
      summ, _, _ = ev.evaluate(params_i, self.test, st_i)
      res[o] = dict(side=summ["side_mean"], mad=summ["mad_mean"])
    _save(path, res)
    return res

  def qualitative(self, workdirs, path, n_images=3, yaws=(-40, 0, 40)):
    """Rows: per variant and image, input | canonical normals | shading at yaws."""
    rows = []
    for name, wd in workdirs.items():
      r = workdir_lib.restore(wd)
      pred = Evaluator(r.nets, r.cfg).factors(r.params, self.test["images"][:n_images],
                                              r.structure)
      for i in range(n_images):
        depth = jnp.asarray(pred["canon_depth"][i])
        shading = render.shade(jnp.asarray(pred["canon_normal"][i]), 0.3, 0.7,
                               jnp.asarray([-0.4, -0.3]))
        shading = jnp.repeat(shading[..., None], 3, -1) * 0.85
        frames = [np.clip(np.asarray(render.render_view(
            depth, shading, jnp.zeros(6).at[1].set(np.deg2rad(yaw)), self.cam)["image"]), 0, 1)
                  for yaw in yaws]
        rows.append([np.asarray(self.test["images"][i]),
                     np.asarray(visualize.normal_to_rgb(pred["canon_normal"][i]))] + frames)
    grid = visualize.grid(rows)
    visualize.save_png(path, grid, 3)
    return path


def _mean_std(xs):
  xs = np.asarray(xs, np.float64)
  return float(xs.mean()), float(xs.std())


def plot_fig6(res, path):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  orders = [o for o in res if o != "independent"]
  fig = Figure(figsize=(12, 4), dpi=100)
  FigureCanvasAgg(fig)
  for k, key in enumerate(("side", "mad")):
    ax = fig.add_subplot(1, 2, k + 1)
    srt = sorted(orders, key=lambda o: res[o][key])
    ax.bar(range(len(srt)), [res[o][key] for o in srt], color="tab:blue")
    ax.axhline(res["independent"][key], c="tab:red", ls="--", label="independent")
    ax.set_xticks(range(len(srt)))
    ax.set_xticklabels(srt, rotation=90, fontsize=7)
    ax.set_ylabel("SIDE x1e-2" if key == "side" else "MAD (deg)")
    lo = min(min(res[o][key] for o in orders), res["independent"][key])
    hi = max(max(res[o][key] for o in orders), res["independent"][key])
    ax.set_ylim(lo - 0.1 * (hi - lo + 1e-6), hi + 0.1 * (hi - lo + 1e-6))
    ax.legend(fontsize=8)
  fig.suptitle("Figure 6: dense SCR, all 24 orderings (sorted), test split")
  fig.tight_layout()
  fig.savefig(path)


def plot_fig8(curves, path):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(11, 4), dpi=100)
  FigureCanvasAgg(fig)
  for k, key in enumerate(("val/side_mean", "val/mad_mean")):
    ax = fig.add_subplot(1, 2, k + 1)
    for name, c in curves.items():
      pts = sorted(c.get(key, {}).items())
      if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("val SIDE x1e-2" if "side" in key else "val MAD (deg)")
    ax.legend(fontsize=8)
  fig.suptitle("Figure 8: validation convergence (seed 0)")
  fig.tight_layout()
  fig.savefig(path)


def read_curves(workdir):
  out = {}
  path = os.path.join(workdir, "metrics.csv")
  if not os.path.exists(path):
    return out
  with open(path) as fh:
    for row in csv.DictReader(fh):
      out.setdefault(row["key"], {})[int(row["step"])] = float(row["value"])
  return out


def reproduce(out, preset="cpu_small", seeds=3, data="builtin", steps=None, search_steps=None,
              fig6_steps=None, sets=(), command=""):
  t0 = time.time()
  if seeds < 1:
    raise UserError(f"--seeds must be >= 1, got {seeds}")
  cfg = config.get_config(preset)
  cfg = config.override(cfg, list(sets) + ([f"steps={steps}"] if steps else []))
  cfg = config.without_missing_vgg(cfg, _log)
  if not any(s.split("=", 1)[0].strip() == "eval_every" for s in sets):
    # Figure 8's curves need validation points along the way, not just at the end.
    cfg = config.override(cfg, [f"eval_every={max(cfg.steps // 10, 1)}"])
  cfg = config.validate(cfg)
  search_steps = search_steps or max(cfg.steps // 5, 1)
  fig6_steps = fig6_steps or cfg.steps
  parallel.check_batch_size(cfg.batch_size)
  with lock.hold(out, _log):  # one job per output folder
    settings = dict(preset=preset, seeds=seeds, data=data, steps=cfg.steps,
                    search_steps=search_steps, fig6_steps=fig6_steps, sets=list(sets))
    prev = _done(os.path.join(out, "settings.json"))
    if prev and prev != settings:
      raise UserError(f"{out} holds a reproduction with other settings ({prev}); "
                      "use another --out")
    _save(os.path.join(out, "settings.json"), settings)
    checkpoint.save_config(out, cfg)
    rep = Reproduction(out, cfg, data, list(range(seeds)), search_steps, fig6_steps, True,
                       lambda split: dataset.load_split(data, split, cfg))
    t1, labels = rep.table1()
    t2 = rep.table2()
    f6 = rep.fig6()
    plot_fig6(f6, os.path.join(out, "fig6.png"))
    fig8_runs = {"independent": "independent-SCR_s0", "dense (BO)": "dense-SCR-bo_s0",
                 "generic (Eq. 6)": "generic-SCR-unroll-masked_s0",
                 "dynamic (sigmoid)": "dynamic-SCR-sigmoid_s0"}
    plot_fig8({k: read_curves(os.path.join(out, "runs", v)) for k, v in fig8_runs.items()},
              os.path.join(out, "fig8.png"))
    qual = {}
    for name, variant, how in SCR_ROWS:
      key = name.split(" (")[0].replace(" ", "-") + (f"-{how}" if how else "")
      qual[name] = os.path.join(out, "runs", f"{key}_s0")
    rep.qualitative(qual, os.path.join(out, "qualitative.png"))
    wall = time.time() - t0
    summary = write_results(out, cfg, settings, t1, labels, t2, f6, wall, command)
    _save(os.path.join(out, "reproduce.json"), summary)
    _log(f"reproduce done in {wall:.0f}s (this invocation): {os.path.join(out, 'results.md')}")
    return summary


# Two-sided 95% critical values of Student's t for 1..10 degrees of freedom.
_T95 = (12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23)


def _paired_t_sentence(per_ind, per_best):
  """Paired t-test over seeds of independent minus best MAD, as one sentence."""
  d = np.asarray(per_ind, float) - np.asarray(per_best, float)
  if len(d) < 2:
    return "One seed: no significance test."
  sd = float(np.std(d, ddof=1))
  t = float(np.mean(d)) / (sd / np.sqrt(len(d))) if sd > 0 else float("inf")
  crit = _T95[min(len(d) - 1, len(_T95)) - 1]
  return (f"Paired t-test over the {len(d)} seeds: t = {t:.2f} against {crit:.2f} at 95% "
          f"({'significant' if abs(t) > crit else 'not significant'}).")


def write_results(out, cfg, settings, t1, labels, t2, f6, wall, command):
  lines = ["# Reproduction of SCR (Liu et al., ECCV 2022) with scr-jax", "",
           f"Command: `{command}`", "",
           f"Settings: {json.dumps(settings)}; wall time of the last invocation {wall:.0f} s "
           "(finished units of an earlier invocation are read back, not recomputed).", "",
           "Config (`config.json` in this folder):", "", "```json", cfg.to_json(), "```", "",
           "## Table 1: depth reconstruction on the test split", "",
           "SIDE (x1e-2) and MAD (degrees): mean ± std over test images (of seed 0), and the "
           "mean ± std over seeds of the per-seed means.", "",
           "| method | structure | SIDE (seed 0) | MAD (seed 0) | SIDE over seeds | MAD over seeds |",
           "|---|---|---|---|---|---|"]
  summary = dict(table1={}, table2={}, fig6=f6)
  for name, per in t1.items():
    s0 = per[0]
    sm, ss = _mean_std([p["side_mean"] for p in per])
    mm, ms = _mean_std([p["mad_mean"] for p in per])
    lab = ", ".join(labels.get(name, ["-"]))
    lines.append(f"| {name} | {lab} | {s0['side_mean']:.3f} ± {s0['side_std']:.3f} | "
                 f"{s0['mad_mean']:.2f} ± {s0['mad_std']:.2f} | {sm:.3f} ± {ss:.3f} | "
                 f"{mm:.2f} ± {ms:.2f} |")
    summary["table1"][name] = dict(side=sm, side_sd=ss, mad=mm, mad_sd=ms,
                                   mad_per_seed=[p["mad_mean"] for p in per])
  lines += ["", "## Table 2: MAD (degrees) per ordering, seed 0", "",
            "| ordering | dense | generic (Eq. 6) | dynamic (sigmoid) | dynamic (cosine) |",
            "|---|---|---|---|---|"]
  for order in TABLE2_ORDERS:
    vals = [t2[(order, v)]["mad_mean"] for v in
            ("dense", "generic (Eq. 6)", "dynamic (sigmoid)", "dynamic (cosine)")]
    lines.append(f"| {order} | " + " | ".join(f"{v:.2f}" for v in vals) + " |")
    summary["table2"][order] = vals
  ind = f6["independent"]
  srt = sorted((o for o in f6 if o != "independent"), key=lambda o: f6[o]["mad"])
  lines += ["", "## Figure 6: all 24 dense orderings", "", "![fig6](fig6.png)", "",
            f"Trained together (vmapped) for {settings['fig6_steps']} steps with independent "
            f"(M = 0) as a 25th candidate. Best MAD {srt[0]} {f6[srt[0]]['mad']:.2f}, worst "
            f"{srt[-1]} {f6[srt[-1]]['mad']:.2f}, independent {ind['mad']:.2f}; "
            f"{sum(f6[o]['mad'] < ind['mad'] for o in srt)} of 24 orderings below independent.",
            "", "## Figure 8: validation convergence", "", "![fig8](fig8.png)", "",
            "## Qualitative", "",
            "Rows: variants of Table 1 (seed 0) in table order, 3 test images each; columns: "
            "input, canonical normal map, textureless shading at yaw -40, 0, +40 degrees.", "",
            "![qualitative](qualitative.png)", "", "## Comparison with the paper", ""]
  ind_m = summary["table1"]["independent SCR"]["mad"]
  scr = {k: v for k, v in summary["table1"].items()
         if "SCR" in k and k != "independent SCR"}
  best = min(scr, key=lambda k: scr[k]["mad"])
  gain = 100 * (ind_m - scr[best]["mad"]) / ind_m
  per_ind = summary["table1"]["independent SCR"]["mad_per_seed"]
  per_best = scr[best]["mad_per_seed"]
  wins = sum(b < i for b, i in zip(per_best, per_ind))
  lines.append(
      f"The paper (BFM, its Table 1) reports independent SCR at MAD 17.36, every learned "
      f"structure lower (best: generic Eq. 6, 14.79, 15% lower; dense BO 14.88) and a random "
      f"dense ordering worse (17.66). Here the best SCR variant is **{best}**, MAD {scr[best]['mad']:.2f} "
      f"vs independent {ind_m:.2f} ({abs(gain):.1f}% {'lower' if gain >= 0 else 'higher'}), "
      f"better on {wins} of {len(per_ind)} seeds. The issue's goal (>= 10% lower MAD than "
      f"independent across seeds) is {'met' if gain >= 10 and wins == len(per_ind) else 'NOT met'} "
      f"by this run. {_paired_t_sentence(per_ind, per_best)} Chosen on the test split after the "
      "fact, this best-of-six comparison is optimistic even where the test says significant.")
  summary.update(best_variant=best, best_gain_percent=gain, seeds_better=wins)
  with open(os.path.join(out, "results.md"), "w") as fh:
    fh.write("\n".join(lines) + "\n")
  return summary


def partial_report(out, with_baselines: bool = True):
  """Table 1 from the runs finished so far (for a reproduction still running or
  interrupted): writes OUT/results_partial.md and returns its text."""
  settings = _done(os.path.join(out, "settings.json"))
  if settings is None:
    raise UserError(f"{out} holds no reproduction (no settings.json)")
  rows = {}
  for path in sorted(glob.glob(os.path.join(out, "runs", "*_s*", "test.json"))):
    name = os.path.basename(os.path.dirname(path)).rsplit("_s", 1)[0]
    rows.setdefault(name, []).append(_done(path))
  lines = ["# Partial reproduction (finished runs only)", "",
           f"Settings: {json.dumps(settings)}", "",
           "| run | seeds done | SIDE x1e-2 over seeds | MAD deg over seeds | MAD per seed |",
           "|---|---|---|---|---|"]
  for name, per in rows.items():
    sm, ss = _mean_std([p["side_mean"] for p in per])
    mm, ms = _mean_std([p["mad_mean"] for p in per])
    lines.append(f"| {name} | {len(per)} | {sm:.3f} ± {ss:.3f} | {mm:.2f} ± {ms:.2f} | "
                 + ", ".join(f"{p['mad_mean']:.2f}" for p in per) + " |")
  if with_baselines:  # the reference predictions (+ template), same test split
    cfg = checkpoint.load_config(out)
    test = dataset.load_split(settings["data"], "test", cfg)
    trn = dataset.load_split(settings["data"], "train", cfg)
    for name, b in evaluator.baselines(test, trn, cfg).items():
      lines.append(f"| {name} | - | {b['side_mean']:.3f} ± {b['side_std']:.3f} (images) | "
                   f"{b['mad_mean']:.2f} ± {b['mad_std']:.2f} (images) | - |")
  done_t2 = sorted(os.path.basename(os.path.dirname(p))
                   for p in glob.glob(os.path.join(out, "table2", "*", "test.json")))
  lines += ["", f"Table 2 runs finished: {', '.join(done_t2) or 'none'}; Figure 6: "
            f"{'done' if os.path.exists(os.path.join(out, 'fig6', 'results.json')) else 'not yet'}."]
  text = "\n".join(lines) + "\n"
  with open(os.path.join(out, "results_partial.md"), "w") as fh:
    fh.write(text)
  return text
