"""Training on a tiny model: run folder, diffusers loading, exact resume, EMA, conditioning."""

from __future__ import annotations

import json
import math
import weakref
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, UNet2DModel
from safetensors.torch import load_file

from difftool import config as config_mod
from difftool.errors import UserError
from difftool.models.load import load_model
from difftool.rundir import RunDir
from difftool.sampling.loop import to_uint8
from difftool.training import setup as setup_mod
from difftool.training import step as step_mod
from difftool.training.loop import train
from difftool.training.objective import Denoising
from difftool.training.plan import plan_training
from tests.conftest import tiny_config
from tests.training.conftest import all_finite, interrupt_at, losses


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "diffusion_pytorch_model.safetensors")


def test_run_folder_layout_and_plain_diffusers_loading(tmp_path):
    result = train(tiny_config(), tmp_path / "run")
    run = RunDir(result.run)
    assert result.finished and result.step == 6
    assert run.config.is_file()
    assert [p.name for p in run.checkpoints()] == ["step-000003", "step-000006"]
    assert sorted(p.name for p in run.samples_dir.iterdir()) == ["step-000003.png", "step-000006.png"]
    assert len(losses(run.root)) == 6
    info = json.loads((run.model_dir / "difftool.json").read_text())
    assert info["label_names"] == ["circle", "square", "triangle", "ring", "cross"] and info["null_class"] == 5

    pipe = DDPMPipeline.from_pretrained(run.model_dir)
    assert isinstance(pipe.unet, UNet2DModel) and pipe.unet.config.num_class_embeds == 6
    assert pipe.scheduler.config.num_train_timesteps == 50
    raw = UNet2DModel.from_pretrained(run.model_dir / "unet_raw")
    ema_w, raw_w = weights(run.model_dir / "unet"), weights(run.model_dir / "unet_raw")
    assert ema_w.keys() == raw_w.keys()
    assert any(not torch.equal(ema_w[k], raw_w[k]) for k in ema_w), "EMA weights must differ from raw weights"
    assert raw.dtype == torch.float32
    # The EMA copy in the last checkpoint is the exported one.
    assert all(torch.equal(ema_w[k], v) for k, v in weights(run.checkpoints()[-1] / "unet_ema").items())


def test_same_seed_same_loss_curve(tmp_path):
    a = train(tiny_config(), tmp_path / "a")
    b = train(tiny_config(), tmp_path / "b")
    c = train(tiny_config("train.seed=1"), tmp_path / "c")
    assert losses(a.run) == losses(b.run)
    assert losses(a.run) != losses(c.run)


def test_interrupted_run_resumes_exactly(tmp_path, monkeypatch):
    cfg = ("train.max_steps=8", "checkpoint.every=5", "model.dropout=0.1")
    full = train(tiny_config(*cfg), tmp_path / "full")
    interrupt_at(monkeypatch, 4)
    stopped = train(tiny_config(*cfg), tmp_path / "part")
    assert (stopped.step, stopped.finished, stopped.model_dir) == (4, False, None)
    assert [p.name for p in RunDir(stopped.run).checkpoints()] == ["step-000004"]
    monkeypatch.undo()

    plan = plan_training(resume=str(stopped.run))
    assert plan.resume.name == "step-000004"
    resumed = train(plan.cfg, plan.output, resume=plan.resume)
    assert resumed.step == 8 and resumed.finished
    torch.testing.assert_close(losses(resumed.run), losses(full.run), rtol=0, atol=0)
    for sub in ("unet", "unet_raw"):
        a, b = weights(full.run / "model" / sub), weights(resumed.run / "model" / sub)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_resume_can_extend_a_finished_run(tmp_path):
    first = train(tiny_config("train.max_steps=3"), tmp_path / "r")
    plan = plan_training(resume=str(first.run), values={"train.max_steps": 5})
    assert train(plan.cfg, plan.output, resume=plan.resume).step == 5
    assert len(losses(first.run)) == 5
    with pytest.raises(UserError, match="already trained to step 5"):
        plan = plan_training(resume=str(first.run))
        train(plan.cfg, plan.output, resume=plan.resume)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    one = train(tiny_config(), tmp_path / "one")
    two = train(tiny_config("train.grad_accum=2"), tmp_path / "two")
    torch.testing.assert_close(losses(two.run), losses(one.run), rtol=1e-4, atol=1e-5)


