"""scr-jax command line: data, train, eval, predict, main (the `make run` job).

`main(argv)` is the entry of both `python experiments/run.py ...` (the
documented one, a shim) and the `scr-jax` console script (pyproject.toml):

  python experiments/run.py data --out DIR [--n-train N --n-val N --n-test N --size S --seed K]
      [--variant NAME]  (synthetic.VARIANTS: default, wide_pose, ..., morph, cat, car, stress)
  python experiments/run.py prepare --data DIR --out DS [--image-size 64 --crop N --workers K]
  python experiments/run.py train --preset cpu_small --data DIR|builtin[:VARIANT] --workdir W [--steps N]
      [--seed K] [--variant independent|dense|generic|dynamic] [--order DVAL] [--q sigmoid]
      [--structure FILE] [--set key=value ...] [--no-resume --restart] [--init-from W0]
      [--distributed]
  python experiments/run.py eval --workdir W --data DIR|builtin --split test [--out F.json]
      [--save-predictions F.npz]
  python experiments/run.py predict --workdir W --images DIR_or_files --out OUTDIR
      [--crop none|train|N] [--detect-faces] [--skip-bad] [--no-recursive] [--video-size PX]
      [--outputs depth,normal,mesh,...] [--no-video]
  python experiments/run.py diagnose --workdir W --data DIR|builtin[:VARIANT] [--split test]
  python experiments/run.py main --workdir W     (data + train + eval + predict + summary)
  python experiments/run.py import-unsup3d CHECKPOINT.pth --workdir W   (Unsup3D's weights)

A mistake in the input (bad folder, unknown preset, wrong type...) prints one
line `error: ...` and exits with status 2; no traceback.
"""
from __future__ import annotations

import argparse
import errno
import glob
import json
import os
import sys

# The source checkout this module lives in (an editable install); set before
# jax is imported, which reads these once.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Persistent XLA compile cache: reruns, resumes and repeated runs of one
# config skip compilation (set JAX_COMPILATION_CACHE_DIR to move or share it).
# In a checkout: ROOT/.jax_cache (as before); an installed copy: the user's cache.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".jax_cache")
                      if os.path.exists(os.path.join(ROOT, "pyproject.toml"))
                      else os.path.join(os.path.expanduser("~"), ".cache", "scr_jax", "jax"))

import jax  # noqa: E402

from scr_jax import (  # noqa: E402
    cliutil, config, data, dataset, export, predict as predict_lib, prepare, reproduce, runner,
    search, unsup3d_import)
from scr_jax.errors import NonFiniteError, StopRequested, UserError  # noqa: E402


# ----------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------

def cmd_data(args):
  for name in ("n_train", "n_val", "n_test"):
    if getattr(args, name) < 0:
      raise UserError(f"--{name.replace('_', '-')} must be >= 0")
  variant = data.get_variant(args.variant)
  size = args.size if args.size is not None else (variant.export_size or 64)
  if size < 8:
    raise UserError(f"--size must be >= 8, got {size}")
  if not args.overwrite:
    old = [p for p in sorted(glob.glob(os.path.join(glob.escape(args.out), "*", "*", "*.png")))
           if p.endswith(("_image.png", "_depth.png"))]
    if old:
      raise UserError(f"--out {args.out} already holds {len(old)} synface images (e.g. {old[0]}); "
                      "add --overwrite to replace them, or give another --out")
  meta = data.export_synface(args.out, args.n_train, args.n_val, args.n_test, size,
                             args.seed, depth_bits=args.depth_bits, overwrite=args.overwrite,
                             cfg=variant.gen)
  prev = os.path.join(args.out, "preview.png")
  d = data.load_synface(args.out, "train", None, None, limit=8) if args.n_train else None
  if d is not None:
    data.preview_grid(d["images"], d["depth"], prev)
    cliutil.log(f"preview: {prev}")
  print(json.dumps(meta, indent=1, default=str))


