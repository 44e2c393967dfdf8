"""Recipe YAML -> dataclasses -> dotted overrides -> validation.

There is one path from a recipe to a training run: `load_config` reads a recipe, applies
`--set key=value` overrides with type checking, and `validate` reports every problem at once.
The resolved config is what gets written into the run folder and the checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from difftool import __version__
from difftool.errors import UserError, did_you_mean, first_line, shown
from difftool.hints import coerce, field_types, type_name
# The recipe functions are also reached as config.recipe_* by callers that read recipes and configs together.
from difftool.recipebook import parse_yaml, recipe_dir, recipe_for_dataset, recipe_names, recipe_summary, recipe_text  # noqa: F401,E501
from difftool.safeio import JSON_LIMIT, UnsafeFile, read_bounded
from difftool.config_rules import validate



@dataclass
class ModelConfig:
    """UNet2DModel architecture. Attention goes on the levels whose feature map size is listed."""

    block_out_channels: tuple[int, ...] = (64, 128, 128)
    layers_per_block: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    attention_head_dim: int | None = None
    mid_block_attention: bool = True
    dropout: float = 0.0
    norm_num_groups: int = 32
    resnet_time_scale_shift: str = "default"
    class_conditional: bool | str = False  # or "auto": when the data has classes (class subfolders, a label column)
    class_dropout: float = 0.1


@dataclass
class SchedulerConfig:
    """The training noise schedule (a DDPMScheduler); samplers later inherit it from the checkpoint."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction_type: str = "epsilon"
    clip_sample: bool = True
    # Rescale the betas so the last timestep is pure noise (Lin et al. 2024): the model must then learn
    # the data's mean and colours itself instead of reading them off a residual signal. Needs v_prediction.
    rescale_betas_zero_snr: bool = False


@dataclass
class DataConfig:
    """Where images come from and how they are augmented (see difftool.data)."""

    dataset: str = "shapes"
    split: str = "train"
    image_column: str | None = None
    label_column: str | None = None
    resolution: int = 32
    channels: int | None = None
    # or "auto": off where the run's judge finds that the classes have a handedness (letters, digits), else on
    random_flip: bool | str = True
    crop: str = "center"
    num_images: int = 10000
    max_images: int | None = None


@dataclass
class TrainConfig:
    """Optimisation. `batch_size` is global: split over processes and accumulation steps."""

    batch_size: int = 64
    max_steps: int = 10000
    epochs: int | None = None
    # steps: train max_steps (or epochs). plateau: at least max_steps, then on while the judge's FD improves by
    # more than its noise, at most until_max_steps (null: 4x max_steps); training/until.py says how.
    until: str = "steps"
    until_max_steps: int | None = None
    lr: float = 2e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 500
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    grad_clip: float = 1.0
    grad_accum: int = 1
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    compile: bool = False
    allow_tf32: bool = True
    min_snr_gamma: float | None = None
    # v-prediction only: weight the loss by alpha_bar_t, floored at this value, which is the epsilon loss
    # where the signal is strong (sharper detail) without dropping the pure-noise steps that set the
    # brightness (those keep this floor's weight). None: the plain v loss.
    epsilon_weighting: float | None = None
    seed: int = 0
    skip_nonfinite: int = 0  # skip up to N steps in a row whose gradients are NaN/inf (0: stop at the first)
    # Start from these weights (any model `difftool sample` takes) at step 0 with a new optimiser: fine-tune
    # a run into a new prediction type or data set. The model settings must give the same UNet.
    init_from: str | None = None


@dataclass
class EMAConfig:
    """EMA with warm-up: decay = 1 - (1 + step / inv_gamma) ** -power, capped at max_decay.

    With power 2/3 the decay is 0.99 after 1k steps (usable samples on short runs) and
    reaches 0.9999 after 1M steps, the value long runs want.
    """

    enabled: bool = True
    max_decay: float = 0.9999
    power: float = 2 / 3
    inv_gamma: float = 1.0
    update_after_step: int = 0


@dataclass
class CheckpointConfig:
    every: int = 1000
    total_limit: int | None = 3


