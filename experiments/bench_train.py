#!/usr/bin/env python
"""Train-step speed: median step time per preset, XLA's FLOP count of the step,
and the achieved FLOP/s as a fraction of a dense fp32 matmul measured in the
same run (same process, same machine state).

  python experiments/bench_train.py [--presets cpu_small,paper] [--repeats 5]
  python experiments/bench_train.py --layers   # per-layer: ours vs lax/flax convs
  python experiments/bench_train.py --profile [--presets cpu_small]  # where a step's time goes
  python experiments/bench_train.py --ops [--presets cpu_small]  # per XLA op, by stage / function
  python experiments/bench_train.py --rule [--presets cpu_small]  # conv2d's per-layer rule
  python experiments/bench_train.py --paths [0,1024,8192] [--presets cpu_small]  # whole step per rule
  python experiments/bench_train.py --memory [--presets paper]  # the step's memory (XLA), compile

Prints a table, then one JSON line (the last line).
"""
import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import resource
import time

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from scr_jax import config, losses, model, nets as _nets, structure, train_step  # noqa: E402

MAX_PATCH_DEFAULT = _nets.MATMUL_MAX_PATCH


def _median_time(fn, repeats):
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t)
  return float(np.median(ts))


def matmul_rate(n=2048, repeats=5):
  """fp32 FLOP/s of an n x n x n matmul (the machine's practical peak)."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  jax.block_until_ready(f(a, b))
  t = _median_time(lambda: f(a, b), repeats)
  return 2 * n**3 / t, t


def step_inputs(cfg):
  """(structure with M as a jax array, nets, initial TrainState, a random
  img_BxSxSx3 in [0, 1]): what every step benchmark here feeds the step."""
  st = structure.resolve_structure(cfg)
  st = st.replace(m=jnp.asarray(st.m))
  nets, state = train_step.init_state(cfg, jax.random.PRNGKey(0))
  img = jax.random.uniform(jax.random.PRNGKey(2), (cfg.batch_size, cfg.image_size,
                                                   cfg.image_size, 3))
  return st, nets, state, img


def bench_preset(name, repeats, variant="independent"):
  cfg = config.override(config.get_config(name), [f"variant={variant}"] +
                        (["order=DVAL"] if variant != "independent" else []))
  st, nets, state, img = step_inputs(cfg)
  step = train_step.make_train_step(nets, cfg)
  t0 = time.perf_counter()
  compiled = step.lower(state, img, st).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan")))
  holder = [state]

  def run():
    holder[0], met = step(holder[0], img, st)
    return met["loss"]

  jax.block_until_ready(run())  # warm-up (also the first donated step)
  t = _median_time(run, repeats)
  return dict(preset=name, batch=cfg.batch_size, image_size=cfg.image_size,
              step_s=t, images_per_s=cfg.batch_size / t, flops=flops,
              flops_per_s=flops / t, compile_s=compile_s)


# (H, Cin, Cout, kernel, stride, pad) of the paper preset's convs, B = 64, and
# (H, Cin, Cout) of its stride-2 transposed convs.
PAPER_CONVS = [(64, 3, 64, 4, 2, 1), (32, 64, 128, 4, 2, 1), (4, 512, 512, 3, 1, 1),
               (32, 64, 64, 3, 1, 1), (64, 64, 64, 5, 1, 2), (64, 64, 1, 5, 1, 2)]
PAPER_DECONVS = [(4, 512, 256), (16, 128, 64), (32, 128, 64)]


def bench_layers(repeats, batch=64):
  """fwd+bwd time of each layer shape: lax conv / flax ConvTranspose vs ours."""
  rows = []
  key = jax.random.PRNGKey(0)

  def timed(f, k, x, w):
    g = jax.jit(jax.grad(lambda k, x: jnp.sum(f(k, x) * w), argnums=(0, 1)))
    jax.block_until_ready(g(k, x))
    return _median_time(lambda: g(k, x), repeats)

  for h, c, o, kk, s, p in PAPER_CONVS:
    x = jax.random.normal(key, (batch, h, h, c))
    k = jax.random.normal(key, (kk, kk, c, o)) * 0.1
    ref = lambda k, x: _nets.lax_conv(x, k, s, p)
    w = jnp.ones(ref(k, x).shape)
    rows.append((f"conv {h}px {c}->{o} k{kk} s{s}", timed(ref, k, x, w),
                 timed(lambda k, x: _nets.conv2d(x, k, s, p), k, x, w)))
  for h, c, o in PAPER_DECONVS:
    x = jax.random.normal(key, (batch, h, h, c))
    k = jax.random.normal(key, (4, 4, c, o)) * 0.1
    flax_t = nn.ConvTranspose(o, (4, 4), (2, 2), padding="SAME", use_bias=False)
    ours = _nets.ConvTranspose(o, 2)
    w = jnp.ones((batch, 2 * h, 2 * h, o))
    rows.append((f"deconv {h}px {c}->{o} s2",
                 timed(lambda k, x: flax_t.apply({"params": {"kernel": k}}, x), k, x, w),
                 timed(lambda k, x: ours.apply({"params": {"kernel": k}}, x), k, x, w)))
  print(f"{'layer (batch %d), fwd+bwd' % batch:<34}{'lax/flax ms':>12}{'ours ms':>10}{'speed-up':>10}")
  for name, a, b in rows:
    print(f"{name:<34}{a * 1e3:>12.1f}{b * 1e3:>10.1f}{a / b:>10.2f}", flush=True)
  print(json.dumps(dict(layers=[dict(layer=n, reference_s=a, ours_s=b) for n, a, b in rows])))


def profile_preset(name, repeats):
  """Times the parts of one train step as separately jitted functions (median of
  `repeats` each, same process): nets (encoders, mix, decoders, factor heads,
  confidence net), renderer (shading, warp, rasterizer, grid sample), loss, each
  forward and forward+backward (backward = the difference), and the optimizer
  update; then the whole step. Returns a list of (part, seconds) rows and the
  whole step's seconds."""
  cfg = config.get_config(name)
  st, nets, state, img = step_inputs(cfg)
  params = state.params
  cam = model.camera(cfg)
  perc = train_step.perceptual_for(cfg)

  def nets_fwd(p, img):
    f = model.factors(nets, p, img, st, cfg)
    sig = nets.apply(p, model.to_model_range(img), method=nets.confidence)
    return f, sig

  def render_fwd(f):
    return model.render_factors(f, cam)

  def loss_fwd(out):
    return losses.total_loss(out, cfg, perc)[0]

  f, sig = jax.jit(nets_fwd)(params, img)
  orig, flip = jax.jit(render_fwd)(f)
  full_out = model.ForwardOutput(factors=f, orig=orig, flip=flip, sigma_l1_BxSxSx2=sig[0],
                                 sigma_perc_BxTxTx2=sig[1], input_BxSxSx3=model.to_model_range(img))

  def with_vjp(fn):
    """fwd+bwd: the vjp of fn in its first argument, applied to ones."""
    def g(x, *rest):
      y, pull = jax.vjp(lambda x: fn(x, *rest), x)
      return pull(jax.tree_util.tree_map(jnp.ones_like, y))
    return g

  def timed(fn, *args):
    j = jax.jit(fn)
    jax.block_until_ready(j(*args))
    return _median_time(lambda: j(*args), repeats)

  # The renderer's input: the rendered factors only (u and M are not rendered).
  fr = f.replace(u_Bx4xd=None, adjacency=None)
  opt = train_step.make_optimizer(cfg)
  grads = jax.tree_util.tree_map(lambda a: a * 1e-3, params)
  upd = lambda g, s, p: optax_apply(opt, g, s, p)
  rows = []
  for part, fn, args in [("nets", nets_fwd, (params, img)), ("renderer", render_fwd, (fr,)),
                         ("loss", loss_fwd, (full_out,))]:
    fwd = timed(fn, *args)
    both = timed(with_vjp(fn), *args)
    # backward = (fwd+bwd) - fwd: a small negative value is timing noise.
    rows += [(f"{part} forward", fwd), (f"{part} backward", both - fwd)]
  rows.append(("optimizer update", timed(upd, grads, state.opt_state, params)))
  step = train_step.make_train_step(nets, cfg)
  holder = [jax.tree_util.tree_map(jnp.copy, state)]

  def run():
    holder[0], met = step(holder[0], img, st)
    return met["loss"]
  jax.block_until_ready(run())
  whole = _median_time(run, repeats)
  return rows, whole