def test_resume_refuses_changed_model(tmp_path):
    run = train(tiny_config(), tmp_path / "run").run
    with pytest.raises(UserError, match="different config.*model.block_out_channels"):
        plan = plan_training(resume=str(run), overrides=["model.block_out_channels=[8, 8]"])
        train(plan.cfg, plan.output, resume=plan.resume)


def test_existing_run_is_never_overwritten_silently(tmp_path):
    run = train(tiny_config(), tmp_path / "run").run
    before = weights(run / "model" / "unet")
    with pytest.raises(UserError, match="already holds a run.*--resume.*--overwrite"):
        train(tiny_config("train.seed=3"), run)
    assert all(torch.equal(before[k], v) for k, v in weights(run / "model" / "unet").items())
    train(tiny_config("train.seed=3"), run, overwrite=True)
    assert any(not torch.equal(before[k], v) for k, v in weights(run / "model" / "unet").items())


@pytest.mark.parametrize("below", [False, True])
def test_output_that_is_a_file_is_refused(tmp_path, below):
    (tmp_path / "notes.txt").write_text("mine")
    output = tmp_path / "notes.txt" / "run" if below else tmp_path / "notes.txt"
    with pytest.raises(UserError, match=f"cannot write into {output}: {tmp_path / 'notes.txt'} is a file, not a folder"):
        train(tiny_config(), output)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_checkpoint_rotation(tmp_path):
    result = train(tiny_config("train.max_steps=9", "checkpoint.every=2", "checkpoint.total_limit=2"), tmp_path / "r")
    assert [p.name for p in RunDir(result.run).checkpoints()] == ["step-000008", "step-000009"]


@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
def test_prediction_types_and_min_snr_train(tmp_path, prediction):
    result = train(tiny_config(f"scheduler.prediction_type={prediction}", "train.min_snr_gamma=5", "train.max_steps=3"),
                   tmp_path / prediction)
    assert all(torch.isfinite(torch.tensor(losses(result.run))))
    assert DDPMPipeline.from_pretrained(result.run / "model").scheduler.config.prediction_type == prediction


def test_epsilon_weighting_is_the_epsilon_loss_where_the_signal_is_strong():
    """v loss x max(alpha_bar, floor): the epsilon loss where alpha_bar >= floor, floor x the v loss below it."""
    from diffusers import DDPMScheduler

    cfg = tiny_config("scheduler.prediction_type=v_prediction", "train.epsilon_weighting=0.2")
    schedule = DDPMScheduler(num_train_timesteps=50, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                             rescale_betas_zero_snr=True)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1, torch.randn(2, 3, 8, 8, generator=g)
    prediction = torch.randn(2, 3, 8, 8, generator=g)

    class Fixed(torch.nn.Module):  # the same v prediction, whatever the input
        def forward(self, noisy, t, class_labels=None):
            return type("Output", (), {"sample": prediction})()

    objective = Denoising(cfg, schedule)
    for t in (3, 48):  # alpha_bar about 0.99 (above the floor) and 0.0003 (below it)
        ts = torch.full((2,), t)
        noisy = schedule.add_noise(x0, noise, ts)
        a = schedule.alphas_cumprod[t]
        implied_noise = a.sqrt() * prediction + (1 - a).sqrt() * noisy
        eps_loss = torch.nn.functional.mse_loss(implied_noise, noise)
        v_loss = torch.nn.functional.mse_loss(prediction, schedule.get_velocity(x0, noise, ts))
        expected = eps_loss if a >= 0.2 else 0.2 * v_loss
        assert objective.loss(Fixed(), x0, None, noise, ts).item() == pytest.approx(expected.item(), rel=1e-4)


def test_unconditional_on_labelled_data_has_no_class_embedding(tmp_path):
    result = train(tiny_config("model.class_conditional=false", "train.max_steps=2"), tmp_path / "u")
    assert UNet2DModel.from_pretrained(result.run / "model" / "unet").config.num_class_embeds is None


def _folder(root: Path, classes: list[str]) -> Path:
    """8 tiny PNGs, in one subfolder per class (a flat folder where `classes` is empty)."""
    from PIL import Image

    for i in range(8):
        sub = root / classes[i % len(classes)] if classes else root
        sub.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (i * 30, 0, 0)).save(sub / f"{i}.png")
    return root