def cmd_prepare(args):
  src = args.data
  if src == "builtin" or src.startswith("builtin:"):
    cfg = config.override(config.get_config("cpu_small"), [f"image_size={args.image_size}"])
    src = dataset.resolve_data(src, cfg)
  runner.check_data_arg(src)
  man = prepare.prepare(src, args.out, args.image_size, args.crop, args.workers,
                        overwrite=args.overwrite)
  print(json.dumps(man, indent=1))


def make_config(args):
  """The config of --preset, --set and the flags that are shorthands for --set."""
  return runner.make_config(args.preset, args.set, cliutil.log,
                            **{f: getattr(args, f, None) for f in runner.CONFIG_FLAGS})


def cmd_train(args):
  cfg = make_config(args)
  if args.distributed:
    init_distributed()  # (main() did it already, before starting the backend)
  res = runner.train_run(cfg, args.workdir, args.data,
                         candidates=getattr(args, "candidates", None), resume=args.resume,
                         restart=getattr(args, "restart", False), max_seconds=args.max_seconds,
                         init_from=getattr(args, "init_from", None), log=cliutil.log,
                         cache=getattr(args, "cache", None),
                         workers=getattr(args, "workers", None))
  if res["reason"] in ("SIGINT", "SIGTERM"):
    sys.exit(130 if res["reason"] == "SIGINT" else 143)
  return res


def cmd_import_unsup3d(args):
  """Unsup3D's PyTorch checkpoint -> an independent-SCR workdir (step 0)."""
  if not os.path.isfile(args.checkpoint):
    raise UserError(f"{args.checkpoint}: not found" if not os.path.exists(args.checkpoint)
                    else f"{args.checkpoint} is a folder, not a .pth file")
  cfg = make_config(args)
  unsup3d_import.import_checkpoint(args.checkpoint, args.workdir, cfg, log=cliutil.log)
  cliutil.log(f"imported {args.checkpoint} into {args.workdir} (step 0, independent SCR, preset "
              f"{cfg.preset}); evaluate with `eval --workdir {args.workdir}`, fine-tune with "
              f"`train --preset {cfg.preset} --workdir {args.workdir}` or, with another structure, "
              f"`train --init-from {args.workdir} --workdir NEW ...`")


def cmd_search(args):
  """Structure search: writes WORKDIR/structure.json (+ trace JSON and PNG)
  (`search.run_search`)."""
  return search.run_search(
      args.workdir, args.data, args.method, preset=args.preset, sets=args.set, seed=args.seed,
      budget_steps=args.budget_steps, cache=args.cache, threshold=args.threshold,
      on_cycle="raise-threshold" if args.raise_threshold_to_dag else args.on_cycle,
      unroll=args.unroll, inner=args.inner, outer_lr=args.outer_lr, lam_dag=args.lam_dag,
      augmented=args.augmented, keep_weights=args.keep_weights, init=args.init,
      evals=args.evals, batch=args.batch, objective=args.objective, order=args.order,
      structure_path=args.structure)


def cmd_reproduce(args):
  """Tables 1-2, Figures 6 and 8, beyond-default rows; resumable (scr_jax/reproduce.py)."""
  text = reproduce.from_args(args, "python experiments/run.py " + " ".join(args.argv))
  if args.report:
    print(text)


def cmd_eval(args):
  """SIDE / MAD of a trained workdir on a split (`runner.eval_run`); prints JSON."""
  summ = runner.eval_run(args.workdir, args.data, args.split, cache=args.cache,
                         save_predictions=args.save_predictions)
  text = json.dumps(summ, indent=1)
  print(text)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
      fh.write(text + "\n")
  return summ


def cmd_diagnose(args):
  """What each factor learned, against the generator's ground truth
  (`runner.diagnose_run`): printed, JSON and a picture grid."""
  return runner.diagnose_run(args.workdir, args.data, args.split, limit=args.limit,
                             rows=args.rows, out=args.out,
                             candidate=getattr(args, "candidate", None))


def cmd_predict(args):
  """Pictures, depth, albedo, light, view, mesh and turn-tables per input
  (`scr_jax.predict.predict`)."""
  return predict_lib.predict(
      args.workdir, args.images, args.out, crop=getattr(args, "crop", "none"),
      detect_faces=getattr(args, "detect_faces", False),
      skip_bad=getattr(args, "skip_bad", False), recursive=getattr(args, "recursive", True),
      video_size=getattr(args, "video_size", 256), candidate=getattr(args, "candidate", None),
      outputs=getattr(args, "outputs", None), video=getattr(args, "video", True))