def conv_layers(cfg):
  """(x_shape, k_shape, stride, pad) -> count of every conv2d call in the nets
  (transposed convs: their phase convs), recorded while tracing init."""
  seen = {}
  orig = _nets.uses_matmul

  def record(x_shape, k_shape, stride, pad):
    key = (tuple(x_shape), tuple(k_shape), stride, pad)
    seen[key] = seen.get(key, 0) + 1
    return orig(x_shape, k_shape, stride, pad)
  _nets.uses_matmul = record
  try:
    net = _nets.make_nets(cfg)
    jax.eval_shape(net.init, jax.random.PRNGKey(0),
                   jnp.zeros((cfg.batch_size, cfg.image_size, cfg.image_size, 3)))
  finally:
    _nets.uses_matmul = orig
  return seen


def bench_rule(name, repeats, k=4):
  """Each distinct conv2d layer of the preset, fwd+bwd: the im2col matmul path
  vs the lax path, single and vmapped over k candidate kernels (same process,
  interleaved), against one image's patch-matrix size (the rule's variable)."""
  cfg = config.get_config(name)
  rows = []
  for (xs, ks, s, p), count in sorted(conv_layers(cfg).items(), key=lambda kv: kv[0][0][1]):
    x = jax.random.normal(jax.random.PRNGKey(0), xs)
    kern = jax.random.normal(jax.random.PRNGKey(1), ks) * 0.1
    xk = jnp.broadcast_to(x, (k,) + xs) + 0
    kk = jnp.broadcast_to(kern, (k,) + ks) + 0
    times = {}
    for path, limit in (("matmul", 1 << 40), ("lax", 0)):
      _nets.MATMUL_MAX_PATCH = limit
      loss = lambda kern, x: jnp.sum(jnp.tanh(_nets.conv2d(x, kern, s, p)))
      g1 = jax.jit(jax.grad(loss, (0, 1)))
      gk = jax.jit(jax.vmap(jax.grad(loss, (0, 1))))
      jax.block_until_ready((g1(kern, x), gk(kk, xk)))
      times[path] = (g1, gk)
    _nets.MATMUL_MAX_PATCH = MAX_PATCH_DEFAULT
    t = {key: [] for key in ("matmul", "lax")}
    tk = {key: [] for key in ("matmul", "lax")}
    for _ in range(repeats):  # interleaved: load changes hit both paths
      for path, (g1, gk) in times.items():
        t[path].append(_median_time(lambda: g1(kern, x), 1))
        tk[path].append(_median_time(lambda: gk(kk, xk), 1))
    med = lambda v: float(np.median(v))
    _, h, w, c = xs
    patch = _nets._out_size(h, ks[0], s, p) * _nets._out_size(w, ks[1], s, p) * ks[0] * ks[1] * c
    rows.append(dict(layer=f"{h}px {c}->{ks[3]} k{ks[0]} s{s}", count=count, patch=patch,
                     uses_matmul=_nets.uses_matmul(xs, ks, s, p),
                     lax_s=med(t["lax"]), matmul_s=med(t["matmul"]),
                     lax_vmap_s=med(tk["lax"]), matmul_vmap_s=med(tk["matmul"])))
    r = rows[-1]
    print(f"{r['layer']:<22}{count:>3}{patch:>9}{'matmul' if r['uses_matmul'] else 'lax':>8}"
          f"{r['lax_s'] * 1e3:>9.2f}{r['matmul_s'] * 1e3:>9.2f}{r['lax_s'] / r['matmul_s']:>7.2f}"
          f"{r['lax_vmap_s'] / (k * r['lax_s']):>8.2f}{r['matmul_vmap_s'] / (k * r['matmul_s']):>8.2f}",
          flush=True)
  return rows