@pytest.mark.parametrize("classes, conditional", [(["cat", "dog"], True), ([], False), (["only"], False)])
def test_auto_class_conditioning_follows_the_folder(tmp_path, capsys, classes, conditional):
    folder = _folder(tmp_path / "data", classes)
    result = train(tiny_config(f"data.dataset={folder}", "model.class_conditional=auto", "train.max_steps=1"),
                   tmp_path / "run")
    embeds = UNet2DModel.from_pretrained(result.run / "model" / "unet").config.num_class_embeds
    assert embeds == (3 if conditional else None)  # two classes and the null class of guidance
    saved = config_mod.read_config(result.run / "config.yaml")
    assert saved.model.class_conditional is conditional  # the run records what "auto" became
    assert ("conditioned on 2 classes" in capsys.readouterr().err) is conditional


def poison_steps(monkeypatch, *steps: int) -> None:
    """Make the images of the given (0-based) steps NaN, so exactly those steps get a NaN loss."""
    calls = iter(range(10**6))
    real = step_mod.make_batch

    def make_batch(*args, **kwargs):
        x0, labels = real(*args, **kwargs)
        return (torch.full_like(x0, float("nan")) if next(calls) in steps else x0), labels

    monkeypatch.setattr(step_mod, "make_batch", make_batch)


def test_nan_loss_stops_at_its_step_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    poison_steps(monkeypatch, 4)  # the 5th step; logged every 3 steps, so found at step 6
    with pytest.raises(UserError, match=r"loss became nan at step 5; .*Lower train.lr.*--skip-nonfinite N "
                                        r"\(last good checkpoint: .*step-000003\)"):
        train(tiny_config("log.every=3"), tmp_path / "nan")
    run = RunDir(tmp_path / "nan")
    assert [c.name for c in run.checkpoints()] == ["step-000003"] and all_finite(run.checkpoints()[0])
    assert not run.model_dir.exists()


def test_diverging_lr_is_caught_with_the_same_hint(tmp_path):
    with pytest.raises(UserError, match="loss became (nan|inf) at step [0-9]+; .*Lower train.lr"):
        train(tiny_config("train.lr=1e30", "train.grad_clip=0", "train.warmup_steps=0"), tmp_path / "lr")


def test_skip_nonfinite_skips_a_bad_step_and_finishes(tmp_path, monkeypatch, capsys):
    poison_steps(monkeypatch, 4)
    result = train(tiny_config("train.skip_nonfinite=2"), tmp_path / "skip")
    assert result.finished and all_finite(result.run / "model" / "unet", "diffusion_pytorch_model.safetensors")
    records = [json.loads(line) for line in RunDir(result.run).metrics.read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [0, 0, 0, 0, 1, 1]
    assert records[4]["loss"] is None, "logged every step: step 5's window holds only the skipped step"
    assert all(math.isfinite(r["loss"]) for i, r in enumerate(records) if i != 4)
    assert "step 5: non-finite gradients" in capsys.readouterr().err
    assert json.loads((RunDir(result.run).checkpoints()[-1] / "progress.json").read_text())["skipped_steps"] == 1


def test_a_nan_preview_is_a_warning_not_a_black_grid(tmp_path, monkeypatch, capsys):
    def nan_samples(*args, **kwargs):
        return to_uint8(torch.full((4, 3, 8, 8), float("nan")))

    monkeypatch.setattr("difftool.training.outputs.sample_batch", nan_samples)
    result = train(tiny_config(), tmp_path / "run")
    assert result.finished and (result.run / "model" / "unet").is_dir(), "the run trains on"
    assert not list((result.run / "samples").glob("*.png"))
    assert "step 3: no sample grid (ddim): 4 of 4 preview images came out NaN or infinite" in capsys.readouterr().err


def test_skip_nonfinite_stops_when_too_many_in_a_row(tmp_path, monkeypatch):
    poison_steps(monkeypatch, 3, 4, 5)
    with pytest.raises(UserError, match=r"steps 4-6 in a row had non-finite gradients \(more than "
                                        r"train.skip_nonfinite=2\).*step-000003"):
        train(tiny_config("train.skip_nonfinite=2", "train.max_steps=8"), tmp_path / "stop")


def test_skipping_changes_nothing_while_gradients_are_finite(tmp_path):
    plain = train(tiny_config("train.grad_clip=0"), tmp_path / "plain")
    guarded = train(tiny_config("train.grad_clip=0", "train.skip_nonfinite=1"), tmp_path / "guarded")
    assert losses(guarded.run) == losses(plain.run)


def test_a_run_stopped_by_nan_resumes_with_skipping(tmp_path, monkeypatch):
    poison_steps(monkeypatch, 4)
    with pytest.raises(UserError, match="at step 5"):
        train(tiny_config(), tmp_path / "r")
    poison_steps(monkeypatch, 1)  # counted from the resumed step 3: step 5 again
    plan = plan_training(resume=str(tmp_path / "r"), overrides=["train.skip_nonfinite=1"])
    assert plan.resume.name == "step-000003"
    result = train(plan.cfg, plan.output, resume=plan.resume)
    assert result.finished and [json.loads(x)["step"] for x in RunDir(result.run).metrics.read_text().splitlines()] \
        == [1, 2, 3, 4, 5, 6]


def test_batch_larger_than_data_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="fewer than train.batch_size"):
        train(tiny_config("data.num_images=4"), tmp_path / "small")


