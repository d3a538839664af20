"""reproduce: the unit plan, the report's statistics on planted numbers, and the
whole reproduction at a tiny budget (resumable, --jobs, --report)."""
import dataclasses
import json
import os
import sys

import numpy as np
import pytest

from scr_jax import config, model, reproduce, search, stats, structure, synthetic, train
from scr_jax.errors import UserError

TINY = dict(preset="test_tiny", steps=2, seeds=2, table2_seeds=2, fig6_seeds=2, beyond_seeds=2,
            bo_init=2, bo_evals=2, bo_batch=2, bo_steps=1, unroll_steps=1, fig6_orders=2,
            table2_orders=("DLVA",))


def _budget(data, **kw):
  return reproduce.Budget(**dict(TINY, data=data, **kw))


def test_supervised_loss_on_planted_depths():
  """The supervised upper bound's objective: zero for the truth, the depth L1
  alone for a fronto-parallel shift (same normals), a normal term for a tilt,
  and the background (gt at the far plane) plays no part."""
  cfg = config.get_config("test_tiny")
  cam = model.camera(cfg)
  s, far = cfg.image_size, cfg.max_depth
  gt = np.full((2, s, s), far, np.float32)
  gt[:, 4:-4, 4:-4] = 1.0  # a fronto-parallel square object
  obj = gt < far - 1e-3
  loss = lambda pred: {k: float(v) for k, v in
                       reproduce.supervised_loss(pred, gt, cam, far, 0.5)[1].items()}
  assert loss(gt) == dict(loss=0.0, depth_l1=0.0, normal=0.0)
  noisy_bg = np.where(obj, gt, np.random.default_rng(0).uniform(0.9, 1.1, gt.shape))
  assert loss(noisy_bg.astype(np.float32))["loss"] == 0.0
  shifted = np.where(obj, gt + 0.02, gt).astype(np.float32)
  r = loss(shifted)
  assert r["depth_l1"] == pytest.approx(0.02, rel=1e-5) and r["normal"] < 1e-6
  cols = np.arange(s, dtype=np.float32)[None, None, :]
  tilted = np.where(obj, gt + 0.004 * (cols - s / 2), gt).astype(np.float32)
  r = loss(tilted)
  assert r["depth_l1"] == pytest.approx(np.abs(0.004 * (cols - s / 2) * obj).sum() / obj.sum(),
                                        rel=1e-5)
  assert r["normal"] > 1e-3 and r["loss"] == pytest.approx(r["depth_l1"] + 0.5 * r["normal"])


def test_plan_orders_dependencies_and_names():
  cfg = config.override(config.get_config("test_tiny"), ["steps=10"])
  b = reproduce.Budget(preset="test_tiny").resolved(cfg)
  units = reproduce.plan(b)
  names = [u.name for u in units]
  assert len(names) == len(set(names))
  pos = {n: i for i, n in enumerate(names)}
  for u in units:
    assert all(pos[d] < pos[u.name] for d in u.deps), u
  # every Table 1 row per seed; BO searched per seed, the unrolled searches once
  # (seed 0) by default: every seed's Eq. 5 / Eq. 6 run waits for seed 0's search
  for s in range(5):
    for key in list(reproduce.SCR_ROWS) + ["supervised"]:
      assert f"t1.{key}.s{s}" in pos
    assert units[pos[f"t1.dense-bo.s{s}"]].deps == (f"search.default.bo.s{s}",)
    assert units[pos[f"t1.generic-eq5.s{s}"]].deps == ("search.default.eq5.s0",)
    assert units[pos[f"t1.generic-eq6.s{s}"]].deps == ("search.default.eq6.s0",)
    assert units[pos[f"t2.generic-eq6-DLVA.s{min(s, 2)}"]].deps == (
        "search.default.eq6-DLVA.s0",)
  assert not [n for n in names if n.startswith("search.") and ".eq" in n and not
              n.endswith(".s0")]
  assert "search.default.bo.s0" in units[pos["search.default.eq6.s0"]].deps
  # Table 1 and the harder variants come before Table 2 and Figure 6
  assert max(pos[n] for n in names if n.startswith("bey.")) < min(
      pos[n] for n in names if n.startswith(("t2.", "fig6.")))
  # --unroll-seeds 5: every seed searches its own, Eq. 6 masked by that seed's BO ordering
  per = {u.name: u for u in reproduce.plan(dataclasses.replace(b, unroll_seeds=5))}
  for s in range(5):
    assert per[f"t1.generic-eq5.s{s}"].deps == (f"search.default.eq5.s{s}",)
    assert per[f"search.default.eq6.s{s}"].deps == (f"search.default.bo.s{s}",)
  assert len(per) == len(units) + 4 * 2 + 2 * 3  # eq5 / eq6 of seeds 1-4, Table 2's of 1-2
  with pytest.raises(UserError, match="--unroll-seeds"):
    reproduce.Budget(unroll_seeds=0).check()
  assert sum(n.startswith("fig6.") for n in names) == 3
  assert sum(n.startswith("t2.") for n in names) == 3 * 3 * 4
  assert sum(n.startswith("bey.") for n in names) == 2 * 2 * 5
  assert b.bo_steps == 2 and b.unroll_steps == 2 and b.fig6_steps == 10
  with pytest.raises(UserError, match="--bo-evals"):
    reproduce.Budget(bo_init=4, bo_evals=3).check()
  with pytest.raises(UserError, match="--variants"):
    reproduce.Budget(variants=("nosuch",)).check()


