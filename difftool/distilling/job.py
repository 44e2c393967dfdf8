"""The distillation run: the training loop (training/loop.py) with the method's objective and the teacher."""

from __future__ import annotations

from pathlib import Path

from difftool.config import Config
from difftool.distilling.consistency import ConsistencyDistillation
from difftool.distilling.progressive import ProgressiveDistillation
from difftool.errors import UserError
from difftool.models.load import load_model
from difftool.training.loop import TrainResult, train

METHODS = {"consistency": ConsistencyDistillation, "progressive": ProgressiveDistillation}


def distill(cfg: Config, output: Path | str, *, resume: Path | None = None, overwrite: bool = False,
            optional_eval: bool = False) -> TrainResult:
    """Distill `cfg.distill.teacher` into the run folder `output` (a plan from distilling/plan.py)."""

    def objective(accelerator, student, noise_scheduler):
        teacher = load_model(cfg.distill.teacher)
        if cfg.distill.teacher_hash and teacher.model_hash != cfg.distill.teacher_hash:
            raise UserError(f"the teacher {cfg.distill.teacher} is not the model this distillation started from (its "
                            f"weights changed: a run still training?); distill it again into a new --output")
        null_class = teacher.info.get("null_class") if student.config.num_class_embeds else None
        return METHODS[cfg.distill.method](cfg, accelerator, student, teacher.unet, noise_scheduler, null_class)

    return train(cfg, output, resume=resume, overwrite=overwrite, optional_eval=optional_eval, objective=objective)
