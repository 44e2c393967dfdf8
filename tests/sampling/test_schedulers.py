"""Every sampler of the registry through the one denoising loop, on a tiny random UNet.

Also pins the diffusers traps the registry works around, so a diffusers upgrade that changes
them shows up here.
"""

from __future__ import annotations

import json

import pytest
import torch
import typer
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    LCMScheduler,
    TCDScheduler,
    UNet2DModel,
)
from typer.testing import CliRunner

from difftool.cli.schedulers import schedulers as schedulers_command
from difftool.config_rules import PREDICTION_TYPES
from difftool.errors import UserError
from difftool.sampling.loop import Predictor, denoise, image_generators, initial_noise, to_uint8
from difftool.sampling.schedulers import (
    SCHEDULERS,
    describe,
    get_spec,
    make_scheduler,
    model_calls,
    step_options,
    supports_karras,
)

T = 50
STEPS = 10
SHAPE = (3, 8, 8)
BY_NAME = pytest.mark.parametrize("spec", SCHEDULERS, ids=lambda spec: spec.name)


def training_config(**overrides) -> dict:
    """DDPM's noise range squeezed into 50 steps: sigma_max is about 12, far from the std 1 of scaled inputs."""
    settings = {"num_train_timesteps": T, "beta_start": 1e-3, "beta_end": 0.2, "clip_sample": True, **overrides}
    return dict(DDPMScheduler(**settings).config)


def sigma_max(config: dict) -> float:
    alpha_bar = DDPMScheduler.from_config(config).alphas_cumprod[-1]
    return float(((1 - alpha_bar) / alpha_bar) ** 0.5)


def tiny_unet(num_class_embeds: int | None = None) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, add_attention=False, num_class_embeds=num_class_embeds).eval()


@pytest.fixture(scope="module")
def unet() -> UNet2DModel:
    return tiny_unet()


class RecordingUNet:
    """Passes calls through to a UNet and keeps every input, to see what the loop feeds the model."""

    def __init__(self, unet):
        self.unet, self.inputs = unet, []

    @property
    def dtype(self):
        return self.unet.dtype

    def __call__(self, sample, timestep, **kwargs):
        self.inputs.append(sample.clone())
        return self.unet(sample, timestep, **kwargs)


def sample(unet, name: str, indices, *, steps: int = STEPS, config: dict | None = None, eta: float | None = None,
           sampler_seed: int | None = None, **options) -> torch.Tensor:
    """Images for `indices` of seed 0; `sampler_seed` gives the scheduler's noise other generators."""
    generators = image_generators(0, indices)
    noise = initial_noise(generators, SHAPE, "cpu")
    if sampler_seed is not None:
        generators = image_generators(sampler_seed, indices)
    scheduler = make_scheduler(name, config or training_config(), steps=steps, eta=eta, **options)
    return denoise(Predictor(unet), scheduler, noise, steps=steps, generators=generators, eta=eta)


# ---------------------------------------------------------------- every scheduler


@BY_NAME
def test_each_image_depends_only_on_seed_and_index(unet, spec):
    batch = sample(unet, spec.name, [0, 1, 2])
    assert batch.shape == (3, *SHAPE) and torch.isfinite(batch).all()
    assert not torch.allclose(batch[0], batch[1])
    assert torch.equal(batch, sample(unet, spec.name, [0, 1, 2]))
    alone = sample(unet, spec.name, [1])
    torch.testing.assert_close(batch[1:2], alone, rtol=1e-5, atol=1e-5)
    assert (to_uint8(batch[1:2]).int() - to_uint8(alone).int()).abs().max() <= 1


@BY_NAME
def test_model_calls_match_the_schedule(unet, spec):
    recorder = RecordingUNet(unet)
    scheduler = make_scheduler(spec.name, training_config(), steps=STEPS)
    denoise(Predictor(recorder), scheduler, initial_noise(image_generators(0, [0]), SHAPE, "cpu"), steps=STEPS,
            generators=image_generators(0, [0]))
    assert len(recorder.inputs) == len(scheduler.timesteps) == model_calls(spec, STEPS, training_config())
    if spec.name == "heun":
        assert len(recorder.inputs) > STEPS