def test_dense_random_orderings_differ_between_seeds():
  orders = [reproduce.distinct_random_order(s) for s in range(24)]
  assert sorted(orders) == sorted(reproduce.structure.ALL_ORDERS)  # 24 seeds: each once
  # seeds whose first draws already differ keep train --order random's ordering
  assert orders[:2] == [reproduce.structure.random_order(s) for s in range(2)]
  assert reproduce.structure.random_order(2) == orders[0]  # the clash this avoids
  assert orders[2] != orders[0]


def _planted(rep, per_row, base_avg=20.0):
  """Writes planted Table 1 results: per_row {key: [test MAD per seed]}."""
  for key, mads in per_row.items():
    for s, v in enumerate(mads):
      kind = "supervised" if key == "supervised" else "train"
      res = dict(unit=f"t1.{key}.s{s}", kind=kind, seed=s, row=key, data="default",
                 test=dict(mad_mean=v, side_mean=v / 10, mad_std=1.0, side_std=0.1, n=8),
                 val=dict(mad_mean=v + 0.5, side_mean=0.0, n=8), label=f"L{s}",
                 init_hash=f"init{s}", batch_hash=f"batch{s}", curves={}, seconds=1.0,
                 resolved_row=key)
      reproduce._save(rep.result_path(f"t1.{key}.s{s}"), res)
  reproduce._save(rep.result_path("baselines.default"), dict(
      kind="baselines", seed=0, rows={"average GT depth": dict(
          mad_mean=base_avg, mad_std=1.0, side_mean=1.0, side_std=0.1, n=8)}))


def test_report_statistics_on_planted_numbers(tmp_path):
  cfg = config.override(config.get_config("test_tiny"), ["steps=2"])
  b = reproduce.Budget(preset="test_tiny", parts=("table1",)).resolved(cfg)
  rep = reproduce.Reproduction(str(tmp_path), cfg, b)
  ind = [10.0, 10.4, 9.6, 10.2, 9.8]
  noise = [0.05, -0.03, 0.02, -0.04, 0.0]
  per_row = {k: [i + 0.3 * ((-1) ** j) for j, i in enumerate(ind)] for k in reproduce.SCR_ROWS}
  per_row["independent"] = ind
  per_row["generic-eq6"] = [i - 2.0 + n for i, n in zip(ind, noise)]  # clearly better
  per_row["dense-random"] = [i + 1.0 + n for i, n in zip(ind, noise)]  # clearly worse
  per_row["supervised"] = [3.0] * 5
  _planted(rep, per_row)
  one = reproduce._read(rep.result_path("t1.independent.s0"))  # a unit that records its commit
  reproduce._save(rep.result_path("t1.independent.s0"),
                  dict(one, commit="f" * 40 + " (with uncommitted changes)"))
  text = reproduce.report(rep, dict(command="cmd --planted", commit="abc"))
  n_units = len(reproduce.collect(rep))
  assert (f"`not recorded` ({n_units - 1} units), `ffffffffff (with uncommitted changes)` "
          "(1 unit)") in text
  # the Holm family: the 7 SCR rows, each against independent on the 5 seeds
  keys = [k for k in reproduce.SCR_ROWS if k != "independent"]
  want = stats.holm_intervals([(per_row[k], ind) for k in keys])
  for k, w in zip(keys, want):
    rows = [x for x in text.splitlines()
            if x.startswith("| " + reproduce.SCR_ROWS[k][0] + " | 5 |")]
    assert len(rows) == 1, k
    assert f"[{w['holm_lo']:+.2f}, {w['holm_hi']:+.2f}]" in rows[0]
    assert f"{w['p_holm']:.3g}" in rows[0]
    assert ("**better**" in rows[0]) == (w["holm_hi"] < 0)
    assert ("worse" in rows[0]) == (w["holm_lo"] > 0)
  eq6 = [x for x in text.splitlines() if x.startswith("| " + reproduce.SCR_ROWS["generic-eq6"][0]
                                                      + " | 5 |")][0]
  assert "**better**" in eq6 and "-2.00 (-20.0 %)" in eq6
  rnd = [x for x in text.splitlines() if x.startswith("| " + reproduce.SCR_ROWS["dense-random"][0]
                                                      + " | 5 |")][0]
  assert "worse" in rnd
  # mean +- std (ddof 1) and the per-seed values of independent
  m, s = stats.mean_std(ind)
  assert f"{m:.2f} ± {s:.2f} | 10.00, 10.40, 9.60, 10.20, 9.80 |" in text
  # the val-chosen row (lowest val MAD: Eq. 6) meets the 10 % goal; independent / avg-GT ~0.5
  assert "**generic, Eq. 6" in text and "**met**" in text
  assert "0.55 x average-GT on every seed): met" in text
  assert "seed 0: 9 units, init init0, batch order batch0: paired" in text
  readme = open(tmp_path / "results_readme.md").read()
  assert readme.startswith("## Results") and "cmd --planted" in readme and "**better**" in readme


