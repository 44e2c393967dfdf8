"""`difftool distill`: a tiny teacher distilled end to end, the consistency objective's maths, exact resume, two
processes, and every teacher that cannot be distilled refused before anything is written."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler, UNet2DModel
from PIL import Image

from difftool import config as config_mod
from difftool.distilling.consistency import ConsistencyDistillation, boundary_scalings
from difftool.distilling.job import distill
from difftool.distilling.plan import plan_distillation, student_steps
from difftool.errors import UserError
from difftool.models.build import build_noise_scheduler
from difftool.rundir import RunDir
from difftool.sampling.schedulers import make_scheduler
from difftool.training.loop import train
from difftool.training.plan import plan_training
from tests.conftest import (
    assert_user_error,
    difftool_cmd,
    free_port,
    invoke,
    tiny_config,
)

QUICK = ["train.max_steps=6", "train.warmup_steps=2", "checkpoint.every=3", "sample.every=3", "log.every=1",
         "eval.every=0"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny class-conditional v-prediction teacher at 8 px, guided at 2 by its recipe."""
    return train(tiny_config("sample.guidance_scale=2"), tmp_path_factory.mktemp("t") / "teacher").run


def distilled(teacher, output, *changes, resume=None, recipe=None):
    plan = plan_distillation(teacher=None if resume else str(teacher), overrides=[*QUICK, *changes], output=output,
                             resume=resume, recipe=recipe)
    return distill(plan.cfg, plan.output, resume=plan.resume)


class _Cpu:
    """What the objectives use of an Accelerator: the device and (no) autocast."""

    device = torch.device("cpu")

    def autocast(self):
        return torch.autocast("cpu", enabled=False)


def losses(run):
    return [r["loss"] for r in map(json.loads, RunDir(run).metrics.read_text().splitlines()) if "loss" in r]


def test_a_student_is_made_sampled_by_its_own_sampler_and_loads_in_diffusers(teacher, tmp_path, scratch_cwd):
    result = invoke("distill", teacher, "--output", tmp_path / "student", "--steps", "2", "--quiet",
                    *[a for item in QUICK for a in ("--set", item)])
    assert result.exit_code == 0, result.output
    run = RunDir(tmp_path / "student")
    cfg = config_mod.read_config(run.config)
    assert (cfg.distill.teacher, cfg.distill.guidance_scale) == (str(teacher.resolve()), 2.0), "the recipe's guidance"
    assert (cfg.distill.method, cfg.sample.scheduler, cfg.sample.steps, cfg.sample.guidance_scale) == \
        ("progressive", "ddim", 2, 1.0), "the default method, sampled by deterministic DDIM at its steps"
    assert len(losses(run.root)) == 6 and (run.root / "samples" / "step-000006.png").is_file()
    student = UNet2DModel.from_pretrained(run.model_dir / "unet")
    before = UNet2DModel.from_pretrained(teacher / "model" / "unet")
    assert {k: v for k, v in student.config.items() if k != "_name_or_path"} == \
        {k: v for k, v in before.config.items() if k != "_name_or_path"}
    assert any(not torch.equal(a, b) for a, b in zip(student.state_dict().values(), before.state_dict().values()))
    # The README's way to sample it in diffusers: DDIM on trailing timesteps is difftool's own ddim, step for step
    ddim = DDIMScheduler.from_pretrained(run.model_dir / "scheduler", timestep_spacing="trailing")
    ours = make_scheduler("ddim", dict(DDPMScheduler.from_pretrained(run.model_dir / "scheduler").config), steps=2)
    for scheduler in (ddim, ours):
        scheduler.set_timesteps(2)
    assert ddim.timesteps.tolist() == ours.timesteps.tolist() and ddim.config.clip_sample
    torch.testing.assert_close(ddim.alphas_cumprod, ours.alphas_cumprod)
    assert float(ddim.final_alpha_cumprod) == float(ours.final_alpha_cumprod)

    for source in (run.root, run.model_dir):  # a model folder away from its run keeps its sampler too
        made = invoke("sample", source, "-n", "2", "--output", tmp_path / f"s-{source.name}", "--quiet")
        assert made.exit_code == 0, made.output
        text = Image.open(tmp_path / f"s-{source.name}" / "000000.png").text
        assert (text["scheduler"], text["steps"], text["guidance_scale"]) == ("ddim", "2", "1.0")