@BY_NAME
def test_karras_sigmas_where_supported(unet, spec):
    if not supports_karras(spec):
        with pytest.raises(UserError, match="--karras-sigmas does not apply.*dpm-solver.*euler"):
            make_scheduler(spec.name, training_config(), steps=STEPS, karras_sigmas=True)
        return
    karras = make_scheduler(spec.name, training_config(), steps=STEPS, karras_sigmas=True)
    plain = make_scheduler(spec.name, training_config(), steps=STEPS)
    karras.set_timesteps(STEPS)
    plain.set_timesteps(STEPS)
    # Karras sigmas span the same range as the plain schedule, only spaced differently.
    assert float(karras.sigmas[0]) == pytest.approx(float(plain.sigmas[0]), rel=1e-4)
    if spec.spacing == "trailing":
        assert float(karras.sigmas[0]) == pytest.approx(sigma_max(training_config()), rel=1e-4)
    assert not torch.allclose(karras.sigmas, plain.sigmas)
    images = sample(unet, spec.name, [0], karras_sigmas=True)
    assert torch.isfinite(images).all()
    assert not torch.allclose(images, sample(unet, spec.name, [0]))


@BY_NAME
@pytest.mark.parametrize("kind", PREDICTION_TYPES)
def test_prediction_types_are_checked_up_front(unet, spec, kind):
    config = training_config(prediction_type=kind)
    if kind in spec.prediction_types:
        assert torch.isfinite(sample(unet, spec.name, [0], config=config)).all()
        return
    with pytest.raises(UserError, match=f"{spec.name} cannot sample .* prediction_type '{kind}'.*ddim"):
        make_scheduler(spec.name, config, steps=STEPS)
    # ...because diffusers itself would fail at the first step; PNDM with v-prediction does not fail but
    # is inexact (it mixes v of different steps), which the answer test below would show.
    if spec.name == "pndm" and kind == "v_prediction":
        return
    raw = spec.scheduler_class.from_config(config, **spec.settings)
    raw.set_timesteps(STEPS)
    x = torch.zeros(1, *SHAPE)
    with pytest.raises((ValueError, NotImplementedError)):
        raw.step(x, raw.timesteps[0], x)


@BY_NAME
def test_steps_must_lie_between_one_and_T(unet, spec):
    for steps in (0, T + 1):
        with pytest.raises(UserError, match=f"--steps must be between 1 and {T}"):
            make_scheduler(spec.name, training_config(), steps=steps)
    for steps in (1, 2, T):
        assert torch.isfinite(sample(unet, spec.name, [0], steps=steps)).all(), steps


# ---------------------------------------------------------------- traps in diffusers


def test_ddim_pipeline_silently_turns_any_scheduler_into_ddim(unet):
    pipe = DDIMPipeline(unet=unet, scheduler=make_scheduler("dpm-solver", training_config(), steps=STEPS))
    assert type(pipe.scheduler) is DDIMScheduler
    assert type(make_scheduler("dpm-solver", training_config(), steps=STEPS)) is DPMSolverMultistepScheduler
    assert (sample(unet, "dpm-solver", [0]) - sample(unet, "ddim", [0])).abs().max() > 1e-2


def test_ddpm_pipeline_breaks_on_schedulers_without_generator(unet):
    pipe = DDPMPipeline(unet=unet, scheduler=make_scheduler("unipc", training_config(), steps=STEPS))
    with pytest.raises(TypeError, match="generator"):
        pipe(batch_size=1, generator=image_generators(0, [0]), num_inference_steps=STEPS, output_type="pt")


@pytest.mark.parametrize("name", ["unipc", "heun", "pndm", "deis"])
def test_our_loop_gives_generators_only_to_schedulers_that_take_them(unet, name):
    options = step_options(make_scheduler(name, training_config(), steps=STEPS), generators=image_generators(0, [0]), eta=None)
    assert "generator" not in options
    assert torch.isfinite(sample(unet, name, [0, 1])).all()


@pytest.mark.parametrize("name", ["euler", "euler-a", "heun", "lms"])
def test_sigma_schedulers_see_unit_variance_inputs(unet, name):
    recorder = RecordingUNet(unet)
    scheduler = make_scheduler(name, training_config(), steps=STEPS)
    noise = initial_noise(image_generators(0, range(4)), SHAPE, "cpu")
    denoise(Predictor(recorder), scheduler, noise, steps=STEPS)
    assert scheduler.init_noise_sigma > 5  # the unscaled first sample would have std ~ sigma
    assert float(recorder.inputs[0].std()) == pytest.approx(1.0, abs=0.15)