def test_report_per_factor_differences_on_planted_diagnostics(tmp_path):
  cfg = config.override(config.get_config("test_tiny"), ["steps=2"])
  b = reproduce.Budget(preset="test_tiny", parts=("table1",)).resolved(cfg)
  rep = reproduce.Reproduction(str(tmp_path), cfg, b)
  ind = [10.0, 10.4, 9.6, 10.2, 9.8]
  _planted(rep, {**{k: ind for k in reproduce.SCR_ROWS}, "supervised": [3.0] * 5})
  view_ind, view_eq6 = [4.0, 5.0, 3.0, 6.0, 4.5], [2.1, 2.9, 1.0, 4.2, 2.5]
  for key in reproduce.SCR_ROWS:
    for s in range(5):
      path = rep.result_path(f"t1.{key}.s{s}")
      r = reproduce._read(path)
      view = view_eq6[s] if key == "generic-eq6" else view_ind[s]
      diag = dict(view_mae_deg=view, light_dir_deg=7.0, shape_spread_ratio=0.5,
                  shape_corr=float("nan") if key == "dense-bo" else 0.1)
      if key == "dynamic-cosine" and s > 0:
        diag = {}  # one seed only: too few to pair
      reproduce._save(path, dict(r, diag=diag))
  text = reproduce.report(rep, dict(command="cmd", commit="abc"))
  section = text.split("### Per factor, paired against independent")[1].split("\n#")[0]
  rows = {x.split(" | ")[0][2:]: x for x in section.splitlines() if x.startswith("| ")}
  d = stats.paired_difference(view_eq6, view_ind)
  eq6 = rows[reproduce.SCR_ROWS["generic-eq6"][0]]
  assert eq6.split(" | ")[1] == f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]"
  assert d["hi"] < 0  # the planted shift is seen as lower view error
  assert eq6.split(" | ")[2] == "+0.00 [+0.00, +0.00]"  # equal light error on every seed
  assert rows[reproduce.SCR_ROWS["dense-bo"][0]].rstrip(" |").endswith("n/a")  # NaN diag
  assert rows[reproduce.SCR_ROWS["dynamic-cosine"][0]].count("n/a") == 4


def test_report_convergence_differences_on_planted_curves(tmp_path):
  cfg = config.override(config.get_config("test_tiny"), ["steps=2"])
  b = reproduce.Budget(preset="test_tiny", parts=("table1",)).resolved(cfg)
  rep = reproduce.Reproduction(str(tmp_path), cfg, b)
  _planted(rep, {**{k: [10.0, 10.4, 9.6] for k in reproduce.SCR_ROWS}, "supervised": [3.0] * 3})
  ind = {200: [20.0, 22.0, 21.0], 400: [10.0, 10.5, 9.5]}
  # dynamic cosine: ahead by 3-5 degrees at step 200 on every seed, level at 400
  cos = {200: [16.0, 18.5, 16.0], 400: [10.0, 10.5, 9.5]}
  for key in reproduce.SCR_ROWS:
    for s in range(3):
      path = rep.result_path(f"t1.{key}.s{s}")
      c = cos if key == "dynamic-cosine" else ind
      curve = {str(k): v[s] for k, v in c.items()}
      if key == "dense-bo" and s > 0:
        curve = {}  # one seed with a curve: too few to pair
      reproduce._save(path, dict(reproduce._read(path), curves={"val/mad_mean": curve}))
  text = reproduce.report(rep, dict(command="cmd", commit="abc"))
  section = text.split("### Convergence: validation MAD during training")[1].split("\n#")[0]
  rows = {x.split(" | ")[0][2:]: x.rstrip(" |").split(" | ")[1:]
          for x in section.splitlines() if x.startswith("| ") and not x.startswith("| row")}
  assert rows["independent (val MAD)"] == ["21.00", "10.00"]
  d = stats.paired_difference(cos[200], ind[200])
  assert d["hi"] < 0  # the planted lead is seen
  assert rows[reproduce.SCR_ROWS["dynamic-cosine"][0]] == [f"{d['mean']:+.2f}*", "+0.00"]
  assert rows[reproduce.SCR_ROWS["dense-bo"][0]] == ["n/a", "n/a"]
  assert rows[reproduce.SCR_ROWS["generic-eq5"][0]] == ["+0.00", "+0.00"]