def cmd_main(args):
  """`make run`: built-in data -> train cpu_small -> eval -> predict -> summary
  (`runner.quickstart`)."""
  return runner.quickstart(args.workdir, steps=args.steps, max_seconds=args.max_seconds,
                           sets=args.set)


def build_parser(prog: str = "run.py"):
  p = cliutil.Parser(prog=prog, description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="cmd", required=True)

  d = sub.add_parser("data", help="write the built-in synthetic data in synface layout")
  d.add_argument("--out", required=True)
  d.add_argument("--n-train", type=int, default=800)
  d.add_argument("--n-val", type=int, default=100)
  d.add_argument("--n-test", type=int, default=100)
  d.add_argument("--size", type=int, help="image size (default: the variant's, else 64)")
  d.add_argument("--variant", default="default",
                 help="generator variant: " + ", ".join(data.VARIANTS))
  d.add_argument("--seed", type=int, default=0)
  d.add_argument("--depth-bits", type=int, default=16, choices=(8, 16))
  d.add_argument("--overwrite", action="store_true")
  d.set_defaults(fn=cmd_data)

  pr = sub.add_parser("prepare", help="decode a folder once into a prepared (TFDS "
                      "array_record) dataset that train / eval / search / reproduce stream")
  pr.add_argument("--data", required=True, help="synface folder, folder with split "
                  "sub-folders, folder of images, or builtin[:VARIANT]")
  pr.add_argument("--out", required=True)
  pr.add_argument("--image-size", type=int, default=64)
  pr.add_argument("--crop", type=int, help="centre crop (source px) before resizing "
                  "(default: the largest centred square)")
  pr.add_argument("--workers", type=int, help="decoding threads (default: CPU count, max 8)")
  pr.add_argument("--overwrite", action="store_true")
  pr.set_defaults(fn=cmd_prepare)

  def train_args(t):
    t.add_argument("--preset", default="cpu_small")
    t.add_argument("--data", default="builtin")
    t.add_argument("--workdir", required=True)
    t.add_argument("--steps", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--variant")
    t.add_argument("--order")
    t.add_argument("--q")
    t.add_argument("--structure")
    t.add_argument("--candidates", help="all24 or DVAL,DLVA,...: train these dense orderings "
                   "together (vmapped)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE")
    t.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="resume from the newest checkpoint (default); --no-resume on a workdir "
                   "that holds checkpoints is refused unless --restart is given")
    t.add_argument("--restart", action="store_true",
                   help="start over: move the workdir's previous checkpoints, config and logs "
                   "to W/previous-<time>/ first")
    t.add_argument("--distributed", action="store_true",
                   help="jax.distributed.initialize() from the environment (multi-host)")
    t.add_argument("--max-seconds", type=float, help="stop (and checkpoint) after this wall time")
    t.add_argument("--cache", metavar="DIR", help="where a raw --data folder is prepared on "
                   "first use (default: DIR.prepared/ beside it)")
    t.add_argument("--workers", type=int, help="threads decoding a raw folder on first use")

  t = sub.add_parser("train", help="train a model")
  train_args(t)
  t.add_argument("--init-from", metavar="W0", help="start from the parameters of W0's newest "
                 "checkpoint (e.g. an import-unsup3d workdir), fresh optimiser, any structure")
  t.set_defaults(fn=cmd_train)

  e = sub.add_parser("eval", help="SIDE / MAD of a trained model on a split")
  e.add_argument("--workdir", required=True)
  e.add_argument("--data", default="builtin")
  e.add_argument("--split", default="test")
  e.add_argument("--out")
  e.add_argument("--save-predictions")
  e.add_argument("--cache", metavar="DIR", help="where a raw --data folder is prepared")
  e.set_defaults(fn=cmd_eval)

  dg = sub.add_parser("diagnose", help="what each factor learned, against the generator's "
                      "ground truth (view, light, depth sign, shape spread) + a picture grid")
  dg.add_argument("--workdir", required=True)
  dg.add_argument("--data", default="builtin")
  dg.add_argument("--split", default="test")
  dg.add_argument("--limit", type=int, help="use the first N images of the split")
  dg.add_argument("--rows", type=int, default=8, help="images in the picture grid")
  dg.add_argument("--out", help="output path without extension (default W/diagnose_SPLIT)")
  dg.add_argument("--candidate", help="of a candidates workdir: the ordering (or index) to use")
  dg.set_defaults(fn=cmd_diagnose)

  pr = sub.add_parser("predict", help="depth, albedo, light, view, mesh and turn-tables for "
                      "images (one folder per input)")
  pr.add_argument("--workdir", required=True)
  pr.add_argument("--images", nargs="+", required=True,
                  help="image files and/or folders (read recursively; any format Pillow opens)")
  pr.add_argument("--out", required=True)
  pr.add_argument("--crop", default="none",
                  help="none (default: each input's largest centred square), train (the run's "
                  "--set crop), or N: centre crop of N px; then resized to the model's size")
  pr.add_argument("--detect-faces", action="store_true",
                  help="crop around the largest human or cat face (OpenCV Haar cascades); "
                  "no face: a note and the centre square (with --skip-bad: skipped)")
  pr.add_argument("--skip-bad", action="store_true",
                  help="go on past unreadable inputs, naming each (default: stop at the first), "
                  "and skip inputs whose crop is blank or one flat colour (default: a note)")
  pr.add_argument("--recursive", action=argparse.BooleanOptionalAction, default=True,
                  help="read sub-folders of folder inputs (default: yes)")
  pr.add_argument("--video-size", type=int, default=256,
                  help="pixels per panel of the MP4 turn-table, even (default 256)")
  pr.add_argument("--outputs", metavar="LIST",
                  help="what to write per input, a comma list of " + ", ".join(export.OUTPUTS)
                  + " (default: all; params.json is always written)")
  pr.add_argument("--video", action=argparse.BooleanOptionalAction, default=True,
                  help="write turn.mp4 / turn.webm (default; most of the time per input): "
                  "--no-video skips them")
  pr.add_argument("--candidate", help="of a candidates workdir: the ordering (or index) to use")
  pr.set_defaults(fn=cmd_predict)

  se = sub.add_parser("search", help="learn the structure M (writes WORKDIR/structure.json)")
  se.add_argument("--method", required=True, choices=("bo", "exhaustive", "unroll", "unroll-masked"))
  se.add_argument("--preset", default="cpu_small")
  se.add_argument("--data", default="builtin")
  se.add_argument("--cache", metavar="DIR", help="where a raw --data folder is prepared")
  se.add_argument("--workdir", required=True)
  se.add_argument("--seed", type=int, default=0)
  se.add_argument("--budget-steps", type=int,
                  help="bo: training steps per evaluated ordering; unroll: outer steps")
  se.add_argument("--evals", type=int, default=10, help="bo: orderings evaluated in all")
  se.add_argument("--init", type=int, default=4, help="bo: initial random orderings")
  se.add_argument("--batch", type=int, default=2, help="bo: orderings trained together per round")
  se.add_argument("--objective", default="val_loss", choices=("val_loss", "val_mad"),
                  help="bo: val_loss or val_mad")
  se.add_argument("--unroll", type=int, default=1, help="unroll: inner steps K")
  se.add_argument("--inner", default="adam", choices=("adam", "sgd"),
                  help="unroll: inner optimiser, adam (eps_root) or sgd")
  se.add_argument("--outer-lr", type=float, default=5e-2)
  se.add_argument("--lam-dag", type=float, default=1.0)
  se.add_argument("--augmented", action=argparse.BooleanOptionalAction, default=True,
                  help="unroll: the paper's augmented Lagrangian for h(M) (default); "
                  "--no-augmented: a fixed Lagrangian term --lam-dag * h(M)")
  se.add_argument("--threshold", type=float, default=None,
                  help="unroll: keep edges with |M| above this (default 0.1)")
  se.add_argument("--on-cycle", choices=("drop-weakest", "raise-threshold", "refuse"),
                  default="drop-weakest",
                  help="unroll: if the thresholded M still has a cycle, drop the weakest edge "
                  "on a cycle until it is a DAG, naming each (default); raise the threshold "
                  "instead; or refuse (needs an explicit --threshold)")
  se.add_argument("--raise-threshold-to-dag", action="store_true",
                  help="the same as --on-cycle raise-threshold")
  se.add_argument("--keep-weights", action="store_true",
                  help="keep M's values above the threshold instead of binarising")
  se.add_argument("--order", help="unroll-masked: the dense ordering")
  se.add_argument("--structure", help="unroll-masked: structure.json of a dense result")
  se.add_argument("--set", action="append", metavar="KEY=VALUE")
  se.set_defaults(fn=cmd_search)

  rp = sub.add_parser("reproduce", help="the paper's tables and figures, resumably")
  reproduce.add_arguments(rp)  # its flags live with it
  rp.set_defaults(fn=cmd_reproduce)

  im = sub.add_parser("import-unsup3d", help="convert Unsup3D's PyTorch checkpoint "
                      "(netD/netA/netL/netV/netC) into a workdir")
  im.add_argument("checkpoint", metavar="CHECKPOINT.pth")
  im.add_argument("--workdir", required=True)
  im.add_argument("--preset", default="paper", help="Unsup3D's widths at 64 px: paper")
  im.add_argument("--set", action="append", metavar="KEY=VALUE",
                  help="config overrides saved with the run (e.g. crop=0 for pre-cropped faces)")
  im.set_defaults(fn=cmd_import_unsup3d)

  mn = sub.add_parser("main", help="the `make run` job")
  mn.add_argument("--workdir", default="runs/main")
  mn.add_argument("--steps", type=int)
  mn.add_argument("--max-seconds", type=float, help="wall time of the whole job: training stops "
                  "early enough to leave time for the evaluation and predict")
  mn.add_argument("--set", action="append", metavar="KEY=VALUE")
  mn.set_defaults(fn=cmd_main)
  return p


