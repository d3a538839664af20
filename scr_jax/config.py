"""One typed config per experiment, named presets, CLI overrides.

`get_config("cpu_small")` returns a frozen dataclass; `override(cfg, ["lr=3e-4"])`
applies `--set key=value` strings with type checking (one-line errors).
"""
from __future__ import annotations

import dataclasses
import json
import typing

from scr_jax.errors import UserError

FACTORS = ("V", "D", "L", "A")

# Fields a resumed run may change without changing what the weights learn
# (logging, evaluation and checkpoint intervals, how far to train, the preset's
# name, what to do on a non-finite step). `order`, `structure`, `variant` and
# `q` only say where the structure came from: the structure trained (M, q) is
# compared instead. Any other difference refuses a resume (checkpoint.check_resume).
HARMLESS_FIELDS = ("preset", "steps", "log_every", "eval_every", "ckpt_every",
                   "keep_checkpoints", "num_eval_images", "on_nonfinite", "order", "structure",
                   "variant", "q")


@dataclasses.dataclass(frozen=True)
class Warmup:
  """The training-only warm-ups (0 steps = off = Unsup3D), one group of Config.

  Each holds part of the model fixed early in training; `warmup.warmups(cfg,
  step)` turns them into the scales the forward pass and the loss apply, and
  evaluation always sees the free model. On disk and in `--set` each field
  keeps its flat name `<kind>_warmup_<what>` (`depth_steps` is
  `depth_warmup_steps`, see `FLAT_WARMUP`), so older config.json files load
  unchanged. Adding a warm-up: a field here, its scale in `warmup.Warmups`
  (with its schedule in `warmup.warmups`) and the one place that applies it.
  """
  # Confidence: for the first N steps the predicted confidence maps are
  # replaced by sigma = 1, so the flipped twin's loss cannot be discounted
  # while the view is still being learned.
  conf_steps: int = 0
  # Symmetry: the canonical depth and albedo are forced left-right symmetric
  # for the first half of N steps and released linearly over the second half,
  # so every asymmetry of the input must first be explained by the view (yaw)
  # rather than absorbed into an asymmetric canonical face.
  sym_steps: int = 0
  # Which canonical maps the symmetry warm-up holds symmetric: "depth,albedo"
  # (both), "albedo" or "depth".
  sym_maps: str = "depth,albedo"
  # Translation: the view's x/y/z translation is held at 0 for the first half
  # of N steps and released linearly over the second half. A free translation
  # early on absorbs the yaw (a turned face is explained as a shifted one and
  # the yaw collapses; docs/learning.md).
  trans_steps: int = 0
  # Tilt: the same schedule for the view's pitch and roll, so that early on
  # only the yaw (the pose that the flipped twin measures) can explain the
  # input's asymmetry.
  tilt_steps: int = 0
  # Depth: the depth net's output is scaled by the same schedule, so the view
  # is first learned against the fixed convex prior shape (`depth_prior`),
  # which settles the sign of the yaw before the shape is free to change
  # (convex/concave ambiguity).
  depth_steps: int = 0
  # Prior: the convex prior (`depth_prior`) as a scaffold only: applied at
  # its full amplitude for the first half of N steps, faded linearly to 0 by
  # N, and absent from the trained model. Why: a fixed ellipsoid kept forever
  # biases every shape towards it (a deeper relief that the light then
  # compensates by turning frontal: docs/learning.md, the bas-relief trade).
  # Measured (session 18): fading it by step 500 mirrored a morph seed; off.
  prior_steps: int = 0
  # Light: the light's intensities (ambient, diffuse) are held at their
  # initial 0.5 / 0.5 for the first half of N steps and released linearly
  # over the second half (the direction stays free). Why: on a dark
  # background most pixels ask for black; one global intensity per image
  # gives it to them faster than the albedo can, the render goes black, the
  # tanh saturates and no gradient reaches any factor again (the collapsed
  # runs of docs/learning.md). Held, the albedo learns the background first.
  light_steps: int = 0
  # Fitted light (`Config.light_fit` > 0): the light network's light for
  # the first half of N steps, then blended linearly into the fitted one by
  # N. Why: fitted from step 0, while albedo and view are still untrained, a
  # per-image light explains the pose's shading cues before the view net
  # learns them (morph seed 0: constant view; docs/learning.md, session 19).
  fit_steps: int = 0

  def any_on(self) -> bool:
    """Whether any warm-up runs (any `*_steps` > 0)."""
    return any(getattr(self, f.name) > 0 for f in dataclasses.fields(self)
               if f.name.endswith("_steps"))

  def sym_map_names(self) -> tuple:
    """The canonical maps the symmetry warm-up holds, e.g. ("depth", "albedo")."""
    return tuple(m.strip() for m in self.sym_maps.split(","))