@pytest.mark.parametrize("name", ["dpm-solver", "dpm-solver-sde", "dpm-solver-single", "unipc", "deis"])
def test_clip_sample_becomes_thresholding_for_solvers_without_it(unet, name):
    assert "clip_sample" not in get_spec(name).scheduler_class().config
    clipped = make_scheduler(name, training_config(clip_sample=True), steps=STEPS)
    assert clipped.config.thresholding and clipped.config.sample_max_value == 1.0
    assert not make_scheduler(name, training_config(clip_sample=False), steps=STEPS).config.thresholding
    # the random UNet predicts x0 far outside [-1, 1], so clipping shows in the images
    assert not torch.allclose(sample(unet, name, [0], config=training_config(clip_sample=True)),
                              sample(unet, name, [0], config=training_config(clip_sample=False)))


def test_dpm_solver_ends_inside_the_clip_range(unet):
    assert sample(unet, "dpm-solver", [0, 1]).abs().max() <= 1.0 + 1e-6
    assert sample(unet, "dpm-solver", [0, 1], config=training_config(clip_sample=False)).abs().max() > 1.0


@pytest.mark.parametrize("schedule", ["sigmoid", "laplace"])
@BY_NAME
def test_any_training_schedule_builds_with_the_training_betas(spec, schedule):
    config = training_config(beta_schedule=schedule)
    trained = DDPMScheduler.from_config(config)
    scheduler = make_scheduler(spec.name, config, steps=STEPS)
    torch.testing.assert_close(scheduler.betas, trained.betas)
    torch.testing.assert_close(scheduler.alphas_cumprod, trained.alphas_cumprod)
    if spec.class_name != "DDPMScheduler":  # why trained_betas: the plain from_config refuses the schedule
        with pytest.raises(NotImplementedError, match=schedule):
            spec.scheduler_class.from_config(config)


@BY_NAME
def test_short_schedules_start_at_pure_noise(spec):
    config = training_config()
    scheduler = make_scheduler(spec.name, config, steps=STEPS)
    scheduler.set_timesteps(STEPS)
    if spec.spacing == "leading":  # heun and pndm: see the registry for why they start below T - 1
        assert float(scheduler.timesteps[0]) < T - 1
        return
    assert float(scheduler.timesteps[0]) == T - 1
    if hasattr(scheduler, "sigmas"):
        assert float(scheduler.sigmas[0]) == pytest.approx(sigma_max(config), rel=1e-4)
    if "timestep_spacing" in scheduler.config and not spec.grid:  # the trap: "leading" starts below T - 1
        leading = make_scheduler(spec.name, config, steps=STEPS, timestep_spacing="leading")
        leading.set_timesteps(STEPS)
        assert float(leading.timesteps[0]) < T - 1


def test_full_length_schedules_use_trailing_spacing(unet):
    config = training_config()
    raw = DPMSolverMultistepScheduler.from_config(config, timestep_spacing="leading")
    raw.set_timesteps(T)
    x = torch.zeros(1, *SHAPE)
    with pytest.raises(IndexError):  # diffusers' multistep solvers break on leading spacing at steps == T
        for t in raw.timesteps:
            x = raw.step(x, t, x).prev_sample
    scheduler = make_scheduler("dpm-solver", config, steps=T, timestep_spacing="leading")
    assert scheduler.config.timestep_spacing == "trailing"
    assert torch.isfinite(sample(unet, "dpm-solver", [0], steps=T, timestep_spacing="linspace")).all()


def test_diffusers_ddpm_refuses_more_steps_than_training(unet):
    raw = DDPMScheduler.from_config(training_config())
    with pytest.raises(ValueError, match="cannot be larger"):
        raw.set_timesteps(T + 1)
    with pytest.raises(UserError, match=f"trained with {T} timesteps"):
        make_scheduler("ddpm", training_config(), steps=T + 1)


# ---------------------------------------------------------------- parity with diffusers' pipelines