def test_the_default_student_trains_a_quarter_of_its_teachers_steps(teacher, tmp_path):
    """Longer teachers get longer students (at about 0.4 of the teacher's time), never fewer than 1000 steps; a
    teacher whose step count is unknown, an explicit --max-steps and the consistency recipe keep theirs."""
    assert [student_steps(n) for n in (6, 4000, 11000, None, True)] == [1000, 1000, 2750, 1000, 1000]
    long = tmp_path / "long"
    subprocess.run(["cp", "-r", str(teacher), str(long)], check=True)
    info = long / "model" / "difftool.json"
    info.write_text(json.dumps({**json.loads(info.read_text()), "step": 8000}))
    cfg = plan_distillation(teacher=str(long)).cfg
    assert (cfg.train.max_steps, cfg.distill.round_steps) == (2000, 666), "a quarter of 8000, over 3 rounds"
    assert plan_distillation(teacher=str(teacher)).cfg.train.max_steps == 1000
    assert plan_distillation(teacher=str(long), values={"train.max_steps": 7}).cfg.train.max_steps == 7
    assert plan_distillation(teacher=str(long), recipe="consistency").cfg.train.max_steps == 1000


def test_the_student_steps_on_the_grid_its_sampler_uses(teacher, tmp_path):
    """Training timesteps t_n = (n + 1) k - 1 and their targets at t_n - k are LCMScheduler's grid, guidance passes
    the null class to the teacher, and the boundary scalings are LCMScheduler's."""
    cfg = plan_distillation(teacher=str(teacher), recipe="consistency").cfg
    schedule = build_noise_scheduler(cfg.scheduler)
    calls = []

    class Recording(torch.nn.Module):
        dtype = torch.float32

        def __init__(self, name):
            super().__init__()
            self.name, self.w = name, torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, t, class_labels=None):
            calls.append((self.name, t.tolist(), None if class_labels is None else class_labels.tolist()))
            return type("Out", (), {"sample": x * 0 + self.w})()

    objective = ConsistencyDistillation(cfg, _Cpu(), Recording("student"), Recording("teacher"), schedule, null_class=5)
    objective.target.name = "target"
    t = torch.arange(0, 50)  # every training timestep (T = 50 in the tiny recipe): grid of min(50, T)
    x0 = torch.zeros(50, 3, 8, 8)
    labels = torch.arange(50) % 5
    objective.loss(objective.student, x0, labels, torch.randn_like(x0), t)
    seen = {name: (ts, ls) for name, ts, ls in calls}
    grid = make_scheduler("lcm", dict(schedule.config), steps=50)
    grid.set_timesteps(50)
    assert sorted(set(seen["student"][0])) == sorted(grid.timesteps.tolist())
    assert seen["target"][0] == [max(s - 1, 0) for s in seen["student"][0]]
    assert seen["teacher"][1] == labels.tolist() + [5] * 50, "conditional and null class in one batch"
    for step in (0, 1, 7, 49):
        expected = grid.get_scalings_for_boundary_condition_discrete(step)
        got = boundary_scalings(torch.tensor([step]))
        assert [float(v) for v in got] == pytest.approx(list(expected))