def test_tensorboard_tracker_writes_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    result = train(tiny_config("log.trackers=[tensorboard]", "train.max_steps=2"), tmp_path / "tb")
    assert list((result.run / "logs").rglob("events.out.tfevents.*"))


@pytest.mark.parametrize(("avx512_bf16", "amx", "expected"), [(True, False, "bf16"), (False, True, "bf16"), (False, False, "no")])
def test_auto_precision_uses_bf16_only_where_the_cpu_has_it(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert setup_mod.resolve_precision("auto", on_cpu=True) == expected
    assert setup_mod.resolve_precision("no", on_cpu=True) == "no"


def test_fp16_on_cpu_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        train(tiny_config("train.mixed_precision=fp16"), tmp_path / "fp16")
    assert not (tmp_path / "fp16").exists()


def test_a_second_run_in_one_process_may_change_precision(tmp_path, capsys):
    """accelerate keeps the first Accelerator's settings for the process; each train() call gets its own."""
    train(tiny_config("train.max_steps=1"), tmp_path / "fp32")
    train(tiny_config("train.max_steps=1", "train.mixed_precision=bf16"), tmp_path / "bf16")
    err = capsys.readouterr().err
    assert "on cpu (fp32)" in err and "on cpu (bf16)" in err


def test_epochs_set_the_number_of_steps(tmp_path):
    # 64 images at batch 8: 8 steps per epoch.
    result = train(tiny_config("train.epochs=1", "checkpoint.every=100", "sample.every=100"), tmp_path / "e")
    assert result.step == 8


def test_class_conditional_needs_labels(tmp_path):
    folder = _folder(tmp_path / "flat", [])
    with pytest.raises(UserError, match="has no labels"):
        train(tiny_config(f"data.dataset={folder}"), tmp_path / "run")
    assert not (tmp_path / "run").exists(), "nothing is written before the inputs are known to be good"


def test_gradient_checkpointing_gives_the_same_losses(tmp_path):
    plain = train(tiny_config("train.max_steps=3"), tmp_path / "plain")
    saved = train(tiny_config("train.max_steps=3", "train.gradient_checkpointing=true"), tmp_path / "ckpt")
    torch.testing.assert_close(losses(saved.run), losses(plain.run), rtol=1e-5, atol=1e-6)


def test_compile_without_a_cpp_compiler_is_refused_before_any_work(tmp_path):
    import torch._inductor.config as inductor_config

    with (inductor_config.patch({"cpp.cxx": ("/nonexistent/g++",)}),
          pytest.raises(UserError, match=r"train.compile=true needs a working C\+\+ compiler.*set CXX")):
        train(tiny_config("train.compile=true"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_torch_compile_trains_like_eager(tmp_path):
    from torch._dynamo.utils import counters

    eager = train(tiny_config("train.max_steps=3"), tmp_path / "eager")
    counters.clear()
    compiled = train(tiny_config("train.max_steps=3", "train.compile=true"), tmp_path / "compiled")
    assert counters["stats"]["unique_graphs"] >= 1, "the second run of the process compiled (accelerate kept the first)"
    # Inductor reorders float sums: after 3 steps the losses drift by about 0.2%.
    torch.testing.assert_close(losses(compiled.run), losses(eager.run), rtol=1e-2, atol=1e-4)
    assert DDPMPipeline.from_pretrained(compiled.run / "model").unet.config.block_out_channels == [8, 16]


def test_trains_on_a_folder_with_class_subfolders(tmp_path):
    from PIL import Image

    for name, colour in [("apples", (200, 20, 20)), ("leaves", (20, 160, 40))]:
        (tmp_path / "photos" / name).mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (12 + i, 10), colour).save(tmp_path / "photos" / name / f"{i}.jpg")
    result = train(tiny_config(f"data.dataset={tmp_path / 'photos'}", "train.max_steps=2"), tmp_path / "run")
    info = json.loads((result.run / "model" / "difftool.json").read_text())
    assert info["label_names"] == ["apples", "leaves"] and info["num_classes"] == 2
    assert UNet2DModel.from_pretrained(result.run / "model" / "unet").config.num_class_embeds == 3


def test_trains_on_a_hub_dataset_through_datasets(tmp_path, monkeypatch):
    """The hub path with a local `datasets.Dataset` standing in for the download."""
    import datasets
    from PIL import Image

    local = datasets.Dataset.from_dict(
        {"img": [Image.new("L", (8, 8), 16 * i) for i in range(16)], "label": [i % 2 for i in range(16)]},
        features=datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["dark", "light"])}),
    )
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split=None, **kw: asked.append((name, split)) or local)
    result = train(tiny_config("data.dataset=someone/grey-squares", "train.max_steps=2"), tmp_path / "run")
    assert asked == [("someone/grey-squares", "train")]
    unet = UNet2DModel.from_pretrained(result.run / "model" / "unet")
    assert (unet.config.in_channels, unet.config.num_class_embeds) == (1, 3)  # grayscale data, 2 classes + null