@dataclass
class SampleConfig:
    """Sample grids written during training (EMA weights, fixed seeds)."""

    every: int = 1000
    num_images: int = 16
    scheduler: str = "ddim"
    steps: int = 50
    guidance_scale: float = 1.0
    guidance_rescale: float = 0.0
    # The sampler's noise where it takes one (ddim: 0 deterministic, 1 like DDPM; tcd: its gamma); null: its own
    # default. Recorded with the model, so `difftool sample` uses it whenever it samples with this scheduler.
    eta: float | None = None
    seed: int = 0
    trajectory: int = 0  # > 0: with each grid, its first image's x_t and predicted x0 at this many model calls


@dataclass
class EvalConfig:
    """Evaluation during training, off while `every` is 0: every `every` steps (and at the last) the EMA weights
    make `num_samples` images, image i from seed (seed, i), scored as `difftool evaluate` scores them; the best
    by FID is kept in checkpoints/best. The sampler settings left null are the `sample:` section's.

    `reference` is what `evaluate --reference` takes (a data set, a folder, an .npz of images or statistics), or
    `data`: the run's own training data, at most `reference_images` of it, its statistics cached in RUN/eval/.
    `features` is what `evaluate --features` takes; `inception_weights` a local copy of the FID Inception file.
    """

    every: int = 0
    num_samples: int = 10000
    reference: str = "data"
    reference_images: int | None = None
    features: str = "inception"
    inception_weights: str | None = None
    scheduler: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int = 0


@dataclass
class LogConfig:
    every: int = 50
    trackers: list[str] = field(default_factory=list)


@dataclass
class DistillConfig:
    """`difftool distill`: a few-step student of `teacher` (any model `sample` takes); null for a training run.

    progressive: halving rounds, each student taking one DDIM step for two of its teacher's. consistency: consistency
    distillation in the LCM way: the student maps a point of the teacher's probability-flow path to the same clean
    image as the point one skipping step earlier, which the teacher reaches with one DDIM step on the solver grid
    and a slowly following copy of the student (`target_decay`) maps (training/objective.py and distilling/ say
    more). `guidance_scale` null: the teacher's sample.guidance_scale, baked into the student (class-conditional
    teachers). The student is sampled per its `sample:` section (ddim or lcm, `steps` the few it was made for).
    """

    teacher: str | None = None
    teacher_hash: str | None = None  # its weights' hash when the distillation started: a resumed one checks it
    method: str = "progressive"
    guidance_scale: float | None = None
    loss: str = "huber"  # consistency: huber or l2
    huber_c: float = 0.001
    target_decay: float = 0.95
    rounds: int = 3  # progressive: halvings, from 2^rounds times the final steps of the teacher's DDIM
    # progressive: optimizer steps per round, the last going on to train.max_steps; null: max_steps / rounds,
    # fixed when the distillation starts (a resumed run with more steps lengthens the last round)
    round_steps: int | None = None
    # The teacher's scheduler.prediction_type where the student's differs: a progressive student of an epsilon
    # teacher predicts v (as the student's scheduler says), since epsilon's clean image is undefined at high noise.
    # null: the student's own.
    teacher_prediction: str | None = None


@dataclass
class Config:
    recipe: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)



# ---------------------------------------------------------------- loading


def load_config(recipe: str = "quickstart", overrides: list[str] | None = None, values: dict[str, Any] | None = None) -> Config:
    """Resolve a recipe, typed `values` (from CLI flags) and `key=value` overrides into a valid Config."""
    try:
        raw = parse_yaml(recipe_text(recipe)) or {}
    except yaml.YAMLError as err:
        raise UserError(f"recipe {recipe} is not valid YAML: {first_line(err)}") from err
    if not isinstance(raw, dict):
        raise UserError(f"recipe {recipe} is not a YAML mapping of sections")
    raw.pop("difftool_version", None)  # a run's config.yaml is a recipe too
    name = Path(recipe).stem  # a built-in name, or a file (with or without .yaml) named after its stem
    raw.setdefault("recipe", name)
    errors: list[str] = []
    cfg = _build(Config, raw, "", errors)
    return apply_changes(cfg, overrides, values, errors)