def test_report_objective_agreement_of_bo_searches(tmp_path):
  cfg = config.override(config.get_config("test_tiny"), ["steps=2"])
  b = reproduce.Budget(preset="test_tiny", parts=("table1",)).resolved(cfg)
  rep = reproduce.Reproduction(str(tmp_path), cfg, b)
  _planted(rep, {k: [10.0, 10.4] for k in reproduce.SCR_ROWS})
  loss = dict(DVLA=-2.5, DALV=-2.3, LADV=-2.4, LDVA=-2.6)
  mad = dict(DVLA=14.0, DALV=19.0, LADV=12.0, LDVA=13.0)  # ranks 3,4,1,2 against 2,4,3,1
  scores = {o: dict(val_loss=loss[o], val_mad=mad[o]) for o in loss}
  unit = dict(kind="search", seed=0, order="LDVA", objective="val_loss", best_objective=-2.6,
              evaluated=loss, seconds=1.0)
  reproduce._save(rep.result_path("search.default.bo.s0"), dict(unit, scores=scores))
  # a unit written before units kept their scores: read from the search's trace
  reproduce._save(rep.result_path("search.default.bo.s1"), dict(unit, seed=1))
  os.makedirs(tmp_path / "search" / "search.default.bo.s1")
  reproduce._save(str(tmp_path / "search" / "search.default.bo.s1" / "bo_trace.json"),
                  dict(scores={o: dict(val_loss=mad[o], val_mad=mad[o]) for o in mad}))
  text = reproduce.report(rep, dict(command="cmd", commit="abc"))
  rho = stats.spearman([loss[o] for o in loss], [mad[o] for o in loss])
  assert rho == pytest.approx(0.4)
  assert (f"- search.default.bo.s0: over its 4 evaluated orderings, Spearman(val photometric "
          f"loss, val MAD) = {rho:+.2f}; lowest val MAD among them LADV (12.00)") in text
  assert "- search.default.bo.s1: over its 4 evaluated orderings, Spearman(val photometric " \
         "loss, val MAD) = +1.00" in text


@pytest.fixture(scope="module")
def variant_folder(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("wide_pose"))
  synthetic.export_synface(root, n_train=24, n_val=8, n_test=8, size=16, seed=5, verbose=False,
                           cfg=synthetic.get_variant("wide_pose").gen)
  return root


def _argv(out, data, variant, *extra):
  return ["reproduce", "--preset", "test_tiny", "--out", out, "--data", data, "--steps", "2",
          "--seeds", "2", "--table2-seeds", "2", "--fig6-seeds", "2", "--beyond-seeds", "2",
          "--bo-init", "2", "--bo-evals", "2", "--bo-batch", "2", "--search-steps", "1",
          "--fig6-orders", "2", "--table2-orders", "DLVA", "--variants",
          f"wide_pose={variant}", *extra]