def test_the_target_follows_the_student_at_its_decay(teacher):
    cfg = plan_distillation(teacher=str(teacher), recipe="consistency", overrides=["distill.target_decay=0.9"]).cfg
    student = UNet2DModel.from_pretrained(teacher / "model" / "unet")

    objective = ConsistencyDistillation(cfg, _Cpu(), student, UNet2DModel.from_pretrained(teacher / "model" / "unet"),
                                        build_noise_scheduler(cfg.scheduler), null_class=5)
    before = [p.detach().clone() for p in objective.target.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    objective.after_step()
    for old, new in zip(before, objective.target.parameters()):
        torch.testing.assert_close(new, old + 0.1)


def test_a_consistency_student_resumes_exactly_and_samples_with_lcm(teacher, tmp_path):
    whole = distilled(teacher, tmp_path / "whole", recipe="consistency")
    distilled(teacher, tmp_path / "part", "train.max_steps=3", recipe="consistency")
    resumed = distilled(teacher, tmp_path / "part", "train.max_steps=6", resume=str(tmp_path / "part"))
    assert resumed.step == 6
    assert losses(tmp_path / "part") == losses(whole.run), "the target network is part of the state"
    a = UNet2DModel.from_pretrained(whole.run / "model" / "unet").state_dict()
    b = UNet2DModel.from_pretrained(resumed.run / "model" / "unet").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    cfg = config_mod.read_config(RunDir(whole.run).config)
    assert (cfg.distill.method, cfg.sample.scheduler, cfg.sample.steps) == ("consistency", "lcm", 4)
    LCMScheduler.from_pretrained(whole.run / "model" / "scheduler")  # the README's way to load it in diffusers


def test_two_processes_distill_as_one(teacher, tmp_path):
    one = distilled(teacher, tmp_path / "one")
    cmd = difftool_cmd() + ["distill", str(teacher), "--output", str(tmp_path / "two"),
                            *[a for item in QUICK for a in ("--set", item)],
                            "--num-processes", "2", "--main-process-port", str(free_port()), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(one.run), rtol=1e-4, atol=1e-6)


def test_runs_are_continued_by_their_own_command(teacher, tmp_path):
    student = distilled(teacher, tmp_path / "student").run
    with pytest.raises(UserError, match="is a distillation of .*difftool distill"):
        plan = plan_training(resume=str(student), values={"train.max_steps": 8})
        train(plan.cfg, plan.output, resume=plan.resume)
    with pytest.raises(UserError, match="is a training run, not a distillation: continue it with difftool train"):
        plan_distillation(resume=str(teacher))
    with pytest.raises(UserError, match="already a student, distilled from"):
        plan_distillation(teacher=str(student))


def test_a_teacher_that_changed_is_refused_on_resume(teacher, tmp_path):
    copy = tmp_path / "teacher"
    subprocess.run(["cp", "-r", str(teacher), str(copy)], check=True)
    distilled(copy, tmp_path / "student", "train.max_steps=3")
    train(tiny_config("sample.guidance_scale=2", "train.seed=5"), copy, overwrite=True)
    with pytest.raises(UserError, match="not the model this distillation started from"):
        distilled(copy, tmp_path / "student", resume=str(tmp_path / "student"))


@pytest.mark.parametrize("case", ["missing", "foreign", "no data", "data not here", "recipe", "unknown recipe",
                                  "student", "bad setting"])
def test_teachers_that_cannot_be_distilled_are_refused_before_anything_is_written(teacher, tmp_path, scratch_cwd,
                                                                                 case):
    args, expected = [teacher], []
    if case == "missing":
        args, expected = [tmp_path / "nothing"], ["nothing"]
    elif case in ("foreign", "no data"):
        unet = UNet2DModel.from_pretrained(teacher / "model" / "unet")
        config = dict(unet.config, act_fn="relu") if case == "foreign" else dict(unet.config)
        UNet2DModel.from_config(config).save_pretrained(tmp_path / "unet")
        args = [tmp_path / "unet", "--dataset", "shapes"] if case == "foreign" else [tmp_path / "unet"]
        expected = ["not one difftool builds", "act_fn"] if case == "foreign" else ["no null class"]
    elif case == "data not here":  # trained with --dataset ./my_images, distilled from another folder
        subprocess.run(["cp", "-r", str(teacher), str(tmp_path / "moved")], check=True)
        config = tmp_path / "moved" / "config.yaml"
        config.write_text(config.read_text().replace("dataset: shapes", "dataset: ./my_images"))
        args, expected = [tmp_path / "moved"], ["the teacher's training data ./my_images", "give it with --dataset"]
    elif case == "recipe":
        (tmp_path / "mine.yaml").write_text("train:\n  lr: 0.001\nmodel:\n  block_out_channels: [4, 8]\n")
        args, expected = [teacher, "--recipe", tmp_path / "mine.yaml"], ["model.block_out_channels", "keeps its teacher"]
    elif case == "unknown recipe":
        args, expected = [teacher, "--recipe", "consistensy"], ["did you mean 'consistency'"]
    elif case == "student":
        student = distilled(teacher, tmp_path / "student").run
        args, expected = [student], ["already a student"]
    elif case == "bad setting":
        args, expected = [teacher, "--set", "distill.teacher_prediction=eps"], ["distill.teacher_prediction must be"]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_user_error(invoke("distill", *args, "--output", tmp_path / "out"), *expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


class _Exact(torch.nn.Module):
    """The perfect denoiser of a data set of one image: its exact v (or noise, or image) at any noisy input."""

    dtype = torch.float32

    def __init__(self, image, alpha_bar, kind):
        super().__init__()
        self.image, self.alpha_bar, self.kind, self.w = image, alpha_bar, kind, torch.nn.Parameter(torch.zeros(()))

    def forward(self, z, t, class_labels=None):
        a = self.alpha_bar[t][:, None, None, None]
        noise = (z - a.sqrt() * self.image) / (1 - a).sqrt()
        out = {"epsilon": noise, "sample": self.image.expand_as(z),
               "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * self.image}[self.kind]
        return type("Out", (), {"sample": out + self.w})()


@pytest.mark.parametrize(("teacher_kind", "student_kind"), [
    ("v_prediction", "v_prediction"), ("epsilon", "epsilon"), ("epsilon", "v_prediction"), ("sample", "v_prediction"),
])
def test_progressive_targets_are_exact_for_an_exact_teacher(teacher, teacher_kind, student_kind):
    """On the path of a perfect teacher, two DDIM steps land where one of the perfect student does: the loss is 0
    in every round (the first taught by the teacher in its own parameterization, the second by the student in
    its), and a student that is wrong is charged for it."""
    from difftool.distilling.progressive import ProgressiveDistillation

    cfg = plan_distillation(teacher=str(teacher), recipe="progressive",
                            overrides=["distill.rounds=2", "train.max_steps=4", "sample.steps=2"]).cfg
    cfg.scheduler.rescale_betas_zero_snr = False  # an epsilon model has no clean image at zero SNR
    cfg.scheduler.prediction_type = student_kind
    cfg.distill.teacher_prediction = teacher_kind if teacher_kind != student_kind else None
    schedule = build_noise_scheduler(cfg.scheduler)
    image = torch.rand(1, 3, 8, 8) * 1.6 - 0.8
    exact = _Exact(image, schedule.alphas_cumprod, student_kind)
    objective = ProgressiveDistillation(cfg, _Cpu(), exact, _Exact(image, schedule.alphas_cumprod, teacher_kind),
                                        schedule, null_class=None)
    t = torch.arange(0, 50)
    x0 = image.expand(50, -1, -1, -1)
    for step in (0, 2):  # one step of each round: 8 -> 4 and 4 -> 2 steps (T = 50)
        objective.begin_step(step)
        assert objective.loss(exact, x0, None, torch.randn_like(x0), t).item() < 1e-8
    wrong = _Exact(image * 0.5, schedule.alphas_cumprod, student_kind)
    assert objective.loss(wrong, x0, None, torch.randn_like(x0), t).item() > 1e-3


def test_a_progressive_student_of_an_epsilon_teacher_predicts_v(tmp_path, scratch_cwd):
    """DDPM's own setup (epsilon, linear betas, clipping: the cifar10 recipe) makes a student that predicts v and
    says so in its scheduler, for difftool and diffusers alike; the teacher is still read as epsilon."""
    eps = ["scheduler.prediction_type=epsilon", "scheduler.rescale_betas_zero_snr=false",
           "scheduler.beta_schedule=linear", "scheduler.clip_sample=true"]
    eps_teacher = train(tiny_config(*eps), tmp_path / "eps").run
    plan = plan_distillation(teacher=str(eps_teacher), overrides=QUICK, output=tmp_path / "student")
    assert (plan.cfg.scheduler.prediction_type, plan.cfg.distill.teacher_prediction) == ("v_prediction", "epsilon")
    assert plan.cfg.scheduler.clip_sample and plan.cfg.scheduler.beta_schedule == "linear", "the schedule is kept"
    student = distill(plan.cfg, plan.output).run
    saved = json.loads((student / "model" / "scheduler" / "scheduler_config.json").read_text())
    assert saved["prediction_type"] == "v_prediction"
    assert config_mod.read_config(RunDir(student).config).distill.teacher_prediction == "epsilon"
    made = invoke("sample", str(student), "-n", "2", "-o", "s", "-q")
    assert made.exit_code == 0, made.output
    consistency = plan_distillation(teacher=str(eps_teacher), recipe="consistency").cfg
    assert (consistency.scheduler.prediction_type, consistency.distill.teacher_prediction) == ("epsilon", None)


def test_progressive_rounds_halve_and_resume_exactly_across_a_round(teacher, tmp_path):
    from difftool.distilling.progressive import ddim_grid

    for steps in (1, 2, 3, 4, 8, 32):
        ddim = make_scheduler("ddim", dict(build_noise_scheduler(tiny_config().scheduler).config), steps=steps)
        ddim.set_timesteps(steps)
        assert ddim_grid(50, steps) == ddim.timesteps.tolist(), "the student's grid is its sampler's"
    progressive = ["distill.rounds=2", "sample.steps=2"]
    whole = distilled(teacher, tmp_path / "whole", *progressive, recipe="progressive")
    assert config_mod.read_config(RunDir(whole.run).config).distill.round_steps == 3, "max_steps / rounds"
    distilled(teacher, tmp_path / "part", *progressive, "train.max_steps=3", "distill.round_steps=3",
              recipe="progressive")
    resumed = distilled(teacher, tmp_path / "part", *progressive, resume=str(tmp_path / "part"))
    assert losses(resumed.run) == losses(whole.run), "the next round's teacher is part of the state"
    cfg = config_mod.read_config(RunDir(whole.run).config)
    assert (cfg.sample.scheduler, cfg.sample.steps, cfg.distill.method) == ("ddim", 2, "progressive")


def test_the_student_is_judged_by_its_teachers_judge(tmp_path, capsys, monkeypatch):
    from difftool.evaluation import judge as judge_mod

    monkeypatch.setattr(judge_mod, "MIN_STEPS", 30)  # a judge of a few steps: what is kept matters, not how well
    monkeypatch.setattr(judge_mod, "MAX_STEPS", 30)
    judged = ["eval.every=3", "eval.features=judge", "eval.num_samples=8", "eval.scheduler=ddim", "eval.steps=2",
              "data.num_images=200", "sample.every=100"]
    teacher = train(tiny_config(*judged), tmp_path / "teacher").run
    capsys.readouterr()
    student = distilled(teacher, tmp_path / "student", *judged[:1], "eval.num_samples=8").run
    said = capsys.readouterr().err
    assert f"reused {teacher / 'eval' / 'judge.pt'}" in " ".join(said.split())
    assert (student / "eval" / "judge.pt").read_bytes() == (teacher / "eval" / "judge.pt").read_bytes()
    records = [r for r in map(json.loads, RunDir(student).metrics.read_text().splitlines()) if "eval/fd_judge" in r]
    assert [r["step"] for r in records] == [3, 6]


def test_a_stopped_student_is_continued_with_distill(teacher, tmp_path):
    from difftool.reporting.facts import read_facts

    student = distilled(teacher, tmp_path / "student", "train.max_steps=3").run
    run = RunDir(student)
    run.config.write_text(run.config.read_text().replace("max_steps: 3", "max_steps: 6"))
    lines = run.sessions.read_text().splitlines()
    lines = [line.replace('"max_steps": 3', '"max_steps": 6').replace('"finished"', '"stopped"') for line in lines]
    run.sessions.write_text("\n".join(lines) + "\n")
    facts = read_facts(run, 3)
    assert facts.command == "distill" and f"continue with difftool distill --resume {student}" in facts.state
    from difftool.reporting.page import make_report

    page = make_report(student, places=[]).path.read_text()
    assert f"{teacher.resolve()} (progressive distillation, guidance 2.0 baked in)" in page
    assert f"difftool distill --resume {student}" in page


def test_a_student_of_a_checkpoint_is_named_after_its_run(teacher, scratch_cwd):
    from difftool.output_rules import source_name

    assert source_name("runs/letters/checkpoints/best") == "letters-best"
    assert source_name("runs/letters/checkpoints/step-004000") == "letters-step-004000"
    plan = plan_distillation(teacher=str(teacher / "checkpoints" / "step-000006"))
    assert plan.output == Path("runs") / "teacher-step-000006-distilled"