def apply_changes(cfg: Config, overrides: list[str] | None = None, values: dict[str, Any] | None = None,
                  errors: list[str] | None = None) -> Config:
    """Apply typed values, then `key=value` overrides, then validate; report all errors at once."""
    errors = [] if errors is None else errors
    for path, value in (values or {}).items():
        _assign(cfg, path, value, errors)
    for item in overrides or []:
        _apply_override(cfg, item, errors)
    errors += validate(cfg)
    if errors:
        raise UserError("; ".join(errors))
    return cfg


def config_from_dict(raw: dict) -> Config:
    """Rebuild a Config saved in a run folder; every problem is reported at once."""
    errors: list[str] = []
    if isinstance(raw, dict):
        raw = {k: v for k, v in raw.items() if k != "difftool_version"}
    cfg = _build(Config, raw, "", errors)
    errors += validate(cfg)
    if errors:
        raise UserError("; ".join(errors))
    return cfg


def read_config_yaml(path: Path):
    """The parsed YAML of a run's config.yaml: a regular file (never through a link), bounded; every way it can
    fail is a ValueError, an OSError or a YAMLError."""
    return parse_yaml(read_bounded(Path(path), JSON_LIMIT).decode())


def read_config(path: Path) -> Config:
    """The config a run folder was trained with."""
    try:
        raw = read_config_yaml(path) or {}
    except (OSError, ValueError, yaml.YAMLError, UnsafeFile) as err:  # ValueError: not UTF-8
        raise UserError(f"cannot read run config {path}: {first_line(err)}") from err
    written_by = raw.get("difftool_version") if isinstance(raw, dict) else None
    try:
        return config_from_dict(raw)
    except UserError as err:
        if written_by is None or str(written_by) == __version__:
            raise
        raise UserError(f"{path} was written by difftool {written_by} and this is difftool {__version__}: {err}. "
                        f"Use difftool {written_by} for this run") from err


def to_dict(cfg: Config) -> dict:
    out = dataclasses.asdict(cfg)
    for section in out.values():
        if isinstance(section, dict):
            for key, value in section.items():
                if isinstance(value, tuple):
                    section[key] = list(value)
    out["difftool_version"] = __version__
    return out


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


@functools.cache
def field_paths(cls=Config, prefix: str = "") -> tuple[str, ...]:
    """Every settable key, dotted (`train.lr`)."""
    paths = []
    for f in dataclasses.fields(cls):
        hint = field_types(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            paths += field_paths(hint, f"{prefix}{f.name}.")
        else:
            paths.append(prefix + f.name)
    return tuple(paths)


def _apply_override(cfg: Config, item: str, errors: list[str]) -> None:
    key, sep, text = item.partition("=")
    if not sep:
        errors.append(f"override '{item}' is not key=value (e.g. --set train.batch_size=64)")
        return
    try:
        value = parse_yaml(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    _assign(cfg, key.strip(), value, errors)


def _assign(cfg: Config, path: str, value: Any, errors: list[str]) -> None:
    valid = field_paths()
    if path not in valid:
        errors.append(f"unknown config key '{path}'{did_you_mean(path, valid)}")
        return
    section_name, _, name = path.rpartition(".")
    owner = getattr(cfg, section_name) if section_name else cfg
    hint = field_types(type(owner))[name]
    ok, coerced = coerce(value, hint)
    if not ok:
        errors.append(f"{path} must be {type_name(hint)}, got {shown(value)}")
        return
    setattr(owner, name, coerced)


def _build(cls, raw: Any, prefix: str, errors: list[str]):
    obj = cls()
    if raw is None:
        return obj
    if not isinstance(raw, dict):
        errors.append(f"{prefix.rstrip('.') or 'recipe'} must be a mapping, got {shown(raw)}")
        return obj
    hints = field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in raw.items():
        if not isinstance(key, str):
            errors.append(f"{prefix.rstrip('.') or 'recipe'} has a key that is not a name: {shown(key)}")
            continue
        path = f"{prefix}{key}"
        if key not in names:
            errors.append(f"unknown config key '{path}'{did_you_mean(path, [prefix + n for n in names])}")
            continue
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            setattr(obj, key, _build(hint, value, f"{path}.", errors))
            continue
        ok, coerced = coerce(value, hint)
        if ok:
            setattr(obj, key, coerced)
        else:
            errors.append(f"{path} must be {type_name(hint)}, got {shown(value)}")
    return obj