def _flat_name(field: str) -> str:
  kind, what = field.split("_", 1)
  return f"{kind}_warmup_{what}"


# The flat (on-disk, `--set`) name of each Warmup field: depth_warmup_steps ->
# depth_steps, ...
FLAT_WARMUP = {_flat_name(f.name): f.name for f in dataclasses.fields(Warmup)}


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything a run needs; saved as config.json beside its checkpoints."""
  preset: str = "cpu_small"
  # Data / camera (Unsup3D synface defaults).
  image_size: int = 32
  crop: int = 0  # centre crop (pixels of the stored image) before resizing; 0 = none
  fov: float = 10.0
  min_depth: float = 0.9
  max_depth: float = 1.1
  rot_center_depth: float = 1.0
  xyz_rotation_range: float = 60.0  # degrees, tanh-scaled view rotations
  xy_translation_range: float = 0.1
  z_translation_range: float = 0.0
  # Networks: encoders f1 into a common d-dim space, shallow decoders f2.
  embed_dim: int = 64  # d: the common embedding size (Unsup3D's zdim 256)
  nf_encoder: int = 16  # width of the V and L encoders (Unsup3D: 32)
  nf_ed: int = 16  # width of the D and A encoder-decoders (Unsup3D: 64)
  nf_conf: int = 16  # width of the confidence net (Unsup3D: 64)
  conf_zdim: int = 32  # confidence-net bottleneck (Unsup3D: 128)
  # Structure (SCR variant).
  variant: str = "independent"  # independent | dense | generic | dynamic
  order: str = ""  # dense/dynamic ordering, e.g. "DVAL"; "random" picks from the seed
  q: str = "sigmoid"  # dynamic SCR attention: sigmoid | cosine
  structure: str = ""  # path of a structure.json (generic / dense from search)
  # How parents' embeddings enter a child (structure.mix): "sum" is Eq. 3 as the
  # paper writes it; "balanced" rescales each parent's embedding to the child's
  # own norm, per image (issue 21 item 7: the D / A embeddings are ~3x the V / L
  # ones at initialisation, so under "sum" a V or L child mostly reads its parents).
  mix_scale: str = "sum"
  # False: a child reads its parents' embeddings, but its loss does not train
  # their encoders (item 7: is a structure's effect its input or its gradients?).
  mix_parent_grad: bool = True
  # Loss.
  lam_flip: float = 0.5
  lam_perc: float = 0.0  # VGG perceptual loss weight (needs user-supplied weights)
  # A barrier against the black-render collapse: the loss gains
  # lam_light_floor * mean(max(0, light_floor - (ambient + diffuse))), zero for
  # any model whose light is on (0 = off, Unsup3D). Why: on dark backgrounds
  # the light's intensities can saturate at 0 early, the render goes black and
  # no gradient reaches any factor again (docs/learning.md, session 18); the
  # barrier keeps them off the tanh's flat end until the albedo has learned
  # the background, and changes nothing where the light never drops that low.
  light_floor: float = 0.0
  lam_light_floor: float = 100.0
  # The light fitted in closed form per image (0 = off: the light network's
  # prediction, Unsup3D). >0: ambient and the diffuse light vector become the
  # least-squares fit of the image to albedo x (ambient + n . l) over the
  # canonical pixels (original and flipped twin, one shared light), ridged
  # towards the light network's prediction with this weight; the gradient
  # flows through the solve (variable projection). Why: a regressed light
  # 8-13 degrees off costs the loss 2-5x what each image's own shape gains,
  # so the depth's per-image freedom goes into compensating the light
  # (docs/learning.md, the bas-relief trade); a fitted light is the best
  # light for the current depth and albedo on every image.
  light_fit: float = 0.0
  # Floor added to the predicted confidence sigma (0 = Unsup3D). On data with
  # a flat black background, sigma there shrinks without bound and its 1/sigma
  # weight then dominates every gradient (see README, "Learning on CPU").
  min_sigma: float = 0.0
  # Fixed convex offset added to the raw depth output (0 = Unsup3D): the
  # canonical depth starts as a gentle ellipsoid instead of flat, which breaks
  # the convex/concave (bas-relief) ambiguity towards convex objects.
  depth_prior: float = 0.0
  # The prior's ellipse "a,b,cx,cy" (half-axes and centre in normalised image
  # units, u, v in [-1, 1]); "" = 0.8,0.9,0,0; "fit" = fitted to the mean
  # object silhouette of the training images when training starts (the
  # fitted numbers are saved with the run: model.fit_prior_ellipse).
  depth_prior_ellipse: str = ""
  # The training-only warm-ups (all off = Unsup3D), one group: see `Warmup`.
  warmup: Warmup = dataclasses.field(default_factory=Warmup)
  vgg_weights: str = ""
  # Optimisation.
  batch_size: int = 32
  lr: float = 1e-4
  lr_view_mult: float = 1.0  # lr multiplier of the view encoder and head (1 = Unsup3D)
  # Cosine learning-rate decay (0 = constant, Unsup3D): the lr falls from `lr`
  # at step 0 to 5% of it at this step (Loshchilov & Hutter, SGDR, 2017), then
  # stays there.
  lr_cosine_steps: int = 0
  # Linear learning-rate warm-up (0 = none, Unsup3D): the lr rises from
  # lr / N at the first update to lr at update N. Why: Adam's first updates
  # move every weight by about lr whatever its gradient's size, which at this
  # preset's lr can push whole encoders into dead ReLUs before they have read
  # the data.
  lr_warmup_steps: int = 0
  weight_decay: float = 5e-4  # coupled L2 added to the gradient, as Unsup3D
  # "coupled" (Unsup3D: wd * p added to the gradient before Adam) or
  # "decoupled" (AdamW, Loshchilov & Hutter 2019: p shrinks by lr * wd per
  # step after Adam). Why: coupled decay goes through Adam's normalisation,
  # so a network whose loss gradient is small (a warm-up scaling it near 0)
  # is pulled to 0 at about lr per step and can be erased.
  weight_decay_mode: str = "coupled"
  steps: int = 2000
  seed: int = 0
  # Best of K initialisations (scr_jax/init_trials.py): K network
  # initialisations train init_trial_steps steps side by side, the run starts
  # from the lowest training loss. 1 = off. init_choice is the choice, saved
  # with the run (-1: not chosen; 0 is the plain initialisation of `seed`).
  init_trials: int = 1
  init_trial_steps: int = 100
  init_choice: int = -1
  # "both": each initialisation is also tried without the depth warm-up (a
  # warm-up that holds the shape at the convex prior decides the yaw's sign
  # right on faces but mirrors it on shapes far from the prior, e.g. a car);
  # the winner's depth warm-up is saved with the run. "same": the config's.
  init_trial_depth_warmup: str = "same"
  # Only plausible candidates compete, unless none is: a canonical depth
  # convex on most of the trial's last batch (`diagnostics.relief` > 0; the
  # photometric loss alone prefers a mirrored, hollow shape as often as the
  # right one) and views inside their range on most images (no rotation
  # beyond 0.9 x xyz_rotation_range: a view run to its tanh bound explains
  # the image as a tilted screen, at a low loss) that vary over the images
  # (a constant view is a view net that stopped reading the image).
  init_trial_checks: bool = True
  # Bookkeeping.
  log_every: int = 25
  eval_every: int = 250
  ckpt_every: int = 250
  keep_checkpoints: int = 3
  num_eval_images: int = 256  # val images used for periodic validation
  on_nonfinite: str = "stop"  # stop | skip

  def trials_wanted(self) -> bool:
    """Whether `init_trials.resolve_init` still has to choose the
    initialisation: more than one candidate (init_trials > 1, or the depth
    warm-up tried both ways) and no init_choice yet."""
    both = self.init_trial_depth_warmup == "both" and self.warmup.depth_steps > 0
    return self.init_choice < 0 and (self.init_trials > 1 or both)

  def to_json(self) -> str:
    """The config as JSON, flat: the warm-ups under their flat names
    (`FLAT_WARMUP`), as config.json has always held them."""
    flat = dataclasses.asdict(self)
    group = flat.pop("warmup")
    flat.update({_flat_name(k): v for k, v in group.items()})
    return json.dumps(flat, indent=2, sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> "Config":
    """A validated Config from `to_json`'s text (any older config.json too:
    fields it lacks take their defaults). Raises UserError on unknown fields."""
    raw = json.loads(text.lstrip("\ufeff"))  # a byte-order mark from a Windows editor
    names = {f.name for f in dataclasses.fields(cls)} - {"warmup"}
    unknown = sorted(set(raw) - names - set(FLAT_WARMUP))
    if unknown:
      raise UserError(f"config has unknown fields: {', '.join(unknown)}")
    return validate(replace(cls(), **raw))


PRESETS = {
    # Fits 2 CPU cores: 32x32, narrow nets; a higher lr (5x more for the view
    # net), a confidence floor, a convex initial depth, and short warm-ups of
    # the view translation and of the depth net (the yaw is learned against
    # the convex prior first; 600-step warm-ups broke data with real shifts)
    # and of pitch / roll (with all six pose outputs free when the translation
    # is released, the view could run away to the tanh limits within ~15
    # steps and never come back), measured in README "Learning on CPU"; and a
    # barrier that keeps the light on (`light_floor`: on dark backgrounds the
    # light's intensities went to 0 within ~5 steps on some seeds, a black
    # render from which nothing learns; zero wherever the light stays on);
    # and the light fitted per image in closed form (`light_fit`, after the
    # view has learned the pose: `fit_steps`), which on the default data
    # took both seeds below the template (docs/learning.md, session 19).
    "cpu_small": Config(lr=5e-4, lr_view_mult=5.0, min_sigma=0.05, depth_prior=1.0,
                        light_floor=0.2, light_fit=0.1,
                        warmup=Warmup(trans_steps=200, depth_steps=300, tilt_steps=300,
                                      fit_steps=600)),
    # The paper / Unsup3D setting: 64x64 synface, Unsup3D widths, batch 64.
    "paper": Config(preset="paper", image_size=64, crop=170, embed_dim=256,
                    nf_encoder=32, nf_ed=64, nf_conf=64, conf_zdim=128,
                    batch_size=64, lr=1e-4, steps=30 * 1000, lam_perc=1.0,
                    log_every=50, eval_every=1000, ckpt_every=1000),
    # For tests: tiny and fast.
    "test_tiny": Config(preset="test_tiny", image_size=16, embed_dim=16, nf_encoder=8,
                        nf_ed=8, nf_conf=8, conf_zdim=8, batch_size=4, steps=4,
                        log_every=1, eval_every=2, ckpt_every=2, num_eval_images=8),
}


def get_config(preset: str) -> Config:
  if preset not in PRESETS:
    raise UserError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
  return PRESETS[preset]


def _parse_value(name: str, typ, text: str):
  if typ in (int, "int"):
    try:
      return int(text)
    except ValueError:
      raise UserError(f"--set {name}: expected an integer, got {text!r}") from None
  if typ in (float, "float"):
    try:
      return float(text)
    except ValueError:
      raise UserError(f"--set {name}: expected a number, got {text!r}") from None
  if typ in (bool, "bool"):
    if text.lower() in ("1", "true", "yes", "on"):
      return True
    if text.lower() in ("0", "false", "no", "off"):
      return False
    raise UserError(f"--set {name}: expected true/false, got {text!r}")
  return text


def _field_types() -> dict:
  """Every settable name -> its type: Config's fields, and the warm-ups under
  both their flat names (depth_warmup_steps) and grouped ones (warmup.depth_steps)."""
  hints = typing.get_type_hints(Config)
  del hints["warmup"]
  group = typing.get_type_hints(Warmup)
  hints.update({flat: group[f] for flat, f in FLAT_WARMUP.items()})
  hints.update({f"warmup.{f}": t for f, t in group.items()})
  return hints


def replace(cfg: Config, **changes) -> Config:
  """dataclasses.replace that also takes the warm-ups by their flat names
  (`depth_warmup_steps=300`, as config.json and `--set` name them) or as a
  whole `warmup=Warmup(...)`. Not validated (`override` and `from_json` are)."""
  group = {FLAT_WARMUP[k]: changes.pop(k) for k in list(changes) if k in FLAT_WARMUP}
  if group:
    changes["warmup"] = dataclasses.replace(changes.get("warmup", cfg.warmup), **group)
  return dataclasses.replace(cfg, **changes)


def override(cfg: Config, assignments) -> Config:
  """Applies 'key=value' strings; unknown keys and bad types are UserErrors.

  A warm-up is named flat (`depth_warmup_steps=300`) or grouped
  (`warmup.depth_steps=300`)."""
  hints = _field_types()
  changes = {}
  for item in assignments or ():
    if "=" not in item:
      raise UserError(f"--set expects key=value, got {item!r}")
    key, value = item.split("=", 1)
    key = key.strip()
    if key not in hints:
      raise UserError(f"--set {key}: unknown config field (see scr_jax/config.py)")
    value = _parse_value(key, hints[key], value.strip())
    changes[_flat_name(key[len("warmup."):]) if key.startswith("warmup.") else key] = value
  return validate(replace(cfg, **changes))


DEFAULT_PRIOR_ELLIPSE = (0.8, 0.9, 0.0, 0.0)


def prior_ellipse(cfg: Config) -> tuple:
  """The depth prior's ellipse (a, b, cx, cy) of a resolved config.

  Raises UserError when it is still "fit" (resolved from the training data
  by runner.train_run before anything runs)."""
  text = cfg.depth_prior_ellipse.strip()
  if not text:
    return DEFAULT_PRIOR_ELLIPSE
  if text == "fit":
    raise UserError("config depth_prior_ellipse='fit' is fitted to the training images when "
                    "training starts (run.py train); give four numbers a,b,cx,cy here")
  return tuple(float(x) for x in text.split(","))


def validate(cfg: Config) -> Config:
  """Range checks with one-line messages naming the field."""
  def need(cond, field, msg):
    if not cond:
      raise UserError(f"config {field}={getattr(cfg, field)!r}: {msg}")
  size = cfg.image_size
  need(size >= 16 and size & (size - 1) == 0, "image_size", "must be a power of two >= 16")
  need(cfg.crop >= 0, "crop", "must be >= 0")
  need(0 < cfg.min_depth < cfg.max_depth, "min_depth", "need 0 < min_depth < max_depth")
  need(0 < cfg.fov < 180, "fov", "must be in (0, 180) degrees")
  for f in ("embed_dim", "nf_encoder", "nf_ed", "nf_conf", "conf_zdim"):
    need(getattr(cfg, f) >= 4 and getattr(cfg, f) % 4 == 0, f,
         "must be a positive multiple of 4 (GroupNorm uses 4 channels per group)")
  need(cfg.variant in ("independent", "dense", "generic", "dynamic"), "variant",
       "must be independent, dense, generic or dynamic")
  need(cfg.q in ("sigmoid", "cosine"), "q", "must be sigmoid or cosine")
  need(cfg.mix_scale in ("sum", "balanced"), "mix_scale", "must be sum or balanced")
  need(cfg.order.lower() in ("", "random") or sorted(cfg.order.upper()) == sorted("VDLA"),
       "order", "must be a permutation of V, D, L, A (e.g. DVAL) or random")
  need(cfg.batch_size >= 1, "batch_size", "must be >= 1")
  need(cfg.lr > 0, "lr", "must be > 0")
  need(cfg.lr_view_mult > 0, "lr_view_mult", "must be > 0")
  need(cfg.weight_decay_mode in ("coupled", "decoupled"), "weight_decay_mode",
       "must be coupled or decoupled")
  need(cfg.init_trials >= 1, "init_trials", "must be >= 1 (1 = one initialisation)")
  need(cfg.init_trial_steps >= 1, "init_trial_steps", "must be >= 1")
  need(cfg.init_choice >= -1, "init_choice", "must be >= -1 (-1 = not chosen)")
  need(cfg.init_trial_depth_warmup in ("same", "both"), "init_trial_depth_warmup",
       "must be same or both")
  need(0.0 <= cfg.light_floor < 2.0, "light_floor", "must be in [0, 2) (ambient + diffuse)")
  need(cfg.lam_light_floor >= 0, "lam_light_floor", "must be >= 0")
  need(cfg.light_fit >= 0, "light_fit", "must be >= 0 (0 = the light network's light)")
  need(cfg.lr_warmup_steps >= 0, "lr_warmup_steps", "must be >= 0 (0 = no warm-up)")
  need(cfg.lr_cosine_steps >= 0, "lr_cosine_steps", "must be >= 0 (0 = constant lr)")
  need(cfg.steps >= 0, "steps", "must be >= 0")
  for f in ("log_every", "eval_every", "ckpt_every", "keep_checkpoints", "num_eval_images"):
    need(getattr(cfg, f) >= 1, f, "must be >= 1")
  need(cfg.on_nonfinite in ("stop", "skip"), "on_nonfinite", "must be stop or skip")
  need(cfg.lam_flip >= 0 and cfg.lam_perc >= 0, "lam_flip", "loss weights must be >= 0")
  need(cfg.min_sigma >= 0, "min_sigma", "must be >= 0")
  for flat, f in FLAT_WARMUP.items():
    value = getattr(cfg.warmup, f)
    if f.endswith("_steps") and value < 0:
      raise UserError(f"config {flat}={value!r}: must be >= 0")
  maps = cfg.warmup.sym_map_names()
  if not (set(maps) <= {"depth", "albedo"} and len(set(maps)) == len(maps)):
    raise UserError(f"config sym_warmup_maps={cfg.warmup.sym_maps!r}: "
                    "must be a comma list of depth and/or albedo")
  ell = cfg.depth_prior_ellipse.strip()
  if ell not in ("", "fit"):
    try:
      vals = [float(x) for x in ell.split(",")]
    except ValueError:
      vals = []
    need(len(vals) == 4 and all(0.05 <= v <= 2.0 for v in vals[:2])
         and all(abs(v) <= 1.0 for v in vals[2:]), "depth_prior_ellipse",
         "must be '', 'fit' or a,b,cx,cy with half-axes a, b in [0.05, 2] and |cx|, |cy| <= 1")
  return cfg


def without_missing_vgg(cfg: Config, log=None) -> Config:
  """The config with lam_perc=0 when it asks for the VGG16 perceptual loss but
  names no weights file (the user brings it, see third_party/README.md);
  `log(line)` is told once. Otherwise `cfg` unchanged."""
  if cfg.lam_perc > 0 and not cfg.vgg_weights:
    if log is not None:
      log(f"note: preset {cfg.preset} wants the VGG16 perceptual loss but no vgg_weights file "
          "was given (see third_party/README.md); training with lam_perc=0")
    return override(cfg, ["lam_perc=0"])
  return cfg