def print_rule(name, repeats, k=4):
  print(f"{name}, batch {config.get_config(name).batch_size}, fwd+bwd per layer, median of "
        f"{repeats}; vmap columns: K={k} vmapped / (K x single) of the same path;"
        f" rule: matmul iff patch <= {MAX_PATCH_DEFAULT}")
  print(f"{'layer':<22}{'n':>3}{'patch':>9}{'uses':>8}{'lax ms':>9}{'mm ms':>9}{'lax/mm':>7}"
        f"{'lax vK':>8}{'mm vK':>8}")
  rows = bench_rule(name, repeats, k)
  print(json.dumps(dict(preset=name, k=k, layers=rows, load_average=os.getloadavg()[0])))


def bench_paths(name, repeats, limits):
  """The whole step for several values of _nets.MATMUL_MAX_PATCH (0: all layers
  on the lax path; huge: all on the matmul path), same process, interleaved."""
  cfg = config.get_config(name)
  st = structure.resolve_structure(cfg)
  st = st.replace(m=jnp.asarray(st.m))
  img = jax.random.uniform(jax.random.PRNGKey(2), (cfg.batch_size, cfg.image_size,
                                                   cfg.image_size, 3))
  runs = {}
  for limit in limits:
    label = {0: "all lax", 1 << 40: "all matmul"}.get(limit, f"patch<={limit}")
    label += " (default)" if limit == MAX_PATCH_DEFAULT else ""
    _nets.MATMUL_MAX_PATCH = limit
    net, state = train_step.init_state(cfg, jax.random.PRNGKey(0))
    step = jax.jit(train_step._train_step_fn(net, cfg))  # a fresh trace per setting
    jax.block_until_ready(step(state, img, st))
    runs[label] = (step, state)
  _nets.MATMUL_MAX_PATCH = MAX_PATCH_DEFAULT
  ts = {label: [] for label in runs}
  for _ in range(repeats):
    for label, (step, state) in runs.items():
      ts[label].append(_median_time(lambda: step(state, img, st)[1]["loss"], 1))
  res = {label: float(np.median(v)) for label, v in ts.items()}
  print(f"{name}: whole step, median of {repeats} interleaved: " +
        ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in res.items()))
  print(json.dumps(dict(preset=name, step_s=res, load_average=os.getloadavg()[0])))


