"""Sample quality on data the recipes were not tuned on, judged as a user would see it.

For each data set of `quality_data` and each variant (a recipe plus `--set` overrides), this trains
with the real CLI (`difftool train --dataset FOLDER`), samples with the run's own defaults
(`difftool sample RUN -n N`), and measures:

- brightness error: mean pixel of the samples minus that of the data, in levels of 255;
- domain FD: the Fréchet distance on the features of the judge `eval.features: judge` trains (a small
  classifier of the real images: an FID whose network knows the domain), against the reference the
  evaluation during training uses (up to 2,000 of the images the judge trained on), next to its floor
  (as many held-out real images, which the judge never saw, against the same reference). Results before
  2026-12-07 used the benchmark's own wider judge and a floor of two sets of trained-on images: their
  floors are lower, and their FDs are not comparable with later ones;
- class fidelity: the share of class-conditional samples the classifier assigns to the class they
  were asked for, and the largest share any one predicted class takes (balanced data: 1/K);
- the steps trained (where `train.until: plateau` stopped, and why), and the wall time of training apart
  from the judge's training and the evaluations;
- the seconds `difftool sample` took for the samples, whole process (model calls per image are what
  distillation saves).

With `--distill NAME=RECIPE`, every trained variant is also distilled (`difftool distill RUN --recipe RECIPE`) and
the student scored alike, at its own steps and at `--student-steps`: per model call, beside its teacher's
default and the teacher at as few steps (`--sampling "ddim4=--scheduler ddim --steps 4"`).

A picture of real images beside each variant's samples is written to benchmarks/figures/.

    python benchmarks/quality.py --sets dark-shapes,light-shapes,digits --resolution 16 --steps 600 \\
        --variant eps=quickstart:scheduler.prediction_type=epsilon --variant default=quickstart --record
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results  # noqa: E402
from quality_data import SETS, missing_module, write_set  # noqa: E402

from difftool.config import DataConfig, load_config  # noqa: E402
from difftool.images import enlarge, make_grid, save_png  # noqa: E402
from difftool.evaluation.judge import JudgeReport, held_out_split, reference_rows  # noqa: E402
from difftool.data import center_crops, load_dataset  # noqa: E402
from difftool.evaluation.judge import train_judge as train_judge_of  # noqa: E402
from difftool.evaluation.metrics import frechet_distance, gaussian_stats  # noqa: E402

FIGURES = Path(__file__).resolve().parent / "figures"


# ---------------------------------------------------------------- the judge: the one `eval.features: judge` trains

REFERENCE_IMAGES = 2000  # the recipes' eval.reference_images


def train_judge(images: torch.Tensor, labels: torch.Tensor, classes: list[str], *,
                floor_images: int) -> tuple[torch.jit.ScriptModule, JudgeReport, torch.Tensor, torch.Tensor]:
    """The judge difftool trains before a run's first step (difftool/evaluation/judge.py), on the same split and,
    as `data.random_flip: auto` (folder32's) trains it, without flips: the module, its report (held-out accuracy,
    mirrored too), the held-out rows (the floor's real side) and the reference rows. A mirrored sample of data that
    has a handedness is then judged as what it is, unlike the data, whatever a variant's flips."""
    held, rest = held_out_split(len(images), floor_images)
    judge, report = train_judge_of(images, labels, classes, held=held, train=rest, flips=False)
    return judge, report, held, reference_rows(rest, REFERENCE_IMAGES)


def mirrored(report: JudgeReport) -> str:
    if report.mirrored_accuracy is None:
        return ""
    return (f", mirrored {report.mirrored_accuracy:.1%} (data.random_flip: auto turns flips "
            f"{'off' if report.handed else 'on'})")


def read_set(folder: Path, resolution: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The set as `difftool train --dataset FOLDER` reads it (same order, crops and class ids, so the same
    held-out split and judge as a run's): uint8 N×C×H×W images, labels, class names."""
    data = load_dataset(dataclasses.replace(DataConfig(), dataset=str(folder), resolution=resolution))
    return center_crops(data, resolution), data.labels, data.label_names


@torch.inference_mode()
def judge_outputs(judge, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    outputs = [judge(images[i : i + 256]) for i in range(0, len(images), 256)]
    return torch.cat([f for f, _ in outputs]).numpy(), torch.cat([p for _, p in outputs]).argmax(1).numpy()


def domain_fd(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(gaussian_stats(a), gaussian_stats(b))


def probe_judge(judge, real_feats: np.ndarray, others: torch.Tensor) -> list[str]:
    """What the domain FD sees: held-out real images, changed in known ways, against the real features.

    Lines of a table: noise, blur, darkening and desaturation, each by an amount a person would notice.
    """
    x = others.float()
    grey = x.mean(1, keepdim=True)
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None]).expand(x.shape[1], 1, 3, 3) / 16

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(t, (1, 1, 1, 1), mode="replicate"), kernel, groups=t.shape[1])

    g = torch.Generator().manual_seed(0)
    changes = {"none (the floor)": x, "noise, sd 10 levels": x + 10 * torch.randn(x.shape, generator=g),
               "noise, sd 20 levels": x + 20 * torch.randn(x.shape, generator=g), "3x3 blur": blur(x),
               "3x3 blur twice": blur(blur(x)), "10 levels darker": x - 10, "30% desaturated": 0.7 * x + 0.3 * grey}
    return [f"| {name} | {domain_fd(real_feats, judge_outputs(judge, t.clamp(0, 255).round().to(torch.uint8))[0]):.2f} |"
            for name, t in changes.items()]


# ---------------------------------------------------------------- one variant on one set


def run_cli(args: list[str], log: Path) -> float:
    """Run `difftool ARGS`, output to `log`; the wall time in seconds (exit on failure)."""
    start = time.perf_counter()
    with log.open("a") as out:
        out.write("$ difftool " + " ".join(args) + "\n")
        out.flush()
        proc = subprocess.run([sys.executable, "-m", "difftool", *args], stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONWARNINGS": "ignore", "COLUMNS": "120"})
    if proc.returncode:
        sys.exit(f"difftool {' '.join(args)} failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - start


def read_samples(folder: Path, classes: list[str]) -> tuple[torch.Tensor, np.ndarray]:
    """uint8 N x C x H x W samples of a `difftool sample` folder and the class (index in `classes`) each was
    asked for, -1 where none was (the run's class ids follow its folder names, sorted)."""
    files = sorted(p for p in folder.glob("[0-9]*.png"))
    images, asked = [], []
    for file in files:
        with Image.open(file) as im:
            name = im.text.get("class")
            asked.append(classes.index(name) if name in classes else -1)
            array = np.asarray(im)
        images.append(array[..., None] if array.ndim == 2 else array)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), np.array(asked)


def own_steps(overrides: list[str]) -> list[str]:
    """A variant's own train.max_steps override (e.g. half the batch for twice the steps), if it has one."""
    return [o for o in overrides if o.startswith("train.max_steps=")]


def variant_steps(recipe: str, overrides: list[str], steps: int | None) -> int:
    """The steps a variant trains: its own train.max_steps, else --steps, else its recipe's."""
    if steps is None or own_steps(overrides):
        return load_config(recipe, own_steps(overrides)).train.max_steps
    return steps


def train_args(recipe: str, overrides: list[str], data: Path, run: Path, *, steps: int | None,
               resolution: int) -> list[str]:
    """The `difftool train` arguments of one variant on one set; --max-steps only where --steps overrides the recipe."""
    # `{set}` stands for the set's folder name, e.g. train.init_from=runs/quality/runs/{set}-eps
    overrides = [o.replace("{set}", data.name) for o in overrides]
    keep = steps is None or own_steps(overrides)
    return ["train", "--dataset", str(data), "--recipe", recipe, *([] if keep else ["--max-steps", str(steps)]),
            "--resolution", str(resolution), "--output", str(run), *[a for o in overrides for a in ("--set", o)]]


@dataclass
class Trained:
    """What a run's own records say about its training: steps, seconds apart from its evaluations, the stop."""

    steps: int
    train_s: float  # wall time less the judge's training and the evaluations
    eval_s: float  # the judge's training and every evaluation
    stop: str  # train.until's decision, if it made one


def trained(run: Path, wall_s: float) -> Trained:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = max(r["step"] for r in records if "loss" in r)
    judge = run / "eval" / "judge.json"
    eval_s = sum(r.get("eval/seconds", 0.0) for r in records) + (
        json.loads(judge.read_text())["report"]["seconds"] if judge.is_file() else 0.0)
    stop = next((f"{r['until/decided']} at step {r['step']}" for r in records if "until/decided" in r), "")
    return Trained(steps, wall_s - eval_s, eval_s, stop)


def train_variant(variant: str, recipe: str, overrides: list[str], data: Path, work: Path, *, steps: int | None,
                  resolution: int) -> tuple[Path, Trained]:
    """Train one variant on one set (reusing a finished run of the same name); the run and what its records say."""
    run = work / "runs" / f"{data.name}-{variant}"
    log = work / f"{data.name}-{variant}.log"
    args = train_args(recipe, overrides, data, run, steps=steps, resolution=resolution)
    timing = run / "benchmark-train.json"
    if timing.is_file() and json.loads(timing.read_text())["args"] == args:
        return run, trained(run, json.loads(timing.read_text())["seconds"])
    log.unlink(missing_ok=True)
    seconds = run_cli([*args, "--overwrite"], log)
    timing.write_text(json.dumps({"args": args, "seconds": seconds}))
    return run, trained(run, seconds)


def distill_variant(teacher: Path, name: str, recipe: str, overrides: list[str], work: Path) -> tuple[Path, Trained]:
    """`difftool distill` of a trained variant (reusing a finished student of the same name and teacher)."""
    run = work / "runs" / f"{teacher.name}-{name}"
    args = ["distill", str(teacher), "--recipe", recipe, "--output", str(run),
            *[a for o in overrides for a in ("--set", o)]]
    timing = run / "benchmark-train.json"
    made = {"args": args, "teacher": json.loads((teacher / "benchmark-train.json").read_text())}
    if timing.is_file() and {k: v for k, v in json.loads(timing.read_text()).items() if k != "seconds"} == made:
        return run, trained(run, json.loads(timing.read_text())["seconds"])
    seconds = run_cli([*args, "--overwrite"], work / f"{run.name}.log")
    timing.write_text(json.dumps({**made, "seconds": seconds}))
    return run, trained(run, seconds)


def sample_variant(run: Path, name: str, work: Path, classes: list[str], *, num_samples: int,
                   sample_args: list[str]) -> tuple[torch.Tensor, np.ndarray, float]:
    """The samples of a run with `sample_args`, the class each was asked for, and the seconds `difftool sample`
    took, whole process."""
    samples = work / "samples" / f"{run.name}-{name}"
    args = ["sample", str(run), "-n", str(num_samples), "--output", str(samples), *sample_args]
    # Samples of this very run (its training record) with these options are reused, as trained runs are.
    made = {"args": args, "run": json.loads((run / "benchmark-train.json").read_text())}
    record = samples / "benchmark-sample.json"
    if not (record.is_file() and {k: v for k, v in json.loads(record.read_text()).items() if k != "seconds"} == made):
        seconds = run_cli([*args, "--overwrite"], work / f"{run.name}.log")
        record.write_text(json.dumps({**made, "seconds": seconds}))
    return (*read_samples(samples, classes), json.loads(record.read_text()).get("seconds", float("nan")))


# ---------------------------------------------------------------- the whole benchmark


def parse_variant(text: str) -> tuple[str, str, list[str]]:
    """NAME=RECIPE[:key=value,key=value] -> (name, recipe, overrides); commas inside [...] stay in a value."""
    name, _, rest = text.partition("=")
    recipe, _, sets = rest.partition(":")
    if not name or not recipe:
        raise SystemExit(f"--variant {text!r}: write NAME=RECIPE[:key=value,...]")
    return name, recipe, [s for s in re.split(r",(?![^\[]*\])", sets) if s]


def figure(path: Path, real: torch.Tensor, rows: list[tuple[str, torch.Tensor]], per_row: int = 16) -> None:
    """Real images on top, then one row of samples per variant (nearest-neighbour x4)."""
    tiles = torch.cat([real[:per_row]] + [images[:per_row] for _, images in rows])
    save_png(make_grid(enlarge(tiles, 4), ncol=per_row), path, {"rows": "real, " + ", ".join(n for n, _ in rows)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="dark-shapes,light-shapes,digits",
                        help=f"comma-separated, of {', '.join(SETS)} (shapes: the built-in set, as a no-regression check)")
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--num-images", type=int, default=8000, help="images per shapes set (digits has 1,797)")
    parser.add_argument("--steps", type=int,
                        help="training steps of every variant without its own train.max_steps "
                             "(default: each recipe's own)")
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--variant", action="append", help="NAME=RECIPE[:key=value,...] (repeatable)")
    parser.add_argument("--sampling", action="append", default=[],
                        help="NAME=OPTIONS: also sample every run with these `difftool sample` options (repeatable)")
    parser.add_argument("--distill", action="append", default=[],
                        help="NAME=RECIPE[:key=value,...]: also distill every trained variant with `difftool distill "
                             "--recipe RECIPE` (consistency, progressive) and score the student (repeatable)")
    parser.add_argument("--student-steps", default="1,2,8",
                        help="also sample each student at these steps, besides its own default (comma-separated)")
    parser.add_argument("--work", type=Path, default=Path("runs/quality"))
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--probe-judge", action="store_true",
                        help="only print the domain FD of real images changed in known ways (noise, blur, colour)")
    args = parser.parse_args()
    variants = [parse_variant(v) for v in args.variant or []]
    if not variants and not args.probe_judge:
        parser.error("give at least one --variant (or --probe-judge)")
    if problem := missing_module(args.sets.split(",")):
        parser.error(problem)
    samplings = [("run defaults", [])] + [(s.partition("=")[0], s.partition("=")[2].split()) for s in args.sampling]
    distills = [parse_variant(d) for d in args.distill]
    student_samplings = [("run defaults", [])] + [(f"{k} steps", ["--steps", k]) for k in args.student_steps.split(",") if k]
    args.work.mkdir(parents=True, exist_ok=True)
    FIGURES.mkdir(exist_ok=True)
    lines = [("| set | variant | brightness error (levels) | domain FD | ÷ floor (held-out real) | right class | "
              "largest class share | steps | train.until | train s | judge + eval s | sample s |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for name in args.sets.split(","):
        folder = write_set(name, args.work / "data", resolution=args.resolution, num_images=args.num_images)
        real, labels, classes = read_set(folder, args.resolution)
        judge, report, held, reference = train_judge(real, labels, classes, floor_images=args.num_samples)
        n = min(args.num_samples, len(held))
        real_feats, _ = judge_outputs(judge, real[reference])  # the reference, as the evaluation in training has it
        floor = domain_fd(real_feats, judge_outputs(judge, real[held[:n]])[0])
        data_mean = real.float().mean().item()
        notes.append(f"- {name}: {len(real)} images, mean pixel {data_mean:.1f}; judge accuracy on held-out real "
                     f"images {report.accuracy:.1%}{mirrored(report)}; FD floor (held-out real images) at {n} images {floor:.3f}")
        print(notes[-1], flush=True)
        if args.probe_judge:
            print(f"| {name}: real images changed by | domain FD |\n|---|---|", flush=True)
            print("\n".join(probe_judge(judge, real_feats, real[held[:n]])), flush=True)
            continue
        rows = []
        for variant, recipe, overrides in variants:
            run, done = train_variant(variant, recipe, overrides, folder, args.work, steps=args.steps,
                                      resolution=args.resolution)
            models = [(variant, run, done, samplings)]
            for student, student_recipe, student_overrides in distills:
                student_run, student_done = distill_variant(run, student, student_recipe, student_overrides, args.work)
                models.append((f"{variant} → {student}", student_run, student_done, student_samplings))
            for label, model, done, model_samplings in models:
                for sampling, sample_args in model_samplings:
                    samples, asked, seconds = sample_variant(model, sampling.replace(" ", "-"), args.work, classes,
                                                             num_samples=args.num_samples, sample_args=sample_args)
                    feats, predicted = judge_outputs(judge, samples)
                    fd = domain_fd(real_feats, feats)
                    right = f"{(predicted == asked).mean():.0%}" if (asked >= 0).all() else "-"
                    share = np.bincount(predicted, minlength=len(classes)).max() / len(predicted)
                    error = samples.float().mean().item() - data_mean
                    shown = label if sampling == "run defaults" else f"{label}, {sampling}"
                    row = (f"| {name} | {shown} | {error:+.1f} | {fd:.2f} | {fd / max(floor, 1e-9):.1f}× | {right} | "
                           f"{share:.0%} (1/K = {1 / len(classes):.0%}) | {done.steps} | {done.stop or '-'} | "
                           f"{done.train_s:.0f} | {done.eval_s:.0f} | {seconds:.0f} |")
                    lines.append(row)
                    print(row, flush=True)
                    rows.append((shown, samples))
        figure(FIGURES / f"quality-{name}-{args.resolution}.png", real[held[:16]], rows)
    if args.probe_judge:
        return
    steps = [variant_steps(r, s, args.steps) for _, r, s in variants]
    variant_text = "\n".join(f"- {v}: `{r}` recipe" + (f" with {', '.join(f'`{o}`' for o in s)}" if s else "")
                             + f", {n} steps" for (v, r, s), n in zip(variants, steps))
    variant_text += "".join(f"\n- {name}: sampled with `{' '.join(opts)}`" for name, opts in samplings[1:])
    variant_text += "".join(f"\n- → {d}: `difftool distill RUN --recipe {r}`" + "".join(f" --set {o}" for o in s)
                            + f", sampled at its own steps and at {args.student_steps}" for d, r, s in distills)
    body = "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n\nVariants:\n" + variant_text + (
        f"\n\nEach variant trained at {args.resolution} px with `difftool train --dataset FOLDER`, "
        f"then `difftool sample RUN -n {args.num_samples}` with the run's own sampler settings (and the options named). "
        f"Figures: `benchmarks/figures/quality-SET-{args.resolution}.png` (top row real, then one row per variant).")
    print("\n" + body)
    if args.record:
        command = shlex.join(["python", "benchmarks/quality.py", *sys.argv[1:]])
        budget = f"{steps[0]} steps" if len(set(steps)) == 1 else "steps per variant"
        append_results(f"Sample quality on unseen data, {args.resolution} px, {budget}", command, body)


if __name__ == "__main__":
    main()
