"""Turning `difftool distill` flags into a plan: the teacher's config, the distillation recipe on top, the flags.

Every refusal comes before anything is written: a teacher that does not load, whose UNet difftool cannot rebuild,
that is itself a student, or whose data is not there.
"""

from __future__ import annotations

from pathlib import Path

from difftool import config as config_mod
from difftool.config import Config, SchedulerConfig
from difftool.errors import UserError, did_you_mean
from difftool.recipebook import parse_yaml, recipe_dir
from difftool.output_rules import source_name
from difftool.rundir import RunDir, resolve_resume, run_of
from difftool.training.plan import TrainPlan, check_dataset

# What `difftool distill --recipe NAME` finds in recipes/distill/: the settings a distillation changes. The first is
# the default: progressive won at 4 and 2 steps on every benchmark set (benchmarks/RESULTS.md, "Consistency or
# progressive, by worst case").
DISTILL_RECIPES = ("progressive", "consistency")
# A recipe's `train.max_steps: null`: the student trains a quarter of its teacher's optimizer steps, at least
# MIN_STUDENT_STEPS. A progressive step costs 1.5-1.8 of a teacher's, so that is 0.4-0.45 of the teacher's time
# once the teacher trained 4,000 steps or more; on letters 3,000 steps against 1,000 took FD_judge at 4 steps from
# 0.46 to 0.36 (RESULTS.md).
MIN_STUDENT_STEPS = 1000