def optax_apply(opt, grads, opt_state, params):
  updates, opt_state = opt.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def print_profile(name, repeats):
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.1f}", flush=True)
  rows, whole = profile_preset(name, repeats)
  total = sum(t for _, t in rows)
  print(f"\n{name}, median of {repeats} (each part jitted on its own)")
  print(f"{'part':<22}{'ms':>10}{'share of sum':>14}")
  for part, t in rows:
    print(f"{part:<22}{t * 1e3:>10.1f}{t / total:>14.1%}")
  print(f"{'sum of parts':<22}{total * 1e3:>10.1f}")
  print(f"{'whole step (jitted)':<22}{whole * 1e3:>10.1f}{'':>4}sum / whole = {total / whole:.2f}")
  print(json.dumps(dict(preset=name, repeats=repeats, parts={p: t for p, t in rows},
                        sum_s=total, step_s=whole, load_average=os.getloadavg()[0])))


# Pipeline stages by the innermost scr_jax file on an op's stack (first match).
_STAGE_FILES = (("nets.py", "nets"), ("perceptual.py", "nets"), ("render.py", "renderer"),
                ("losses.py", "loss"), ("model.py", "model"),
                # train_step.py's own ops: the Adam update and the non-finite guard
                ("train_step.py", "optimizer"),
                ("structure.py", "structure"))


def _hlo_sources(hlo_text):
  """op name -> (jax op_name, [(file, function, line), innermost first]) from a
  compiled module's text (its FileNames / FunctionNames / FileLocations /
  StackFrames tables and each instruction's stack_frame_id)."""
  tables = {k: {} for k in ("FileNames", "FunctionNames", "FileLocations", "StackFrames")}
  section = None
  for line in hlo_text.splitlines():
    s = line.strip()
    if s in tables:
      section = s
      continue
    m = re.match(r"(\d+) (.*)$", s) if section else None
    if not m:
      section = None
      continue
    i, rest = int(m.group(1)), m.group(2)
    if section in ("FileNames", "FunctionNames"):
      tables[section][i] = rest.strip('"')
    else:
      tables[section][i] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", rest)}

  def chain(fid):
    out, seen = [], set()
    while fid in tables["StackFrames"] and fid not in seen:
      seen.add(fid)
      fr = tables["StackFrames"][fid]
      loc = tables["FileLocations"][fr["file_location_id"]]
      out.append((os.path.basename(tables["FileNames"][loc["file_name_id"]]),
                  tables["FunctionNames"][loc["function_name_id"]], loc["line"]))
      fid = fr.get("parent_frame_id", 0)
    return out
  ops = {}
  for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*?metadata=\{([^}]*)\}", hlo_text, re.M):
    name = re.search(r'op_name="([^"]*)"', m.group(2))
    fid = re.search(r"stack_frame_id=(\d+)", m.group(2))
    ops[m.group(1)] = (name.group(1) if name else "", chain(int(fid.group(1))) if fid else [])
  return ops


