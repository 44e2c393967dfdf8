"""Turning `difftool train` flags into a plan, and checking the run folder before writing to it.

Everything here is decided identically on every process (the same flags, the same files), so
a refusal ends all processes of a multi-process run alike, before any of them writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from difftool import config as config_mod
from difftool.config import Config
from difftool.recipebook import flatten
from difftool.errors import UserError
from difftool.rundir import RunDir, new_run_folder, resolve_resume, resumable
from difftool.safeio import check_regular

# Config fields a resumed run may change: how long to train, what to write and measure along the way, and
# whether to skip non-finite steps (the usual reason to resume after a run stopped on NaN).
RESUMABLE_CHANGES = ("recipe", "train.max_steps", "train.epochs", "train.until_max_steps", "train.skip_nonfinite",
                     "checkpoint.", "sample.", "eval.", "log.")


@dataclass
class TrainPlan:
    """What `difftool train` resolved its flags into: the config, the run folder, the checkpoint to resume."""

    cfg: Config
    output: Path
    resume: Path | None
    why: str | None = None  # why this recipe, when difftool chose it
    # The evaluation during training is a built-in recipe's, not asked for (no eval.* flag, not the user's recipe
    # file or run): one that cannot run (no feature network offline) is turned off rather than refused.
    optional_eval: bool = False


def plan_training(*, recipe: str | None = None, dataset: str | None = None, overrides: list[str] | None = None,
                  values: dict | None = None, output: Path | None = None, resume: str | None = None) -> TrainPlan:
    """Resolve the command-line choices; a resumed run starts from the config saved in its folder."""
    values = dict(values or {})
    if dataset is not None:
        values["data.dataset"] = dataset
    if resume is not None:
        run_root, checkpoint = resolve_resume(resume)
        if output is not None and Path(output).resolve() != run_root.resolve():
            raise UserError(f"--output {output} and --resume {resume} name different runs; drop --output")
        if recipe is not None:
            raise UserError("--recipe cannot change a resumed run; drop it (the run keeps its saved config)")
        cfg = config_mod.apply_changes(config_mod.read_config(RunDir(run_root).config), overrides, values)
        return TrainPlan(cfg, run_root, checkpoint)
    why = None
    if recipe is None:
        recipe, why = config_mod.recipe_for_dataset(dataset, gpu=dataset is not None and _gpu_present())
    cfg = config_mod.load_config(recipe, overrides, values)
    check_dataset(cfg.data.dataset)
    asked = [key for key in [*values, *(o.partition("=")[0].strip() for o in overrides or [])] if key.startswith("eval.")]
    built_in = recipe in config_mod.recipe_names() and not Path(recipe).is_file()
    return TrainPlan(cfg, Path(output) if output else new_run_folder(cfg.recipe, cfg.data.dataset), None, why,
                     optional_eval=built_in and not asked)


def check_dataset(name: str) -> None:
    """Refuse a data set no source can load (a folder that is not there) now, so that a dry run says so too."""
    if name != "shapes":  # the built-in set needs no check, and a dry run of it no torch import
        from difftool.data import source_kind

        source_kind(name)


def _gpu_present() -> bool:
    import torch  # here, not at the top: without --dataset, a mistyped --set is refused before torch's 4 s import

    return torch.cuda.is_available()


def resume_command(cfg: Config) -> str:
    """The command that continues a run: distill for a student, else train."""
    return "distill" if cfg.distill.teacher else "train"


def check_output(run: RunDir, cfg: Config, resume: Path | None, overwrite: bool) -> None:
    """Refuse to write into a folder that holds something else; same checks on every rank."""
    if resume is not None:
        if not run.is_run():
            raise UserError(f"cannot resume: {run.root} is not a difftool run folder (no {run.config.name})")
        saved = config_mod.read_config(run.config)
        changed = config_diff(saved, cfg)
        if changed:
            raise UserError(f"cannot resume {run.root} with a different config ({', '.join(changed)}); "
                            f"start a new run with --output, or keep those settings")
        resumable(resume)
        check_regular(run.metrics, run.sessions)  # appended to: never through a link, never into a FIFO
        return
    if not run.contents():
        return
    if not run.is_run():
        raise UserError(f"output folder {run.root} is not empty and is not a difftool run; choose another --output")
    if not overwrite:
        raise UserError(f"output folder {run.root} already holds a run; continue it with --resume {run.root}, "
                        f"or replace it with --overwrite")


def config_diff(saved: Config, new: Config) -> list[str]:
    """Dotted keys whose values differ, ignoring the ones a resumed run may change."""
    a, b = flatten(config_mod.to_dict(saved)), flatten(config_mod.to_dict(new))
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
            and k != "difftool_version" and not k.startswith(RESUMABLE_CHANGES)]