def student_steps(teacher_steps) -> int:
    """The optimizer steps of a student whose recipe leaves train.max_steps null (the teacher's count unknown: the
    minimum)."""
    known = isinstance(teacher_steps, int) and not isinstance(teacher_steps, bool)
    return max(MIN_STUDENT_STEPS, teacher_steps // 4) if known else MIN_STUDENT_STEPS


def plan_distillation(*, teacher: str | None = None, recipe: str | None = None, dataset: str | None = None,
                      overrides: list[str] | None = None, values: dict | None = None, output: Path | None = None,
                      resume: str | None = None) -> TrainPlan:
    """The student's config and run folder; a resumed distillation keeps the config saved in its folder."""
    values = dict(values or {})
    if dataset is not None:
        values["data.dataset"] = dataset
    if resume is not None:
        if teacher is not None or recipe is not None:
            raise UserError("--resume continues a distillation with its own teacher and recipe; give --resume alone")
        run_root, checkpoint = resolve_resume(resume)
        if output is not None and Path(output).resolve() != run_root.resolve():
            raise UserError(f"--output {output} and --resume {resume} name different runs; drop --output")
        cfg = config_mod.apply_changes(config_mod.read_config(RunDir(run_root).config), overrides, values)
        if cfg.distill.teacher is None:
            raise UserError(f"{run_root} is a training run, not a distillation: continue it with "
                            f"difftool train --resume {run_root}")
        return TrainPlan(cfg, run_root, checkpoint)
    if teacher is None:
        raise UserError("give the model to distill: difftool distill RUN (a run folder, a model folder or file, a hub id)")
    from difftool.models.load import load_model  # torch: after the checks that need none

    model = load_model(teacher)
    teacher = str(Path(teacher).resolve()) if Path(teacher).exists() else teacher  # resumable from anywhere
    base = _teacher_config(teacher, model, dataset)
    raw = _merge(config_mod.to_dict(base), _recipe(recipe or DISTILL_RECIPES[0]))
    raw["recipe"] = f"{base.recipe}-distill-{raw['distill']['method']}"
    raw["distill"]["teacher"], raw["distill"]["teacher_hash"] = str(teacher), model.model_hash
    raw["train"]["init_from"] = str(teacher)
    if raw["train"].get("max_steps") is None:
        raw["train"]["max_steps"] = student_steps(model.info.get("step"))
    cfg = config_mod.apply_changes(config_mod.config_from_dict(raw), overrides, values)
    if cfg.distill.method == "progressive" and cfg.distill.round_steps is None:
        cfg.distill.round_steps = max(1, cfg.train.max_steps // cfg.distill.rounds)
    if cfg.distill.method == "progressive" and cfg.scheduler.prediction_type == "epsilon":
        # Salimans & Ho: at the first, pure-noise step epsilon's clean image (z - sigma eps) / alpha amplifies the
        # student's error by 1 / alpha (158x for DDPM's linear schedule); such students learned noise (RESULTS.md).
        # v's clean image is alpha z - sigma v at every noise level.
        cfg.scheduler.prediction_type = "v_prediction"
    if cfg.scheduler.prediction_type != base.scheduler.prediction_type:
        cfg.distill.teacher_prediction = base.scheduler.prediction_type
    if cfg.distill.guidance_scale is None:
        cfg.distill.guidance_scale = base.sample.guidance_scale if base.model.class_conditional else 1.0
    try:
        check_dataset(cfg.data.dataset)
    except UserError as err:
        if cfg.data.dataset != base.data.dataset:  # the user's own --dataset
            raise
        raise UserError(f"the teacher's training data {cfg.data.dataset} (its config.yaml) is not found from "
                        f"{Path.cwd()}: give it with --dataset, or run from where the teacher was trained "
                        f"({err})") from err
    return TrainPlan(cfg, Path(output) if output else Path("runs") / f"{source_name(teacher)}-distilled", None,
                     optional_eval=not any(k.startswith("eval.") for k in [*values, *_keys(overrides)]))


def _teacher_config(teacher: str, model, dataset: str | None) -> Config:
    """The teacher run's own config, or one rebuilt from a model that has none (its data then comes from --dataset)."""
    run = run_of(teacher)
    if run is not None:
        cfg = config_mod.read_config(RunDir(run).config)
        if cfg.distill.teacher is not None:
            raise UserError(f"{teacher} is already a student, distilled from {cfg.distill.teacher}; distill that "
                            f"teacher instead")
        return cfg
    from difftool.models.build import model_config_of

    info = model.info
    model_cfg, differs = model_config_of(dict(model.unet.config), info["resolution"], info["channels"])
    if differs:
        raise UserError(f"cannot distill {teacher}: its UNet is not one difftool builds ({differs}); distill a model "
                        f"trained by difftool train, or its run folder")
    if model_cfg.class_conditional and info.get("null_class") is None:
        raise UserError(f"cannot distill {teacher}: it is class-conditional with no null class recorded, so "
                        f"guidance cannot be baked in; distill its difftool run folder")
    if dataset is None:
        raise UserError(f"{teacher} is not a difftool run, so its training data is unknown: give it with --dataset")
    scheduler = model.scheduler_config
    if scheduler.get("trained_betas") is not None:
        raise UserError(f"cannot distill {teacher}: its noise schedule is a list of betas, not one difftool builds")
    fields = set(SchedulerConfig.__dataclass_fields__)
    return Config(recipe=source_name(teacher), model=model_cfg,
                  scheduler=SchedulerConfig(**{k: v for k, v in scheduler.items() if k in fields}),
                  data=config_mod.DataConfig(dataset=dataset, resolution=info["resolution"], channels=info["channels"]))


def _recipe(name: str) -> dict:
    """A distillation recipe: a built-in name (recipes/distill/NAME.yaml) or a YAML file of the same sections."""
    path = Path(name).expanduser()
    if path.suffix in (".yaml", ".yml") or path.is_file():
        text = config_mod.recipe_text(str(path))
    elif name in DISTILL_RECIPES:
        text = (recipe_dir() / "distill" / f"{name}.yaml").read_text()
    else:
        raise UserError(f"unknown distillation recipe '{name}'{did_you_mean(name, list(DISTILL_RECIPES))}; "
                        f"built in: {', '.join(DISTILL_RECIPES)}, or a YAML file")
    raw = parse_yaml(text) or {}
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise UserError(f"distillation recipe {name} must be a YAML mapping of sections (distill:, train:, ...)")
    fixed = [f"{section}.{key}" for section, keys in raw.items() for key in keys
             if section in ("scheduler", "data") or (section == "model" and key != "class_dropout")]
    if fixed:
        raise UserError(f"distillation recipe {name} sets {', '.join(fixed)}: a student keeps its teacher's network, "
                        f"schedule and data")
    return raw


def _merge(base: dict, changes: dict) -> dict:
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in changes.items():
        merged[section] = {**merged.get(section, {}), **values}
    return merged


def _keys(overrides: list[str] | None) -> list[str]:
    return [o.partition("=")[0].strip() for o in overrides or []]