def profile_ops(name, repeats):
  """The whole jitted step under jax.profiler: every executed XLA op's
  exclusive time (its trace time minus that of ops nested in it, e.g. a
  while loop's body), attributed to a pipeline stage (the innermost scr_jax
  file on its jax stack: nets, renderer, loss, optimizer) and direction
  (backward = ops jax derived by transposition), and to the innermost scr_jax
  function. Ops XLA created without a stack (layout copies, fusions of
  several sources) count as "unattributed" under their op kind. Returns
  (step seconds, exclusive seconds per step by stage, by function, by kind)."""
  cfg = config.get_config(name)
  st, nets, state, img = step_inputs(cfg)
  compiled = train_step.make_train_step(nets, cfg).lower(state, img, st).compile()
  sources = _hlo_sources(compiled.as_text())
  bare = st.bare()
  holder = [state]

  def run():
    holder[0], met = compiled(holder[0], img, bare)
    return met["loss"]
  jax.block_until_ready(run())
  whole = _median_time(run, repeats)
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for _ in range(repeats):
        jax.block_until_ready(run())
    (path,) = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
      events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and "dur" in e]
  by_thread = collections.defaultdict(list)
  for e in events:
    by_thread[(e["pid"], e["tid"])].append(e)
  for evs in by_thread.values():  # exclusive time: minus directly nested events
    evs.sort(key=lambda e: (e["ts"], -e["dur"]))
    stack = []
    for e in evs:
      while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
        stack.pop()
      e["excl"] = e["dur"]
      if stack:
        stack[-1]["excl"] -= e["dur"]
      stack.append(e)
  stage, func, kind = (collections.Counter() for _ in range(3))
  for e in events:
    op = e.get("args", {}).get("hlo_op")
    if op not in sources:  # runtime events (executors, waits), not XLA ops
      continue
    op_name, frames = sources[op]
    sec = e["excl"] * 1e-6 / repeats
    op_kind = re.sub(r"\.\d+$", "", op)
    kind[op_kind] += sec
    ours = [f for f in frames if any(f[0] == sf for sf, _ in _STAGE_FILES)]
    direction = "backward" if "transpose(" in op_name else "forward"
    if not ours:
      stage[f"unattributed ({op_kind})" if op_kind in ("copy", "transpose_copy_fusion",
                                                       "ynn_fusion") else "unattributed (other)"] += sec
      continue
    label = next(lab for sf, lab in _STAGE_FILES if any(f[0] == sf for f in ours))
    stage[label if label == "optimizer" else f"{label} {direction}"] += sec
    func[f"{ours[0][0]}:{ours[0][1]} ({direction})"] += sec
  return whole, stage, func, kind


def print_ops(name, repeats, top=25):
  whole, stage, func, kind = profile_ops(name, repeats)
  total = sum(stage.values())
  print(f"{name}: whole step {whole * 1e3:.1f} ms (median of {repeats}); XLA ops' exclusive "
        f"time {total * 1e3:.1f} ms per step = {total / whole:.2f} threads busy on average "
        f"({os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f})")
  for title, table in (("stage", stage), ("innermost scr_jax function", func), ("XLA op kind", kind)):
    print(f"{'by ' + title:<60}{'ms':>8}{'share':>8}")
    for k, v in table.most_common(top):
      print(f"  {k[:58]:<58}{v * 1e3:>8.2f}{v / total * 100:>7.1f}%")
  print(json.dumps(dict(preset=name, step_s=whole, exclusive_s=total, stages=dict(stage),
                        functions=dict(func.most_common(top)), kinds=dict(kind.most_common(top)),
                        load_average=os.getloadavg()[0])))