@pytest.mark.slow  # 44 units, 10-20 minutes on 2 cores: python -m pytest -m slow tests/test_reproduce.py
def test_reproduce_tiny_end_to_end(tmp_path, tiny_synface, variant_folder, monkeypatch, capfd):
  from experiments import run
  out = str(tmp_path / "rep")
  run.main(_argv(out, tiny_synface, variant_folder))
  units = reproduce.plan(_budget(tiny_synface, variants=(f"wide_pose={variant_folder}",))
                         .resolved(config.override(config.get_config("test_tiny"), ["steps=2"])))
  res = {u.name: json.load(open(os.path.join(out, "units", u.name + ".json"))) for u in units}
  # paired: every training unit of a seed has the same init and batch order, and the seeds differ
  for s in (0, 1):
    same = [r for n, r in res.items() if n.startswith("t1.") and r["seed"] == s]
    assert len(same) == 9
    assert len({r["init_hash"] for r in same}) == 1 and len({r["batch_hash"] for r in same}) == 1
  assert res["t1.independent.s0"]["init_hash"] != res["t1.independent.s1"]["init_hash"]
  # each row's structure: random ordering per seed, BO from that seed's search, Eq. 5 / 6
  # from seed 0's (masked by seed 0's BO ordering)
  assert res["search.default.eq6.s0"]["mask_order"] == res["search.default.bo.s0"]["order"]
  for s in (0, 1):
    bo = res[f"search.default.bo.s{s}"]["order"]
    st = res[f"t1.dense-bo.s{s}"]["structure"]
    assert np.allclose(st["M"], reproduce.structure.dense_matrix(bo))
    assert res[f"t1.dynamic-cosine.s{s}"]["structure"]["q"] == "cosine"
    for k in ("eq5", "eq6"):
      assert np.allclose(res[f"t1.generic-{k}.s{s}"]["structure"]["M"],
                         res[f"search.default.{k}.s0"]["M"])
    assert res[f"search.default.bo-oracle.s{s}"]["objective"] == "val_mad"
    assert res[f"t1.dense-random.s{s}"]["label"] == reproduce.distinct_random_order(s)
  assert res["t1.supervised.s0"]["steps"] == 2 and np.isfinite(res["t1.supervised.s0"]["test"]
                                                                ["mad_mean"])
  assert set(res["fig6.s0"]["orders"]) == set(reproduce.structure.ALL_ORDERS[:2])
  assert res["bey.wide_pose.best.s0"]["resolved_row"] in reproduce.SCR_ROWS
  assert res["t1.independent.s0"]["curves"]["val/mad_mean"]  # Figure 8's points
  for s in (0, 1):  # the dose part: a fraction of the seed's BO ordering, paired with Table 1
    bo = res[f"search.default.bo.s{s}"]["order"]
    for a in reproduce.DOSE_ALPHAS:
      r = res[reproduce.dose_name(a, s)]
      assert np.allclose(r["structure"]["M"], a * reproduce.structure.dense_matrix(bo))
      assert r["init_hash"] == res[f"t1.independent.s{s}"]["init_hash"]
    bo_unit = res[f"search.default.bo.s{s}"]
    assert set(bo_unit["scores"]) == set(bo_unit["evaluated"])  # every evaluation's metrics
  text = open(os.path.join(out, "results.md")).read()
  for needle in ("## Table 1", "Holm interval", "### Pairing check", "## Table 2",
                 "Spearman rank correlation", "## Figure 8", "## Beyond the default data",
                 "steps per evaluation", "seed 1: 9 units", "Commit of the last invocation: `",
                 "run.py reproduce", "## Item 7: the structure's strength (dose)"):
    assert needle in text, needle
  assert "NOT PAIRED" not in text
  assert "not recorded" not in text  # every unit records the commit it was computed at
  assert os.path.getsize(os.path.join(out, "fig6.png")) > 0
  assert os.path.getsize(os.path.join(out, "fig8.png")) > 0
  # a second invocation trains and searches nothing (finished units are read back)
  stamps = {n: os.path.getmtime(os.path.join(out, "units", n + ".json")) for n in res}

  def refuse(*a, **k):
    raise AssertionError("a finished reproduction trained again")
  for mod, name in ((train, "fit"), (search, "search_orders"), (search, "search_unroll")):
    monkeypatch.setattr(mod, name, refuse)
  err = capfd.readouterr().err
  assert f"[reproduce] {len(units)}/{len(units)} units done" in err and "ETA" in err
  run.main(_argv(out, tiny_synface, variant_folder))
  assert "[reproduce] start" not in capfd.readouterr().err  # no unit started
  assert stamps == {n: os.path.getmtime(os.path.join(out, "units", n + ".json")) for n in res}
  # --report rewrites the report without training; another budget in the same folder is refused
  os.remove(os.path.join(out, "results.md"))
  run.main(["reproduce", "--out", out, "--report"])
  assert "## Table 1" in capfd.readouterr().out
  assert os.path.exists(os.path.join(out, "results.md"))
  monkeypatch.undo()
  stderr = sys.stderr
  try:
    with pytest.raises(SystemExit):
      run.main(_argv(out, tiny_synface, variant_folder, "--bo-evals", "3"))
  finally:
    sys.stderr = stderr  # cliutil.fail silences stderr after its one line
  assert "other settings (bo_evals differ)" in capfd.readouterr().err
  # --jobs 2: two removed units are rerun by worker processes (their runs resume as trained)
  for n in ("t1.independent.s1", "baselines.default"):
    os.remove(os.path.join(out, "units", n + ".json"))
  run.main(_argv(out, tiny_synface, variant_folder, "--jobs", "2"))
  again = json.load(open(os.path.join(out, "units", "t1.independent.s1.json")))
  # the worker re-evaluates the finished run (no training step); pinned to one core, XLA
  # sums in another order, so the figures agree to float32 rounding, not bit for bit
  assert again["steps"] == res["t1.independent.s1"]["steps"]
  assert again["test"] == pytest.approx(res["t1.independent.s1"]["test"], rel=1e-5)
  assert again["test"] != pytest.approx(res["t1.independent.s0"]["test"], rel=1e-5)
  assert os.path.exists(os.path.join(out, "logs", "t1.independent.s1.log"))