# Every path a command writes, checked before any model is loaded or data read:
# command -> (argument attribute, flag, "dir" | "file" | "npz").
_OUTPUTS = {
    "data": [("out", "--out", "dir")],
    "prepare": [("out", "--out", "dir")],
    "train": [("workdir", "--workdir", "dir")],
    "eval": [("out", "--out", "file"), ("save_predictions", "--save-predictions", "npz")],
    "predict": [("out", "--out", "dir")],
    "search": [("workdir", "--workdir", "dir")],
    "reproduce": [("out", "--out", "dir")],
    "main": [("workdir", "--workdir", "dir")],
    "import-unsup3d": [("workdir", "--workdir", "dir")],
}
# Commands that run JAX: its backend is started (and checked) before they run.
_JAX_COMMANDS = ("train", "eval", "predict", "search", "reproduce", "main", "import-unsup3d")


def check_output_path(path: str, flag: str, kind: str):
  """Refuses an output path that cannot be written, in one line.

  kind: "dir" (a folder, created if missing), "file" or "npz" (a file whose
  folder is created if missing; "npz" must end in .npz, as numpy would add it).

  Raises:
    UserError: the path is empty, exists as the other kind, lies under a file,
      or its nearest existing folder is not writable.
  """
  if not path:
    raise UserError(f"{flag}: empty path")
  if os.path.exists(path):
    if kind == "dir" and not os.path.isdir(path):
      raise UserError(f"{flag} {path} is a file, not a folder: give a folder (new or existing)")
    if kind != "dir" and os.path.isdir(path):
      raise UserError(f"{flag} {path} is a folder: give a file name")
    where = path if kind == "dir" else os.path.dirname(os.path.abspath(path))
    if not os.access(where, os.W_OK):
      raise UserError(f"{flag} {path}: not writable ({_why_unwritable(where)})")
  else:
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
      parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
      raise UserError(f"{flag} {path}: cannot be created, {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
      raise UserError(f"{flag} {path}: not writable, cannot be created in {parent} "
                      f"({_why_unwritable(parent)})")
  if kind == "npz" and not path.endswith(".npz"):
    raise UserError(f"{flag} {path}: give a file name ending in .npz")


def _why_unwritable(folder: str) -> str:
  try:
    if os.statvfs(folder).f_flag & os.ST_RDONLY:
      return os.strerror(errno.EROFS)
  except OSError:
    pass
  return os.strerror(errno.EACCES)


def init_distributed():
  """jax.distributed.initialize() from the cluster's environment (once, and
  before anything starts JAX's backend); a missing setup is one line."""
  if jax.distributed.is_initialized():
    return
  if os.environ.get("JAX_PLATFORMS", "") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize()
  except (ValueError, RuntimeError) as e:
    why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise UserError(f"--distributed: jax.distributed.initialize() failed ({why}); run each "
                    "process under SLURM, Open MPI (mpirun), Kubernetes or a Cloud TPU pod, "
                    "whose environment gives JAX the coordinator, process count and id") from None


def check_jax_backend():
  """Starts JAX's backend; a missing one (JAX_PLATFORMS=cuda on a CPU-only
  install, a TPU without libtpu, a misspelt platform) becomes one line that
  says what to install or set.

  Raises:
    UserError: JAX cannot be imported or cannot start the requested backend.
  """
  want = os.environ.get("JAX_PLATFORMS", "")
  try:
    jax.devices()
  except ImportError as e:
    raise UserError(f"cannot import jax ({e}); install the pinned packages: "
                    "pip install -r requirements.txt") from None
  except (RuntimeError, AssertionError, ValueError) as e:
    why = (str(e).strip().splitlines() or [""])[0].split(" (set JAX_PLATFORMS")[0]
    if not why:  # jax asserts without a message when no plugin answers
      why = "no installed jaxlib plugin provides it"
    plats = [p.strip() for p in want.split(",") if p.strip()]
    hint = []
    if any(p in ("cuda", "gpu") for p in plats):
      hint.append(f'for an NVIDIA GPU install pip install "jax[cuda12]=={jax.__version__}" '
                  "(cuda13 for a CUDA 13 driver)")
    if "tpu" in plats:
      hint.append(f'for a TPU install pip install "jax[tpu]=={jax.__version__}"')
    hint.append(("or " if hint else "") + "set JAX_PLATFORMS=cpu (or unset it) to run on the CPU")
    raise UserError(f"JAX cannot start the backend JAX_PLATFORMS={want!r} asks for ({why[:200]}); "
                    + ", ".join(hint)) from None


def main(argv=None):
  """Runs one command (argv: the arguments, default sys.argv[1:]); exits 2 on
  a UserError, 3 on a non-finite step, 130 / 143 when interrupted."""
  # `scr-jax --help` names itself; every other entry is run.py, as documented.
  prog = "scr-jax" if os.path.basename(sys.argv[0] or "") == "scr-jax" else "run.py"
  argv = list(sys.argv[1:] if argv is None else argv)
  args = build_parser(prog).parse_args(argv)
  args.argv = argv  # as given (recorded with reproduce's report)
  try:
    for attr, flag, kind in _OUTPUTS.get(args.cmd, ()):
      if getattr(args, attr, None) is not None:
        check_output_path(getattr(args, attr), flag, kind)
    if getattr(args, "distributed", False):
      init_distributed()
    if args.cmd in _JAX_COMMANDS:
      check_jax_backend()
    args.fn(args)
  except UserError as e:
    cliutil.fail(e, 2)
  except NonFiniteError as e:
    cliutil.fail(e, 3)
  except StopRequested as e:  # a search / reproduce training stopped by a signal
    cliutil.log(str(e))
    sys.exit(e.exit_code)
  except OSError as e:  # the disk filled up / went read-only mid-run: one line too
    if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG):
      raise
    cliutil.fail(f"{e.filename}: {e.strerror}" if e.filename else e.strerror, 2)
  except KeyboardInterrupt:
    cliutil.log("interrupted")
    sys.exit(130)