def print_memory(names):
  """Per preset: lowering and compile time of the jitted train step (nothing
  run, shapes only) and XLA's memory analysis of the compiled step: its
  temporary buffers are the working set a training process holds on top of
  params and optimiser state (on a GPU: device memory), whatever the dataset's
  size; and this process's peak RSS after compiling (what the compile costs)."""
  rows = []
  for name in names:
    cfg = config.get_config(name)
    net = _nets.make_nets(cfg)
    like = jax.eval_shape(lambda: train_step.init_state(cfg, jax.random.PRNGKey(0))[1])
    img = jax.ShapeDtypeStruct((cfg.batch_size, cfg.image_size, cfg.image_size, 3), jnp.float32)
    t = time.perf_counter()
    low = train_step.make_train_step(net, cfg).lower(like, img, structure.resolve_structure(cfg))
    t_low = time.perf_counter() - t
    comp = low.compile()
    t_comp = time.perf_counter() - t - t_low
    m = comp.memory_analysis()
    gb = lambda v: round(v / 2**30, 2)
    r = dict(preset=name, batch=cfg.batch_size, image_size=cfg.image_size,
             lower_s=round(t_low, 1), compile_s=round(t_comp, 1),
             temp_gb=gb(m.temp_size_in_bytes), argument_gb=gb(m.argument_size_in_bytes),
             output_gb=gb(m.output_size_in_bytes),
             peak_rss_after_compile_gb=gb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                          * 1024))
    rows.append(r)
    print(f"{name:<10} batch {r['batch']:>3} {r['image_size']}px: step temporaries "
          f"{r['temp_gb']:.2f} GB, arguments {r['argument_gb']:.2f} GB, outputs "
          f"{r['output_gb']:.2f} GB | lower {r['lower_s']:.0f} s, compile {r['compile_s']:.0f} s"
          f" | peak RSS so far {r['peak_rss_after_compile_gb']:.2f} GB", flush=True)
  print(json.dumps(dict(memory=rows, load_average=os.getloadavg()[0])))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--presets", default="cpu_small,paper")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--matmul-n", type=int, default=2048)
  p.add_argument("--layers", action="store_true", help="per-layer conv timings instead")
  p.add_argument("--profile", action="store_true",
                 help="per-part timings of the step (first preset of --presets)")
  p.add_argument("--ops", action="store_true",
                 help="per-op profile of the whole step (jax.profiler): exclusive time by "
                 "stage, by scr_jax function and by XLA op kind (first preset)")
  p.add_argument("--rule", action="store_true",
                 help="conv2d's per-layer rule: each layer on both paths (first preset)")
  p.add_argument("--paths", nargs="?", const=f"0,{MAX_PATCH_DEFAULT},{1 << 40}",
                 metavar="LIMITS", help="whole step per MATMUL_MAX_PATCH value "
                 "(comma list; default: all lax, the rule, all matmul; first preset)")
  p.add_argument("--memory", action="store_true",
                 help="the compiled step's memory (XLA memory analysis) and compile time")
  args = p.parse_args()
  if args.memory:
    return print_memory(args.presets.split(","))
  if args.rule:
    return print_rule(args.presets.split(",")[0], args.repeats)
  if args.paths:
    return bench_paths(args.presets.split(",")[0], args.repeats,
                       [int(v) for v in args.paths.split(",")])
  if args.layers:
    return bench_layers(args.repeats)
  if args.ops:
    return print_ops(args.presets.split(",")[0], args.repeats)
  if args.profile:
    return print_profile(args.presets.split(",")[0], args.repeats)
  dev = jax.devices()[0]
  print(f"jax {jax.__version__} on {dev.platform} ({dev.device_kind}), "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}", flush=True)
  peak, mm_t = matmul_rate(args.matmul_n)
  print(f"fp32 matmul {args.matmul_n}^3: {peak / 1e9:.1f} GFLOP/s ({mm_t * 1e3:.1f} ms)", flush=True)
  rows = []
  for name in args.presets.split(","):
    r = bench_preset(name, args.repeats)
    r["fraction_of_matmul"] = r["flops_per_s"] / peak
    rows.append(r)
    print(f"{name:<10} batch {r['batch']:>3} {r['image_size']}px: step {r['step_s'] * 1e3:9.1f} ms"
          f" | {r['images_per_s']:7.1f} img/s | {r['flops'] / 1e9:8.2f} GFLOP/step"
          f" | {r['flops_per_s'] / 1e9:7.1f} GFLOP/s = {r['fraction_of_matmul']:.2f} x matmul"
          f" | compile {r['compile_s']:.0f}s", flush=True)
  peak2, _ = matmul_rate(args.matmul_n)  # again: the machine may have changed
  print(json.dumps(dict(platform=dev.platform, matmul_flops_per_s=peak,
                        matmul_flops_per_s_after=peak2, presets=rows,
                        load_average=os.getloadavg()[0])))


if __name__ == "__main__":
  main()