def test_report_all_parts_on_planted_numbers(tmp_path):
  """Table 2, Figure 6 (Spearman between seeds), beyond rows (Holm over the
  variants) from planted unit results."""
  cfg = config.override(config.get_config("test_tiny"), ["steps=2"])
  b = reproduce.Budget(preset="test_tiny", seeds=5, table2_seeds=2, fig6_seeds=2,
                       beyond_seeds=5, fig6_orders=5, table2_orders=("DLVA",),
                       variants=("wide_pose", "albedo_alt")).resolved(cfg)
  rep = reproduce.Reproduction(str(tmp_path), cfg, b)
  ind = [10.0, 10.4, 9.6, 10.2, 9.8]
  per_row = {k: [i + 0.3 * ((-1) ** j) for j, i in enumerate(ind)] for k in reproduce.SCR_ROWS}
  per_row.update(independent=ind, supervised=[3.0] * 5)
  per_row["dense-bo"] = [i - 1.0 for i in ind]  # lowest val MAD: the row carried beyond
  _planted(rep, per_row)
  for s in range(2):
    for c, v in (("dense", 11.0), ("generic-eq6", 12.0), ("dynamic-sigmoid", 13.0),
                 ("dynamic-cosine", 14.0)):
      reproduce._save(rep.result_path(f"t2.{c}-DLVA.s{s}"), dict(
          kind="train", seed=s, test=dict(mad_mean=v + s, side_mean=1.0, n=8)))
  orders = reproduce.structure.ALL_ORDERS[:5]
  mads = {0: [1, 2, 3, 4, 5], 1: [2, 1, 4, 3, 5]}  # rho = 0.8 (1 - 6 * 4 / 120)
  for s in range(2):
    reproduce._save(rep.result_path(f"fig6.s{s}"), dict(kind="fig6", seed=s, orders={
        o: dict(test_mad=float(m), test_side=1.0, val_mad=1.0, val_loss=float(m))
        for o, m in zip(orders, mads[s])}))
  shift = dict(wide_pose=-1.5, albedo_alt=0.1)
  for v in shift:
    for s in range(5):
      for row, val in (("independent", ind[s]), ("best", ind[s] + shift[v] + 0.02 * s)):
        reproduce._save(rep.result_path(f"bey.{v}.{row}.s{s}"), dict(
            kind="train", seed=s, data=v, resolved_row="dense-bo" if row == "best" else row,
            test=dict(mad_mean=val, side_mean=1.0, n=8)))
  text = reproduce.report(rep, dict(command="c", commit="x"))
  assert "| DLVA | 11.50 ± 0.71 | 12.50 ± 0.71 | 13.50 ± 0.71 | 14.50 ± 0.71 |" in text
  assert "test MAD, seeds 0 and 1: +0.80" in text
  assert f"seed 0: best test MAD {orders[0]} 1.00" in text
  assert os.path.getsize(tmp_path / "fig6.png") > 0
  fam = stats.holm_intervals([([ind[s] + shift[v] + 0.02 * s for s in range(5)], ind)
                              for v in shift])
  for v, w in zip(shift, fam):
    row = [x for x in text.splitlines() if x.startswith(f"| {v}: best SCR row | 5 |")][0]
    assert f"[{w['holm_lo']:+.2f}, {w['holm_hi']:+.2f}]" in row
    assert ("**better**" in row) == (v == "wide_pose")
  assert "| wide_pose | " in text and "dense-bo:" in text