def test_init_from_refuses_a_different_unet(tmp_path):
    source = tiny_config("train.max_steps=2", "checkpoint.every=1000", "sample.every=1000")
    train(source, tmp_path / "source")
    wider = tiny_config("train.max_steps=2", f"train.init_from={tmp_path / 'source'}", "model.block_out_channels=[16, 16]")
    with pytest.raises(UserError, match=r"train.init_from .* is not the UNet this recipe builds .*tensors differ"):
        train(wider, tmp_path / "wider")
    assert not (tmp_path / "wider" / "checkpoints").exists()


def test_init_from_starts_from_the_given_weights(tmp_path):
    source = tiny_config("train.max_steps=2", "checkpoint.every=1000", "sample.every=1000")
    train(source, tmp_path / "source")
    tuned = tiny_config("train.max_steps=1", "train.lr=1e-12", "train.warmup_steps=0", "ema.enabled=false",
                        f"train.init_from={tmp_path / 'source'}", "checkpoint.every=1000", "sample.every=1000")
    train(tuned, tmp_path / "tuned")
    before, after = load_model(tmp_path / "source").unet.state_dict(), load_model(tmp_path / "tuned").unet.state_dict()
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)
    fresh = tiny_config("train.max_steps=1", "train.lr=1e-12", "train.warmup_steps=0", "ema.enabled=false",
                        "checkpoint.every=1000", "sample.every=1000")
    train(fresh, tmp_path / "fresh")
    other = load_model(tmp_path / "fresh").unet.state_dict()
    assert not all(torch.allclose(before[k], other[k], atol=1e-6) for k in before)


def test_the_prepared_model_is_released_before_the_process_group_ends(tmp_path, monkeypatch):
    """Under DDP, a model freed after accelerate ends the process group (when `train` returns) waits forever in
    its gloo destructor for a rank that has already left: two-process runs hung at their very end."""
    from accelerate import Accelerator

    prepared, alive_at_end = [], []
    original_prepare, original_end = Accelerator.prepare, Accelerator.end_training

    def prepare(self, *objects, **kwargs):
        out = original_prepare(self, *objects, **kwargs)
        prepared.extend(weakref.ref(o) for o in out if isinstance(o, torch.nn.Module))
        return out

    def end_training(self):
        alive_at_end.extend(ref() is not None for ref in prepared)
        return original_end(self)

    monkeypatch.setattr(Accelerator, "prepare", prepare)
    monkeypatch.setattr(Accelerator, "end_training", end_training)
    assert train(tiny_config(), tmp_path / "run").finished
    assert prepared and alive_at_end == [False] * len(prepared)