@pytest.mark.parametrize(("name", "pipeline_class"), [("ddim", DDIMPipeline), ("ddpm", DDPMPipeline)])
def test_matches_the_diffusers_pipeline(unet, name, pipeline_class):
    scheduler = make_scheduler(name, training_config(), steps=STEPS, eta=0.0 if name == "ddim" else None)
    pipe = pipeline_class(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    # DDIM with clipping recomputes epsilon from the clipped x0 (as guided-diffusion's DDIM does); the
    # pipeline does so only when asked, its default washes images out.
    clipped = {"use_clipped_model_output": True} if name == "ddim" else {}
    expected = pipe(batch_size=3, generator=image_generators(0, range(3)), num_inference_steps=STEPS,
                    output_type="pt", **clipped).images
    ours = sample(unet, name, range(3), eta=0.0 if name == "ddim" else None)
    torch.testing.assert_close((ours / 2 + 0.5).clamp(0, 1), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("name", "scheduler_class"), [("lcm", LCMScheduler), ("tcd", TCDScheduler)])
def test_consistency_samplers_match_the_diffusers_step_loop(unet, name, scheduler_class):
    """diffusers has no unconditional LCM or TCD pipeline: its schedulers' own step loop is the reference, built
    from the training config (grid 50: all of T = 50 here) with the same generators drawing the same noise."""
    config = training_config(clip_sample=False)
    generators = image_generators(0, range(3))
    x = initial_noise(generators, SHAPE, "cpu")
    # The schedule spelled out: from_config drops what the DDPM config left at its defaults (its beta_schedule),
    # and LCM's own default is scaled_linear.
    reference = scheduler_class.from_config(config, original_inference_steps=T, beta_schedule=config["beta_schedule"],
                                            beta_start=config["beta_start"], beta_end=config["beta_end"])
    reference.set_timesteps(4)
    with torch.no_grad():
        for t in reference.timesteps:
            x = reference.step(unet(x, t).sample, t, x, generator=generators).prev_sample
    torch.testing.assert_close(sample(unet, name, range(3), steps=4, config=config), x, rtol=1e-5, atol=1e-5)


def test_consistency_samplers_step_on_their_grid():
    with pytest.raises(UserError, match="lcm steps on a grid of 50 .* --steps at most 50, got 51"):
        make_scheduler("lcm", dict(DDPMScheduler().config), steps=51)
    with pytest.raises(UserError, match="tcd takes no --timestep-spacing"):
        make_scheduler("tcd", training_config(), steps=4, timestep_spacing="leading")


class KnowsTheAnswer:
    """An analytic model (diffusers' tests use one too): it predicts exactly the noise, v or x0 that
    turns every x_t into the fixed image `answer`. Any correct sampler must end at `answer`."""

    dtype = torch.float32

    def __init__(self, config: dict, answer: torch.Tensor):
        self.alphas_cumprod = DDPMScheduler.from_config(config).alphas_cumprod
        self.kind, self.answer = config["prediction_type"], answer

    def __call__(self, x_t, t, **kwargs):
        alpha_bar = self.alphas_cumprod[round(float(t))]
        a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        eps = (x_t - a * self.answer) / s
        out = {"epsilon": eps, "v_prediction": a * eps - s * self.answer, "sample": self.answer.expand_as(x_t)}[self.kind]
        return type("Output", (), {"sample": out})


def answer(scale: float) -> torch.Tensor:
    return scale * torch.linspace(-1, 1, 3 * 8 * 8).reshape(SHAPE)


@pytest.mark.parametrize(("spec", "kind"), [(spec, kind) for spec in SCHEDULERS for kind in spec.prediction_types],
                         ids=lambda v: v if isinstance(v, str) else v.name)
def test_a_model_that_knows_the_answer_is_sampled_to_it(spec, kind):
    # beta_start 1e-6: DEIS ends at t = 0 rather than at sigma 0, so t = 0 must be almost noise-free
    config = training_config(prediction_type=kind, clip_sample=False, beta_start=1e-6)
    noise = initial_noise(image_generators(0, [0, 1]), SHAPE, "cpu")
    out = denoise(Predictor(KnowsTheAnswer(config, answer(0.9))), make_scheduler(spec.name, config, steps=STEPS), noise,
                  steps=STEPS, generators=image_generators(0, [0, 1]))
    torch.testing.assert_close(out, answer(0.9).expand_as(out), atol=5e-3, rtol=0)


@pytest.mark.parametrize("spec", [s for s in SCHEDULERS if "v_prediction" in s.prediction_types], ids=lambda s: s.name)
def test_zero_terminal_snr_models_are_sampled_to_the_answer(spec):
    """At zero terminal SNR the last alpha_bar is 0: DPM-Solver singlestep, DEIS and LMS turned it into an
    infinite sigma and sampled NaN until the registry gave them diffusers' own finite stand-in."""
    config = training_config(prediction_type="v_prediction", clip_sample=False, beta_start=1e-6,
                             rescale_betas_zero_snr=True)
    assert DDPMScheduler.from_config(config).alphas_cumprod[-1] == 0
    noise = initial_noise(image_generators(0, [0, 1]), SHAPE, "cpu")
    out = denoise(Predictor(KnowsTheAnswer(config, answer(0.9))), make_scheduler(spec.name, config, steps=STEPS), noise,
                  steps=STEPS, generators=image_generators(0, [0, 1]))
    torch.testing.assert_close(out, answer(0.9).expand_as(out), atol=5e-3, rtol=0)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_with_eta_samples_zero_terminal_snr_models_to_the_answer(eta):
    """diffusers' DDIM at eta 1 takes the sqrt of a rounding error below zero at the zero-SNR start: every
    image came out NaN, black once saved (diffusers issue 5969)."""
    config = training_config(prediction_type="v_prediction", clip_sample=False, beta_start=1e-6,
                             rescale_betas_zero_snr=True)
    noise = initial_noise(image_generators(0, [0, 1]), SHAPE, "cpu")
    out = denoise(Predictor(KnowsTheAnswer(config, answer(0.9))), make_scheduler("ddim", config, steps=STEPS, eta=eta), noise,
                  steps=STEPS, generators=image_generators(0, [0, 1]), eta=eta)
    torch.testing.assert_close(out, answer(0.9).expand_as(out), atol=5e-3, rtol=0)


@BY_NAME
def test_every_scheduler_keeps_clip_sample(spec):
    """x0 beyond [-1, 1] is clipped by every sampler of a clip_sample model: natively, by thresholding,
    or (euler, euler-a, lms, pndm) by the loop. Unclipped, cosine-schedule models give noise with euler."""
    config = training_config(clip_sample=True, beta_start=1e-6)
    noise = initial_noise(image_generators(0, [0]), SHAPE, "cpu")
    out = denoise(Predictor(KnowsTheAnswer(config, answer(1.5))), make_scheduler(spec.name, config, steps=STEPS), noise,
                  steps=STEPS, generators=image_generators(0, [0]))
    torch.testing.assert_close(out, answer(1.5).clamp(-1, 1).expand_as(out), atol=5e-3, rtol=0)


# ---------------------------------------------------------------- options


def test_ddim_eta(unet):
    deterministic = sample(unet, "ddim", [0, 1], eta=0.0)
    assert torch.equal(deterministic, sample(unet, "ddim", [0, 1], eta=0.0, sampler_seed=7))
    noisy = sample(unet, "ddim", [0, 1], eta=1.0)
    assert not torch.allclose(noisy, deterministic)
    assert not torch.allclose(noisy, sample(unet, "ddim", [0, 1], eta=1.0, sampler_seed=7))
    for bad in (-0.5, 1.5):  # above 1 diffusers samples NaN on any model
        with pytest.raises(UserError, match=f"--eta must lie between 0 .* and 1 .*, got {bad}"):
            make_scheduler("ddim", training_config(), steps=STEPS, eta=bad)


@pytest.mark.parametrize("spec", [s for s in SCHEDULERS if s.name not in ("ddim", "tcd")], ids=lambda spec: spec.name)
def test_eta_is_refused_outside_ddim_and_tcd(spec):
    with pytest.raises(UserError, match="--eta applies to ddim, tcd only"):
        make_scheduler(spec.name, training_config(), steps=STEPS, eta=0.0)


def test_timestep_spacing_is_checked():
    with pytest.raises(UserError, match="unknown --timestep-spacing 'lead'.*trailing"):
        make_scheduler("ddim", training_config(), steps=STEPS, timestep_spacing="lead")
    with pytest.raises(UserError, match="dpm-solver-single takes no --timestep-spacing"):
        make_scheduler("dpm-solver-single", training_config(), steps=STEPS, timestep_spacing="trailing")
    ddim = make_scheduler("ddim", training_config(), steps=STEPS, timestep_spacing="linspace")
    assert ddim.config.timestep_spacing == "linspace"


def test_classifier_free_guidance():
    unet = tiny_unet(num_class_embeds=4)
    generators = image_generators(0, range(2))
    noise = initial_noise(generators, SHAPE, "cpu")
    labels, null = torch.tensor([0, 1]), torch.full((2,), 3)

    def run(class_labels, scale):
        scheduler = make_scheduler("ddim", training_config(), steps=STEPS)
        return denoise(Predictor(unet, class_labels=class_labels, null_class=3, guidance_scale=scale), scheduler,
                       noise, steps=STEPS)

    conditional = run(labels, 1.0)
    torch.testing.assert_close(run(labels, 0.0), run(null, 1.0), rtol=1e-5, atol=1e-5)  # scale 0: unconditional
    assert not torch.allclose(conditional, run(null, 1.0))
    assert not torch.allclose(run(labels, 3.0), conditional)


class ScalesByClass:
    """A model whose output is its input times (class id + 1): conditional and null-class outputs are known."""

    dtype = torch.float32

    def __call__(self, x, t, class_labels=None):
        return type("Output", (), {"sample": x * (class_labels.float() + 1)[:, None, None, None]})


@pytest.mark.parametrize(("phi", "factor"), [(0.0, 4.0), (0.5, 3.0), (1.0, 2.0)])
def test_guidance_rescale_pulls_the_guided_std_towards_the_conditional(phi, factor):
    # cond = 2x, uncond = x, guidance 3: x + 3 (2x - x) = 4x, whose std is twice the conditional's.
    predict = Predictor(ScalesByClass(), class_labels=torch.tensor([1, 1]), null_class=0, guidance_scale=3.0,
                        guidance_rescale=phi)
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(predict(x, 0), factor * x)


# ---------------------------------------------------------------- names and listing


def test_aliases_and_case_resolve():
    assert get_spec("PLMS") is get_spec("pndm")
    assert get_spec("dpm++").name == "dpm-solver"


def test_unknown_name_suggests_the_nearest():
    with pytest.raises(UserError, match=r"unknown scheduler 'dpm-solvr'; did you mean 'dpm-solver'\? \(difftool schedulers"):
        get_spec("dpm-solvr")


@pytest.mark.parametrize("name", ["edm", "edm-euler", "edm-dpm-solver", "cosine-dpm-solver"])
def test_edm_schedulers_are_refused_with_the_alternative(name):
    with pytest.raises(UserError, match=r"EDM-preconditioned.*DDPM-trained.*euler --karras-sigmas.*dpm-solver --karras"):
        make_scheduler(name, training_config(), steps=STEPS)


def _invoke(*args):
    app = typer.Typer()
    app.command("schedulers")(schedulers_command)
    app.command("unused")(lambda: None)  # two commands, so the first argument names the command
    return CliRunner().invoke(app, ["schedulers", *args])


def test_listing_shows_every_scheduler():
    result = _invoke()
    assert result.exit_code == 0, result.output
    for spec in SCHEDULERS:
        assert spec.name in result.output


def test_piped_listing_is_one_readable_block_per_scheduler():
    """Piped (as here) the eight-column table wrapped its summaries into one word per line and cut the class names."""
    lines = _invoke().output.splitlines()
    for spec in SCHEDULERS:
        row = describe(spec)
        start = next(i for i, line in enumerate(lines) if line.split(" ")[0] == spec.name)
        block = " ".join(line.strip() for line in lines[start + 1:start + 4])
        assert block.startswith(f"{row['class']}; {row['recommended_steps']} steps = {row['model_calls']} model calls")
    assert max(map(len, lines)) <= 100


def test_listing_as_json():
    result = _invoke("--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [row["name"] for row in rows] == [spec.name for spec in SCHEDULERS]
    heun = next(row for row in rows if row["name"] == "heun")
    assert heun["model_calls"] == 2 * heun["recommended_steps"] - 1 and heun["karras_sigmas"] is True
    assert next(row for row in rows if row["name"] == "euler-a")["stochastic"] is True