def _sigterm_once_checkpointed(workdir):
  """SIGTERM to this process once `workdir` holds its first checkpoint (the
  run is then mid-way): a thread polls; fit's handler turns it into a stop."""
  import signal
  import threading
  import time

  def watch():
    # Patient: on a loaded machine (a benchmark beside the suite) compiling and the
    # first steps took over a minute, and a watcher that gave up sent no signal.
    ck = os.path.join(workdir, "checkpoints")
    deadline = time.time() + 900
    while time.time() < deadline:
      if os.path.isdir(ck) and any(n.isdigit() for n in os.listdir(ck)):
        os.kill(os.getpid(), signal.SIGTERM)
        return
      time.sleep(0.01)

  t = threading.Thread(target=watch, daemon=True)
  t.start()
  return t


def test_a_unit_stopped_by_a_signal_is_not_recorded_and_resumes(tmp_path, tiny_synface):
  # The fault seen in a real reproduction: SIGTERM stopped a unit's training
  # at step 123 of 2000, `fit` returned, and the unit was written as done.
  cfg = config.override(config.get_config("test_tiny"),
                        ["steps=12", "ckpt_every=2", "eval_every=1000"])
  b = reproduce.Budget(preset="test_tiny", data=tiny_synface, seeds=1).resolved(cfg)
  rep = reproduce.Reproduction(str(tmp_path), cfg, b)
  unit = reproduce.Unit("t1.independent.s0", "train", row="independent")
  wd = str(tmp_path / "runs" / unit.name)
  t = _sigterm_once_checkpointed(wd)
  with pytest.raises(reproduce.StopRequested) as e:
    rep.run_unit(unit)
  t.join()
  assert e.value.signal == "SIGTERM" and e.value.exit_code == 143
  assert 2 <= e.value.step < 12 and "rerun" in str(e.value)
  assert rep.result(unit.name) is None  # nothing recorded for the unfinished run
  from scr_jax import workdir
  assert workdir.restore(wd).step == e.value.step  # its checkpoint is kept
  res = rep.run_unit(unit)  # the rerun continues it to the end
  assert res["steps"] == 12 and rep.result(unit.name)["steps"] == 12


def test_a_search_stopped_by_a_signal_writes_no_scores(tmp_path, tiny_synface):
  cfg = config.override(config.get_config("test_tiny"),
                        ["steps=12", "ckpt_every=2", "eval_every=1000"])
  d = reproduce.Reproduction(str(tmp_path), cfg,
                             reproduce.Budget(preset="test_tiny", data=tiny_synface,
                                              seeds=1).resolved(cfg)).data("default")
  wd = str(tmp_path / "orders")
  t = _sigterm_once_checkpointed(wd)
  with pytest.raises(train.StopRequested):
    search.train_orders(cfg, wd, d["train"], d["val"], ["DLVA", "AVLD"])
  t.join()
  assert not os.path.exists(os.path.join(wd, "scores.json"))
  scores = search.train_orders(cfg, wd, d["train"], d["val"], ["DLVA", "AVLD"])
  assert [s["order"] for s in scores] == ["DLVA", "AVLD"]
  with open(os.path.join(wd, "scores.json")) as fh:
    assert json.load(fh)["steps"] == 12


