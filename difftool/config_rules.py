"""What a valid config is: the values each key allows, and every check, reported all at once."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from difftool.errors import did_you_mean, shown

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
MIXED_PRECISION = ("no", "fp16", "bf16", "auto")
LR_SCHEDULES = ("constant", "cosine", "linear")
CROPS = ("center", "random")
TRACKERS = ("tensorboard", "wandb")
# train.until: stop at train.max_steps, or go on while the judge still improves (difftool.training.until)
STEPS, PLATEAU = "steps", "plateau"
UNTIL = (STEPS, PLATEAU)
AUTO = "auto"  # model.class_conditional: from the data's classes; data.random_flip: from the judge's measure

# Image i's generator is seeded with seed * 1_000_003 + i (training's with more factors), which must fit torch's 64 bits.
SEED_MAX = 2**32 - 1


def _numbers(obj, prefix: str = "") -> Iterator[tuple[str, float]]:
    """(dotted path, value) of every float in a config, lists included."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _numbers(value, f"{prefix}{f.name}.")
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, float):
                yield prefix + f.name, item


# ---------------------------------------------------------------- validation


def validate(cfg) -> list[str]:
    """Every problem with a config, so users fix them in one go rather than one per run."""
    e: list[str] = []
    m, s, d, t = cfg.model, cfg.scheduler, cfg.data, cfg.train

    def choice(path: str, value: str, options: tuple[str, ...]) -> None:
        if value not in options:
            e.append(f"{path} must be one of {', '.join(options)}, got '{value}'{did_you_mean(value, list(options))}")

    def positive(path: str, value: float | None, allow_zero: bool = False) -> None:
        if value is not None and (value < 0 or (value == 0 and not allow_zero)):
            e.append(f"{path} must be {'>= 0' if allow_zero else '> 0'}, got {value}")

    choice("scheduler.beta_schedule", s.beta_schedule, BETA_SCHEDULES)
    choice("scheduler.prediction_type", s.prediction_type, PREDICTION_TYPES)
    choice("train.mixed_precision", t.mixed_precision, MIXED_PRECISION)
    choice("train.lr_schedule", t.lr_schedule, LR_SCHEDULES)
    choice("train.until", t.until, UNTIL)
    choice("data.crop", d.crop, CROPS)
    choice("model.resnet_time_scale_shift", m.resnet_time_scale_shift, ("default", "scale_shift"))
    for tracker in cfg.log.trackers:
        choice("log.trackers", tracker, TRACKERS)
    for path, value in [
        ("scheduler.num_train_timesteps", s.num_train_timesteps), ("data.resolution", d.resolution),
        ("data.num_images", d.num_images), ("data.max_images", d.max_images), ("train.batch_size", t.batch_size),
        ("train.max_steps", t.max_steps), ("train.epochs", t.epochs), ("train.lr", t.lr),
        ("train.grad_accum", t.grad_accum), ("model.layers_per_block", m.layers_per_block),
        ("model.norm_num_groups", m.norm_num_groups), ("checkpoint.every", cfg.checkpoint.every),
        ("checkpoint.total_limit", cfg.checkpoint.total_limit), ("sample.every", cfg.sample.every),
        ("sample.num_images", cfg.sample.num_images), ("sample.steps", cfg.sample.steps),
        ("log.every", cfg.log.every), ("train.min_snr_gamma", t.min_snr_gamma),
    ]:
        positive(path, value)
    for path, value in [("train.warmup_steps", t.warmup_steps), ("train.weight_decay", t.weight_decay),
                        ("train.grad_clip", t.grad_clip), ("ema.update_after_step", cfg.ema.update_after_step),
                        ("train.skip_nonfinite", t.skip_nonfinite), ("sample.trajectory", cfg.sample.trajectory)]:
        positive(path, value, allow_zero=True)
    e += [f"{path} must be a finite number, got {value}" for path, value in _numbers(cfg) if not math.isfinite(value)]
    if not 0 <= m.dropout < 1:
        e.append(f"model.dropout must be in [0, 1), got {m.dropout}")
    e += _auto_problems(cfg)
    if not 0 <= m.class_dropout < 1:
        e.append(f"model.class_dropout must be in [0, 1), got {m.class_dropout}")
    if cfg.sample.guidance_scale < 1:
        e.append(f"sample.guidance_scale must be >= 1 (1 = no guidance), got {cfg.sample.guidance_scale}")
    if cfg.sample.eta is not None and not 0 <= cfg.sample.eta <= 1:
        e.append(f"sample.eta must be in [0, 1] (0 = deterministic), got {cfg.sample.eta}")
    if not 0 <= cfg.sample.guidance_rescale <= 1:
        e.append(f"sample.guidance_rescale must be in [0, 1] (0 = off), got {cfg.sample.guidance_rescale}")
    e += _eval_problems(cfg.eval)
    e += _until_problems(cfg)
    e += _distill_problems(cfg.distill)
    e += [f"{path} must be in [0, {SEED_MAX}], got {shown(seed)}" for path, seed in
          [("train.seed", t.seed), ("sample.seed", cfg.sample.seed), ("eval.seed", cfg.eval.seed)]
          if not 0 <= seed <= SEED_MAX]
    if not 0 < cfg.ema.max_decay < 1:
        e.append(f"ema.max_decay must be in (0, 1), got {cfg.ema.max_decay}")
    e += _weighting_problems(t, s.prediction_type)
    if s.rescale_betas_zero_snr and s.prediction_type == "epsilon":
        e.append("scheduler.rescale_betas_zero_snr needs scheduler.prediction_type=v_prediction (or sample): at "
                 "zero terminal SNR the last timestep holds no signal to recover from a noise prediction")
    if not 0 < s.beta_start < s.beta_end < 1:
        e.append(f"scheduler.beta_start < scheduler.beta_end must both lie in (0, 1), got {s.beta_start}, {s.beta_end}")
    if d.channels not in (None, 1, 3):
        e.append(f"data.channels must be 1, 3 or null (from the data), got {d.channels}")
    if not m.block_out_channels:
        e.append("model.block_out_channels must list at least one width")
    for width in m.block_out_channels if m.norm_num_groups > 0 else []:
        if width % m.norm_num_groups:
            e.append(f"model.block_out_channels entry {width} is not divisible by model.norm_num_groups={m.norm_num_groups}")
            break
    factor = 2 ** (len(m.block_out_channels) - 1)
    if d.resolution % factor:
        e.append(f"data.resolution {d.resolution} must be divisible by {factor} for a UNet with "
                 f"{len(m.block_out_channels)} levels; use e.g. {max(factor, round(d.resolution / factor) * factor)}")
    sizes = [d.resolution // 2**i for i in range(len(m.block_out_channels))]
    unused = [r for r in m.attention_resolutions if r not in sizes]
    if unused and not d.resolution % factor:
        e.append(f"model.attention_resolutions {unused} match no level of this UNet (its feature sizes are {sizes})")
    return e


def _auto_problems(cfg) -> list[str]:
    """The settings that take true, false or auto (decided from the data when the run starts)."""
    return [f"{path} must be true, false or auto, got {shown(value)}"
            for path, value in [("model.class_conditional", cfg.model.class_conditional),
                                ("data.random_flip", cfg.data.random_flip)]
            if isinstance(value, str) and value != AUTO]


def _weighting_problems(t, prediction_type: str) -> list[str]:
    if t.epsilon_weighting is None:
        return []
    e = []
    if not 0 < t.epsilon_weighting <= 1:
        e.append(f"train.epsilon_weighting must be in (0, 1] (the least weight of a step), got {t.epsilon_weighting}")
    if prediction_type != "v_prediction":
        e.append(f"train.epsilon_weighting weights a v-prediction loss; with scheduler.prediction_type="
                 f"{prediction_type} drop it (--set train.epsilon_weighting=null)")
    if t.min_snr_gamma:
        e.append("train.epsilon_weighting and train.min_snr_gamma both weight the loss; set one of them "
                 "(--set train.epsilon_weighting=null for min-SNR)")
    return e


def _until_problems(cfg) -> list[str]:
    """train.until: plateau follows the judge's evaluations and sets the learning rate itself."""
    t = cfg.train
    if t.until != PLATEAU:
        return [f"train.until_max_steps applies to train.until=plateau, not {t.until}"] if t.until_max_steps else []
    e = []
    if not cfg.eval.every or cfg.eval.features != "judge":
        e.append("train.until=plateau follows the judge's evaluations: set eval.every (e.g. 1000) and "
                 "eval.features=judge")
    if t.lr_schedule != "constant":
        e.append(f"train.until=plateau holds the learning rate and cools it down when the judge levels off, so it "
                 f"takes no lr_schedule of its own: set train.lr_schedule=constant (got {t.lr_schedule})")
    if t.epochs:
        e.append("train.until=plateau counts steps: set train.epochs=null and give train.max_steps")
    if t.until_max_steps is not None and t.until_max_steps < t.max_steps:
        e.append(f"train.until_max_steps ({t.until_max_steps}) must be at least train.max_steps ({t.max_steps})")
    return e


DISTILL_METHODS = ("consistency", "progressive")
DISTILL_LOSSES = ("huber", "l2")


def _distill_problems(d) -> list[str]:
    e = [f"distill.{name} must be one of {', '.join(options)}, got '{value}'{did_you_mean(str(value), list(options))}"
         for name, value, options in [("method", d.method, DISTILL_METHODS), ("loss", d.loss, DISTILL_LOSSES)]
         if value not in options]
    if d.guidance_scale is not None and d.guidance_scale < 1:
        e.append(f"distill.guidance_scale must be >= 1 (1 = no guidance) or null, got {d.guidance_scale}")
    if d.teacher_prediction is not None and d.teacher_prediction not in PREDICTION_TYPES:
        e.append(f"distill.teacher_prediction must be one of {', '.join(PREDICTION_TYPES)} or null, got "
                 f"'{d.teacher_prediction}'")
    if not d.huber_c > 0:
        e.append(f"distill.huber_c must be > 0, got {d.huber_c}")
    if d.round_steps is not None and d.round_steps < 1:
        e.append(f"distill.round_steps must be >= 1 or null (train.max_steps / rounds), got {d.round_steps}")
    if d.rounds < 1:
        e.append(f"distill.rounds must be >= 1 (progressive: halvings of the teacher's steps), got {d.rounds}")
    if not 0 <= d.target_decay < 1:
        e.append(f"distill.target_decay must be in [0, 1), got {d.target_decay}")
    return e


def _eval_problems(ev) -> list[str]:
    e = [f"eval.{name} must be > 0, got {value}" for name, value in
         [("steps", ev.steps), ("reference_images", ev.reference_images)] if value is not None and value <= 0]
    if ev.every < 0:
        e.append(f"eval.every must be >= 0 (0 = off), got {ev.every}")
    if ev.num_samples < 2:
        e.append(f"eval.num_samples must be >= 2 (FID needs a covariance), got {ev.num_samples}")
    if ev.guidance_scale is not None and ev.guidance_scale < 1:
        e.append(f"eval.guidance_scale must be >= 1 (1 = no guidance) or null, got {ev.guidance_scale}")
    return e + [f"eval.{name} must not be empty" for name in ("reference", "features") if not getattr(ev, name).strip()]
