"""Structure search: NOTEARS h, unrolled hypergradients, planted-DAG recovery,
thresholding, candidate (vmapped) training, and the search CLI end to end."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from scr_jax import bilevel, config, data, search, structure, train, train_step
from scr_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- NOTEARS h

def test_h_zero_on_dags_positive_on_cycles():
  rng = np.random.default_rng(0)
  for order in structure.ALL_ORDERS:
    m = structure.dense_matrix(order) * rng.uniform(0.1, 3.0, (4, 4))
    assert float(structure.notears_h(jnp.asarray(m))) == 0.0
  cyc = np.zeros((4, 4), np.float32)
  cyc[0, 1] = cyc[1, 2] = cyc[2, 0] = 0.5  # V -> D -> L -> V
  assert float(structure.notears_h(jnp.asarray(cyc))) > 1e-4
  two = np.zeros((4, 4), np.float32)
  two[3, 1] = two[1, 3] = 1.0
  assert float(structure.notears_h(jnp.asarray(two))) > 0.1
  assert not structure.is_dag(cyc) and not structure.is_dag(two)


@jax.enable_x64(True)
def test_h_gradient_closed_form_and_finite_differences():
  # h = tr(A^n) - n, A = I + (c/n) M*M  =>  dh/dM = 2c (A^{n-1})^T * M.
  rng = np.random.default_rng(1)
  m = rng.normal(size=(4, 4))
  c, n = 1.7, 4
  g = np.asarray(jax.grad(lambda x: structure.notears_h(x, c))(jnp.asarray(m)))
  a = np.eye(n) + (c / n) * m * m
  closed = 2 * c * np.linalg.matrix_power(a, n - 1).T * m
  np.testing.assert_allclose(g, closed, rtol=1e-10, atol=1e-12)
  eps, fd = 1e-6, np.zeros_like(m)
  for i in range(4):
    for j in range(4):
      d = np.zeros_like(m)
      d[i, j] = eps
      fd[i, j] = (float(structure.notears_h(jnp.asarray(m + d), c)) -
                  float(structure.notears_h(jnp.asarray(m - d), c))) / (2 * eps)
  np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)


# ------------------------------------------------------ unrolled hypergradient

def _quadratic_problem(k, seed=0):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(3, 16))
  bs = rng.normal(size=(k, 3))
  vb = rng.normal(size=3)
  theta0 = rng.normal(size=3)
  m0 = rng.normal(size=(4, 4)) * 0.3
  return a, bs, vb, theta0, m0


def _numpy_outer(m_raw, a, bs, vb, theta0, lr, alpha, rho):
  """Independent float64 re-implementation: SGD on the inner quadratic, then
  the validation loss plus the augmented-Lagrangian NOTEARS term."""
  m = m_raw * (1 - np.eye(4))
  th = theta0.copy()
  for b in bs:
    th = th - lr * (th - a @ m.reshape(-1) - b)
  h = np.trace(np.linalg.matrix_power(np.eye(4) + 0.25 * m * m, 4)) - 4
  return 0.5 * np.sum((th - vb) ** 2) + 0.1 * np.sum(m) + alpha * h + 0.5 * rho * h * h


@pytest.mark.parametrize("k", [1, 5])
@jax.enable_x64(True)
def test_hypergradient_matches_finite_differences(k):
  a, bs, vb, theta0, m0 = _quadratic_problem(k)
  lr, alpha, rho = 0.3, 0.7, 2.0
  train_loss = lambda p, b, m: 0.5 * jnp.sum((p["w"] - jnp.asarray(a) @ m.reshape(-1) - b) ** 2)
  val_loss = lambda p, b, m: 0.5 * jnp.sum((p["w"] - b) ** 2) + 0.1 * jnp.sum(m)
  opt = bilevel.inner_optimizer("sgd", lr)
  params = {"w": jnp.asarray(theta0)}
  f = bilevel.hypergrad_fn(train_loss, val_loss, opt, 1 - np.eye(4))
  (obj, _), g = f(jnp.asarray(m0), params, opt.init(params), jnp.asarray(bs), jnp.asarray(vb),
                  alpha, rho)
  assert abs(float(obj) - _numpy_outer(m0, a, bs, vb, theta0, lr, alpha, rho)) < 1e-10
  eps, fd = 1e-6, np.zeros((4, 4))
  for i in range(4):
    for j in range(4):
      d = np.zeros((4, 4))
      d[i, j] = eps
      fd[i, j] = (_numpy_outer(m0 + d, a, bs, vb, theta0, lr, alpha, rho) -
                  _numpy_outer(m0 - d, a, bs, vb, theta0, lr, alpha, rho)) / (2 * eps)
  np.testing.assert_allclose(np.asarray(g), fd, rtol=1e-6, atol=1e-8)
  assert np.all(np.diag(np.asarray(g)) == 0)  # masked entries get no gradient


@jax.enable_x64(True)
def test_adam_inner_loop_meta_gradient_is_finite_and_correct():
  """A parameter that starts exactly at its inner optimum (gradient 0, so
  Adam's v = 0, while the gradient still depends on M) makes plain Adam's
  meta-gradient NaN through d sqrt(v); eps_root keeps it finite and FD-consistent."""
  a, bs, vb, theta0, m0 = _quadratic_problem(3, seed=2)
  train_loss = lambda p, b, m: (0.5 * jnp.sum((p["w"] - jnp.asarray(a) @ m.reshape(-1) - b) ** 2)
                                + 0.5 * (p["z"] - m[0, 1]) ** 2)
  val_loss = lambda p, b, m: 0.5 * jnp.sum((p["w"] - b) ** 2) + p["z"] ** 2
  params = {"w": jnp.asarray(theta0), "z": jnp.asarray(m0[0, 1])}
  args = (jnp.asarray(m0), params, None, jnp.asarray(bs), jnp.asarray(vb), 0.0, 0.0)
  plain = optax.adam(0.05)
  f = bilevel.hypergrad_fn(train_loss, val_loss, plain, 1 - np.eye(4))
  _, g_plain = f(args[0], params, plain.init(params), *args[3:])
  assert not np.all(np.isfinite(np.asarray(g_plain)))  # the pitfall is real
  opt = bilevel.inner_optimizer("adam", 0.05)
  f = bilevel.hypergrad_fn(train_loss, val_loss, opt, 1 - np.eye(4))
  _, g = f(args[0], params, opt.init(params), *args[3:])
  assert np.all(np.isfinite(np.asarray(g)))
  obj = lambda m: float(f(m, params, opt.init(params), *args[3:])[0][0])
  eps = 1e-6
  # M[0, 1] sits on Adam's kink (update ~ sign(g) at g = 0): no derivative
  # exists there, eps_root only makes it finite. Elsewhere AD must match FD.
  for i, j in [(1, 2), (2, 3), (3, 0)]:
    d = np.zeros((4, 4))
    d[i, j] = eps
    fd = (obj(jnp.asarray(m0 + d)) - obj(jnp.asarray(m0 - d))) / (2 * eps)
    np.testing.assert_allclose(float(g[i, j]), fd, rtol=1e-5, atol=1e-8)


def test_planted_dag_is_recovered():
  """Embeddings mixed by a planted DAG; the inner problem learns per-factor
  scales (which cannot absorb cross-factor edges), the outer problem M."""
  planted = np.zeros((4, 4), np.float32)
  planted[1, 0], planted[1, 3], planted[0, 2] = 1.0, 0.8, -0.7  # D->V, D->A, V->L
  rng = np.random.default_rng(0)

  def make(n):
    x = rng.normal(size=(n, 4, 8)).astype(np.float32)
    t = np.asarray(structure.mix(jnp.asarray(x), jnp.asarray(planted)))
    return jnp.asarray(x), jnp.asarray(t + 0.01 * rng.normal(size=t.shape).astype(np.float32))

  tr, va = make(128), make(64)

  def loss(p, batch, m):
    x, t = batch
    pred = structure.mix(p["scale"][None, :, None] * x, m)
    return jnp.mean((pred - t) ** 2)

  k = 2
  res = bilevel.bilevel_search(
      loss, loss, {"scale": jnp.full((4,), 0.5)},
      lambda t: (jnp.stack([tr[0]] * k), jnp.stack([tr[1]] * k)), lambda t: va,
      mask=1 - np.eye(4), steps=300, unroll_k=k, inner="sgd", inner_lr=0.2, outer_lr=0.03,
      lam_dag=1.0, augmented=True, dual_every=20)
  m = bilevel.threshold(res["m_effective"], 0.3)
  np.testing.assert_array_equal(m != 0, planted != 0)
  assert res["trace"][-1]["h"] < 1e-3


def test_threshold_refuses_cycles_and_binarises():
  m = np.zeros((4, 4), np.float32)
  m[0, 1], m[1, 0], m[2, 3] = 0.9, 0.5, 0.05
  with pytest.raises(UserError, match="cycle"):
    bilevel.threshold(m, 0.1)
  out = bilevel.threshold(m, 0.6)
  assert out[0, 1] == 1.0 and out.sum() == 1.0
  kept = bilevel.threshold(m, 0.6, binarize=False)
  assert kept[0, 1] == pytest.approx(0.9)


def test_save_structure_never_writes_a_cycle(tmp_path):
  m = np.zeros((4, 4), np.float32)
  m[0, 1] = m[1, 0] = 1.0
  path = str(tmp_path / "s.json")
  with pytest.raises(UserError, match="not a DAG"):
    structure.save_structure(path, m=m)
  assert not os.path.exists(path)
  m[1, 0] = 0.0
  s = structure.save_structure(path, m=m)
  assert structure.load_structure(path)["order"] == s["order"]


# ------------------------------------------------------------- the SCR model

def _count(params):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))


def test_parameter_parity_across_variants(tmp_path):
  base = config.get_config("test_tiny")
  s = structure.save_structure(str(tmp_path / "g.json"), m=structure.dense_matrix("DLVA") * 0.5)
  counts = {}
  for variant, extra in [("independent", []), ("dense", ["order=DVAL"]),
                         ("dynamic", ["order=DVAL", "q=cosine"]),
                         ("generic", [f"structure={tmp_path / 'g.json'}"])]:
    cfg = config.override(base, [f"variant={variant}"] + extra)
    structure.resolve(cfg)
    _, state = train_step.init_state(cfg, jax.random.PRNGKey(0))
    counts[variant] = _count(state.params)
  assert s["order"] == "DLVA"
  assert len(set(counts.values())) == 1, counts


def test_vmapped_candidates_equal_separate_runs():
  cfg = config.get_config("test_tiny")
  nets, state = train_step.init_state(cfg, jax.random.PRNGKey(0))
  ms = structure.candidates(["DVAL", "independent"])
  img = jax.random.uniform(jax.random.PRNGKey(1), (cfg.batch_size, 16, 16, 3)) * 2 - 1
  multi = train_step.make_candidate_step(nets, cfg)
  single = train_step.make_train_step(nets, cfg)
  st_k = train_step.stack_state(state, 2)
  for _ in range(2):
    st_k, met_k = multi(st_k, img, ms)
  for i in range(2):
    st = jax.tree_util.tree_map(jnp.copy, state)
    for _ in range(2):
      st, met = single(st, img, ms.candidate(i))
    assert float(met["loss"]) == pytest.approx(float(met_k["loss"][i]), rel=1e-4)
    for a, b in zip(jax.tree_util.tree_leaves(st.params),
                    jax.tree_util.tree_leaves(train_step.unstack_params(st_k.params, i))):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-3)
  # The two structures really train differently.
  d = [float(jnp.max(jnp.abs(a[0] - a[1]))) for a in jax.tree_util.tree_leaves(st_k.params)]
  assert max(d) > 1e-4


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("synface"))
  data.export_synface(root, n_train=24, n_val=8, n_test=8, size=16, seed=3, verbose=False)
  return root


def _run(*args):
  p = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "run.py"), *args],
                     capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stderr[-3000:]
  return p


def test_search_cli_bo_then_masked_unroll_then_train(tiny_root, tmp_path):
  bo_dir, un_dir, run_dir = (str(tmp_path / n) for n in ("bo", "un", "run"))
  _run("search", "--method", "bo", "--preset", "test_tiny", "--data", tiny_root,
       "--workdir", bo_dir, "--budget-steps", "2", "--init", "2", "--evals", "2", "--batch", "2")
  s = structure.load_structure(os.path.join(bo_dir, "structure.json"))
  trace = json.load(open(os.path.join(bo_dir, "bo_trace.json")))
  assert s["order"] == trace["best_order"] and len(trace["trace"]) == 2
  assert os.path.getsize(os.path.join(bo_dir, "bo_trace.png")) > 1000
  _run("search", "--method", "unroll-masked", "--preset", "test_tiny", "--data", tiny_root,
       "--workdir", un_dir, "--budget-steps", "2", "--structure",
       os.path.join(bo_dir, "structure.json"), "--threshold", "0.0", "--keep-weights")
  g = structure.load_structure(os.path.join(un_dir, "structure.json"))
  m = np.asarray(g["M"])
  dense = structure.dense_matrix(s["order"])
  assert np.all(m[dense == 0] == 0) and np.any(m != 0)  # only edges of the ordering
  assert structure.is_dag(m)
  _run("train", "--preset", "test_tiny", "--data", tiny_root, "--workdir", run_dir,
       "--variant", "generic", "--structure", os.path.join(un_dir, "structure.json"),
       "--steps", "2")
  adj = json.load(open(os.path.join(run_dir, "adjacency.json")))
  np.testing.assert_allclose(adj["M"], m, rtol=1e-6)


def test_threshold_to_dag_drops_the_weakest_cycle_edges():
  m = np.zeros((4, 4), np.float32)
  m[0, 3], m[3, 0], m[1, 2] = 0.4, 0.2, 0.3  # V <-> A cycle, plus D -> L
  out, used = bilevel.threshold_to_dag(m, 0.1)
  assert used == pytest.approx(0.2) and structure.is_dag(out)
  assert out[0, 3] == 1 and out[3, 0] == 0 and out[1, 2] == 1


def test_unrolled_search_stopped_by_a_signal_continues_bit_identically(tiny_root, tmp_path):
  """SIGTERM at outer step 3 of 4 saves the loop's state (orbax) and raises
  StopRequested with nothing else written; the rerun continues from step 3 and
  ends with the same M, trace and inner weights as an uninterrupted search; a
  search with other arguments in that workdir starts again."""
  import signal
  from scr_jax import dataset, workdir
  cfg = config.override(config.get_config("test_tiny"), ["steps=4"])
  d = {s: dataset.load_split(tiny_root, s, cfg) for s in ("train", "val")}
  kw = dict(masked_order="DLVA", steps=4, augmented=False, tau=0.0)
  full, _ = search.search_unroll(cfg, str(tmp_path / "full"), d["train"], d["val"],
                                 log=lambda m: None, **kw)
  wd = str(tmp_path / "cut")
  msgs = []

  def log(m):
    msgs.append(m)
    if m.startswith("unroll step 3/4"):
      os.kill(os.getpid(), signal.SIGTERM)
  with pytest.raises(train.StopRequested) as e:
    search.search_unroll(cfg, wd, d["train"], d["val"], log=log, snapshot_every=100, **kw)
  assert e.value.step == 3
  assert not os.path.exists(os.path.join(wd, "structure.json"))
  msgs.clear()
  cut, _ = search.search_unroll(cfg, wd, d["train"], d["val"], log=msgs.append, **kw)
  assert any("continuing at outer step 3/4" in m for m in msgs)
  assert not any(m.startswith("unroll step 3/4") for m in msgs)  # step 3 was not redone
  assert cut["m_continuous"] == full["m_continuous"]
  t_full, t_cut = (json.load(open(os.path.join(str(tmp_path / n), "unroll_trace.json")))["steps"]
                   for n in ("full", "cut"))
  assert t_full == t_cut and len(t_cut) == 4
  p_full, p_cut = (workdir.restore(str(tmp_path / n)).params for n in ("full", "cut"))
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(p_full),
                                                  jax.tree_util.tree_leaves(p_cut)))
  msgs.clear()
  search.search_unroll(cfg, wd, d["train"], d["val"], log=msgs.append,
                       **dict(kw, outer_lr=0.1))
  assert any("holds the state of another search" in m for m in msgs)
  assert any(m.startswith("unroll step 1/4") for m in msgs)