def test_worker_slots_each_get_one_core():
  from scr_jax import parallel
  assert parallel.core_slots(1) is None
  assert parallel.on_core(["python", "-V"], None) == ["python", "-V"]
  slots = parallel.core_slots(3)
  if slots is not None:  # taskset is there
    assert len(slots) == 3 and set(slots) <= os.sched_getaffinity(0)
    cmd = parallel.on_core([sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                           slots[1])
    import subprocess
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert out.strip() == str([slots[1]])


def test_settings_written_before_a_budget_field_existed_continue(tmp_path):
  """A reproduction started before a budget field was added continues: the missing field
  takes its default; any other difference is still refused."""
  out = str(tmp_path / "rep")
  b = _budget("builtin")
  reproduce.open_reproduction(out, b)
  path = os.path.join(out, "settings.json")
  s = json.load(open(path))
  del s["budget"]["unroll_seeds"]
  json.dump(s, open(path, "w"))
  reproduce.open_reproduction(out, b)
  assert json.load(open(path))["budget"]["unroll_seeds"] == 1
  with pytest.raises(UserError, match="unroll_seeds differ"):
    reproduce.open_reproduction(out, dataclasses.replace(b, unroll_seeds=2))


def test_a_later_invocation_may_run_other_parts(tmp_path):
  """Parts select what an invocation runs, not which reproduction OUT holds: table1
  now, dose later continue the same one; settings.json keeps the union (the report
  and the workers see both); other budget fields are still refused."""
  out = str(tmp_path / "rep")
  b = _budget("builtin", parts=("table1",))
  reproduce.open_reproduction(out, b)
  rep, settings = reproduce.open_reproduction(out, dataclasses.replace(b, parts=("dose",)))
  assert settings["budget"]["parts"] == ["table1", "dose"] and rep.b.parts == ("table1", "dose")
  rep, _ = reproduce.open_reproduction(out)  # what a worker opens
  names = {u.name for u in reproduce.plan(rep.b)}
  assert "t1.independent.s0" in names and reproduce.dose_name(0.3, 1) in names
  with pytest.raises(UserError, match="seeds differ"):
    reproduce.open_reproduction(out, dataclasses.replace(b, seeds=3))


def test_dose_units_plan_structure_and_checks(tmp_path):
  cfg = config.override(config.get_config("test_tiny"), ["steps=10"])
  b = reproduce.Budget(preset="test_tiny", parts=("dose",), seeds=2,
                       dose_alphas=(0.3, 0.01)).resolved(cfg)
  units = {u.name: u for u in reproduce.plan(b)}
  assert sorted(n for n in units if n.startswith("dose.")) == [
      "dose.a0.01.s0", "dose.a0.01.s1", "dose.a0.3.s0", "dose.a0.3.s1"]
  assert units["dose.a0.3.s1"].deps == ("search.default.bo.s1",)
  assert "search.default.bo.s1" in units and not [n for n in units if n.startswith("t1.")]
  rep = reproduce.Reproduction(str(tmp_path), cfg, b)
  reproduce._save(rep.result_path("search.default.bo.s1"), dict(kind="search", order="DVAL"))
  st, row, label = rep.structure_for(units["dose.a0.3.s1"])
  np.testing.assert_allclose(np.asarray(st.m), 0.3 * structure.dense_matrix("DVAL"))
  assert (row, label, st.variant) == ("dose", "0.3 x DVAL", "generic")
  for bad, msg in (((0.0,), "strictly between"), ((1.0,), "strictly between"),
                   ((0.3, 0.3), "repeat")):
    with pytest.raises(UserError, match=msg):
      reproduce.Budget(dose_alphas=bad).check()


def test_report_dose_on_planted_numbers(tmp_path):
  cfg = config.override(config.get_config("test_tiny"), ["steps=2"])
  b = reproduce.Budget(preset="test_tiny", parts=("table1", "dose"), seeds=3,
                       dose_alphas=(0.01, 0.3)).resolved(cfg)
  rep = reproduce.Reproduction(str(tmp_path), cfg, b)
  ind, dense = [8.0, 9.0, 8.5], [9.0, 10.5, 9.0]
  _planted(rep, {"independent": ind, "dense-bo": dense})
  planted = {0.01: [8.1, 8.8, 8.6], 0.3: [8.5, 9.5, 8.9]}  # s1: 0.01 below independent
  for a, vals in planted.items():
    for s, v in enumerate(vals):
      reproduce._save(rep.result_path(reproduce.dose_name(a, s)), dict(
          kind="train", seed=s, row="dose", test=dict(mad_mean=v), val=dict(mad_mean=v)))
  text = reproduce.report(rep, dict(command="cmd", commit="abc"))
  sec = text.split("## Item 7: the structure's strength (dose)")[1]
  d = stats.paired_difference(planted[0.3], ind)
  row = [x for x in sec.splitlines() if x.startswith("| 0.3 |")][0]
  assert f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]" in row
  assert row.endswith(f"| {np.mean(np.abs(np.subtract(planted[0.3], ind))):.2f} |")
  assert "s0 8.50, s1 9.50, s2 8.90" in row
  assert "s0 9.00, s1 10.50, s2 9.00" in [x for x in sec.splitlines() if x.startswith("| 1 |")][0]
  # MAD rises with alpha on s0 and s2 (rho +1); s1 dips at 0.01
  rho1 = stats.spearman([0, 0.01, 0.3, 1], [9.0, 8.8, 9.5, 10.5])
  assert f"s0 +1.00, s1 {rho1:+.2f}, s2 +1.00; mean {(2 + rho1) / 3:+.2f}." in sec


def test_settings_written_before_a_config_field_existed_continue(tmp_path):
  """A config field added since (at its default) is the same config: the
  reproduction continues; a config that differs in value is still refused."""
  out = str(tmp_path / "rep")
  b = _budget("builtin")
  reproduce.open_reproduction(out, b)
  path = os.path.join(out, "settings.json")
  s = json.load(open(path))
  del s["config"]["light_warmup_steps"], s["config"]["lr_warmup_steps"]
  json.dump(s, open(path, "w"))
  reproduce.open_reproduction(out, b)
  with pytest.raises(UserError, match="other settings"):
    reproduce.open_reproduction(out, dataclasses.replace(b, sets=("light_warmup_steps=300",)))
