"""Generated bad options and values for every command: exit code 2, one `difftool: error:` line, no traceback.

The workspace, the runner and the value strategies are in conftest.py.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from difftool.cli.options import FRAMES_MAX, IMAGES_MAX, SEED_MAX
from difftool.config import field_paths, recipe_names
from difftool.sampling.schedulers import SCHEDULERS, SPACINGS, supports_karras
from tests.cli.fuzz.conftest import (
    BROKEN_CONFIGS,
    CLASSES,
    COMMANDS,
    NON_FINITE,
    NOT_FLOAT,
    NOT_INT,
    SCHEDULER_NAMES,
    TEXT,
    TIMESTEPS,
    WORD,
    WS,
    options_of,
    outside,
    refused,
    unknown,
)
from tests.conftest import difftool_cmd
from tests.fuzzing import FUZZ, HANG_SECONDS

# The positional arguments a command needs, as paths that do not exist (what follows them is the bad part).
MISSING = f"{WS}/missing/model"
REQUIRED = {
    "sample": ["sample", MISSING], "inspect": ["inspect", MISSING], "evaluate": ["evaluate", MISSING],
    "convert": ["convert", MISSING, f"{WS}/missing/target"], "train": ["train", "--dry-run"],
    "inpaint": ["inpaint", MISSING, MISSING, "--model", MISSING], "schedulers": ["schedulers"],
    "noise": ["noise", MISSING, "--model", MISSING], "img2img": ["img2img", MISSING, "--model", MISSING],
    "interpolate": ["interpolate", MISSING, "--seeds", "0", "1"],
}
INT_OPTIONS = {
    "noise": ["--points", "--seed"],
    "img2img": ["--steps", "--num-samples", "--seed", "--batch-size"],
    "interpolate": ["--steps", "--frames"],
    "sample": ["--steps", "--num-images", "--batch-size", "--seed", "--num-processes", "--main-process-port",
               "--trajectory"],
    "inpaint": ["--steps", "--jump-length", "--jump-n-sample", "--resample", "--num-samples", "--seed", "--batch-size",
                "--grow"],
    "evaluate": ["--num-samples", "--steps", "--batch-size", "--seed", "--feature-batch-size", "--kid-subset-size",
                 "--pr-k", "--reference-images", "--resolution", "--num-processes"],
    "convert": ["--resolution"],
    "train": ["--resolution", "--channels", "--max-steps", "--batch-size", "--seed", "--num-processes"],
}
FLOAT_OPTIONS = {"sample": ["--eta", "--guidance-scale"], "inpaint": ["--guidance-scale"], "evaluate": ["--guidance-scale"],
                 "img2img": ["--strength", "--eta", "--guidance-scale", "--guidance-rescale"],
                 "interpolate": ["--eta", "--guidance-scale", "--guidance-rescale"]}
# Options whose range the command line checks: (command, option, lowest valid, highest valid).
RANGED = [
    ("noise", "--seed", 0, SEED_MAX), ("sample", "--trajectory", 0, None),
    ("img2img", "--strength", 0, 1), ("img2img", "--seed", 0, SEED_MAX), ("img2img", "--num-samples", None, IMAGES_MAX),
    ("interpolate", "--frames", 2, FRAMES_MAX),
    ("evaluate", "--feature-batch-size", 1, None), ("evaluate", "--kid-subset-size", 2, None),
    ("evaluate", "--pr-k", 1, None), ("evaluate", "--reference-images", 2, None), ("evaluate", "--resolution", 1, None),
    ("sample", "--num-processes", 1, None), ("evaluate", "--num-processes", 1, None),
    ("train", "--num-processes", 1, None),
    ("sample", "--seed", 0, SEED_MAX), ("inpaint", "--seed", 0, SEED_MAX), ("evaluate", "--seed", 0, SEED_MAX),
    ("sample", "--num-images", None, IMAGES_MAX), ("inpaint", "--num-samples", None, IMAGES_MAX),
    ("evaluate", "--num-samples", None, IMAGES_MAX),
]


@st.composite
def usage_errors(draw) -> tuple[list[str], str]:
    """(argv, what the error must name): malformed values, ranges, unknown options and commands, missing parts."""
    kind = draw(st.sampled_from(["int", "float", "range", "option", "no value", "command", "extra"]))
    if kind == "int":
        command = draw(st.sampled_from(sorted(INT_OPTIONS)))
        option = draw(st.sampled_from(INT_OPTIONS[command]))
        return REQUIRED[command] + [option, draw(NOT_INT)], option
    if kind == "float":
        command = draw(st.sampled_from(sorted(FLOAT_OPTIONS)))
        option = draw(st.sampled_from(FLOAT_OPTIONS[command]))
        return REQUIRED[command] + [option, draw(NOT_FLOAT)], option
    if kind == "range":
        command, option, lo, hi = draw(st.sampled_from(RANGED))
        return REQUIRED[command] + [option, str(draw(outside(lo, hi)))], option
    if kind == "option":
        command = draw(st.sampled_from(sorted(REQUIRED)))
        option = "--" + draw(WORD.filter(lambda w: "--" + w not in options_of(command)))
        return REQUIRED[command] + [option], option
    if kind == "no value":  # an option that takes a value, given last
        command = draw(st.sampled_from(sorted(INT_OPTIONS)))
        option = draw(st.sampled_from(INT_OPTIONS[command]))
        return REQUIRED[command] + [option], option
    if kind == "command":
        name = draw(WORD.filter(lambda w: w not in COMMANDS))
        return [name], name
    command = draw(st.sampled_from(["sample", "inspect", "convert", "schedulers"]))
    extra = draw(WORD)
    return REQUIRED[command] + [extra], extra


@given(case=usage_errors())
@settings(FUZZ, max_examples=60)
def test_usage_errors_are_one_line(ws, case):
    argv, named = case
    refused(ws, argv, named)


# ---------------------------------------------------------------- sampling options against a real model


@st.composite
def bad_sampling_options(draw, command: str) -> list[str]:
    """One option a tiny model (T = 50, classes circle/square/ring or none) cannot honour."""
    model = draw(st.sampled_from(["cond", "uncond"]))
    cases = {
        "steps": lambda: ["--steps", str(draw(outside(1, TIMESTEPS)))],
        "batch": lambda: ["--batch-size", str(draw(st.integers(max_value=0)))],
        "scheduler": lambda: ["--scheduler", draw(unknown(SCHEDULER_NAMES))],
        "weights": lambda: ["--weights", draw(unknown(["ema"]))],  # a single file holds its EMA weights only
        "dtype": lambda: ["--dtype", draw(unknown(["fp32", "bf16"] + (["fp16"] if torch.cuda.is_available() else [])))],
        "guidance": lambda: ["--guidance-scale", draw(
            st.one_of(NON_FINITE, st.floats(max_value=-1e-6, allow_infinity=False).map(str)) if model == "cond"
            # an unconditional model takes no guidance other than 1
            else st.floats(allow_nan=True).filter(lambda g: g != 1.0).map(str))],
        "count": lambda: [{"sample": "--num-images", "evaluate": "--num-samples"}[command],
                          str(draw(st.integers(max_value=0)))],
        "both": lambda: ["--overwrite", "--resume"],
    }
    if command == "sample":
        cases.update({
            "format": lambda: ["--format", draw(unknown(["png", "npz"]))],
            "spacing": lambda: ["--timestep-spacing", draw(unknown(SPACINGS))],
            "eta": lambda: draw(st.one_of(
                st.tuples(st.just("--eta"), st.one_of(NON_FINITE, st.floats(max_value=-1e-6).map(str))),
                # eta is for ddim only (test_sample asks for that message)
                st.tuples(st.just("--scheduler"), st.sampled_from([s.name for s in SCHEDULERS if s.name != "ddim"]),
                          st.just("--eta"), st.floats(0, 1).map(str))).map(list)),
            "karras": lambda: ["--karras-sigmas", "--scheduler",
                               draw(st.sampled_from([s.name for s in SCHEDULERS if not supports_karras(s)]))],
            "class": lambda: ["--class", draw(
                st.one_of(unknown(CLASSES).filter(lambda c: not (c.isascii() and c.isdigit() and int(c) < 3)),
                          st.integers(min_value=3).map(str)) if model == "cond" else TEXT)],
            "output": lambda: ["-o", draw(st.sampled_from([f"{WS}/file.txt", f"{WS}/file.txt/below"]))],
        })
    name = draw(st.sampled_from(sorted(cases)))
    return [f"{WS}/{model}.safetensors", *cases[name]()]


@given(options=bad_sampling_options("sample"))
@settings(FUZZ, max_examples=50)
def test_sample_refuses_options_the_model_cannot_honour(ws, options):
    model, *rest = options
    refused(ws, ["sample", model, "-o", f"{WS}/cwd/samples", "-n", "2", "--steps", "2", "-q", *rest])


@given(options=bad_sampling_options("evaluate"))
@settings(FUZZ, max_examples=25)
def test_evaluate_refuses_sampling_options_before_any_work(ws, options):
    model, *rest = options
    refused(ws, ["evaluate", model, "--features", f"{WS}/features.pt", "-o", f"{WS}/cwd/evaluation", "-n", "2",
                 "--steps", "2", "-q", *rest])


# ---------------------------------------------------------------- inpaint options


@st.composite
def bad_inpaint_options(draw) -> list[str]:
    non_positive = st.integers(max_value=0).map(str)
    cases = [
        st.tuples(st.just("--method"), unknown(["repaint", "blend"])),
        st.tuples(st.just("--resample"), st.integers(max_value=-1).map(str)),
        st.tuples(st.sampled_from(["--num-samples", "--batch-size", "--jump-length", "--jump-n-sample"]), non_positive),
        st.tuples(st.just("--grow"), st.integers(max_value=-1).map(str)),
        st.tuples(st.just("--steps"), outside(1, TIMESTEPS).map(str)),
        # --scheduler, even a real one, is for --method blend only
        st.tuples(st.just("--scheduler"), st.sampled_from(sorted(SCHEDULER_NAMES))),
        st.tuples(st.just("--method"), st.just("blend"), st.just("--scheduler"), unknown(SCHEDULER_NAMES)),
        st.tuples(st.just("--method"), st.just("blend"), st.just("--resample"), st.integers(1, 3).map(str),
                  st.just("--scheduler"), st.sampled_from([s.name for s in SCHEDULERS if not s.resamples])),
        # without --class a class-conditional model fills in unconditionally: no guidance
        st.tuples(st.just("--guidance-scale"), st.floats(allow_nan=False).filter(lambda g: g != 1.0).map(str)),
        st.tuples(st.just("--class"), unknown(CLASSES).filter(lambda c: not (c.isascii() and c.isdigit() and int(c) < 3))),
        st.tuples(st.just("--weights"), unknown(["ema"])),
    ]
    return list(draw(st.one_of(cases)))


@given(options=bad_inpaint_options())
@settings(FUZZ, max_examples=25)
def test_inpaint_refuses_bad_options(ws, options):
    refused(ws, ["inpaint", f"{WS}/image.png", f"{WS}/mask.png", "--model", f"{WS}/cond.safetensors",
                 "-o", f"{WS}/cwd/filled.png", "--steps", "2", "-q", *options])


# ---------------------------------------------------------------- files that are not what they claim to be


def _recipe_file(ws_dir: str, data: bytes) -> str:
    path = Path(ws_dir) / "recipe.yaml"
    path.write_bytes(data)
    return str(path)


@st.composite
def bad_train_input(draw) -> tuple[list[str], bytes | None]:
    """(train options, bytes of a --recipe file or None); all with --recipe quickstart unless a file is given."""
    int_fields = ["train.batch_size", "train.max_steps", "data.resolution", "model.layers_per_block",
                  "model.norm_num_groups", "log.every", "checkpoint.every", "train.grad_accum"]
    kind = draw(st.sampled_from(["no =", "unknown key", "not an int", "not positive", "not finite", "not a bool",
                                 "flag", "recipe file", "recipe name", "resume"]))
    if kind == "no =":
        return ["--set", draw(TEXT.filter(lambda s: "=" not in s))], None
    if kind == "unknown key":
        key = draw(st.one_of(WORD, st.builds("{}.{}".format, WORD, WORD)).filter(lambda k: k not in field_paths()))
        return ["--set", f"{key}={draw(TEXT)}"], None
    if kind == "not an int":  # YAML that reads as text, a list or a fraction
        value = draw(st.one_of(st.from_regex(r"[a-z]{1,8}", fullmatch=True).filter(lambda s: s not in ("null", "true", "false")),
                               st.just("[1, 2]"), st.floats(0.1, 100).filter(lambda f: not f.is_integer()).map(str)))
        return ["--set", f"{draw(st.sampled_from(int_fields))}={value}"], None
    if kind == "not positive":  # counts and sizes
        return ["--set", f"{draw(st.sampled_from(int_fields))}={draw(st.integers(max_value=0))}"], None
    if kind == "not finite":  # rates and scales
        field = draw(st.sampled_from(["train.lr", "train.weight_decay", "model.dropout",
                                      "sample.guidance_scale", "ema.max_decay", "scheduler.beta_end"]))
        return ["--set", f"{field}={draw(st.sampled_from(['.nan', '.inf', '-.inf', 'nan', 'inf']))}"], None
    if kind == "not a bool":
        value = draw(st.one_of(st.integers().map(str), st.sampled_from(["maybe", "yes please", "[true]"])))
        return ["--set", f"model.class_conditional={value}"], None
    if kind == "flag":
        return draw(st.one_of(
            # quickstart has 3 UNet levels: the resolution must be a positive multiple of 4
            st.integers().filter(lambda n: n <= 0 or n % 4).map(lambda n: ["--resolution", str(n)]),
            st.integers().filter(lambda n: n not in (1, 3)).map(lambda n: ["--channels", str(n)]),
            st.integers(max_value=0).map(lambda n: ["--batch-size", str(n)]),
            st.integers(max_value=0).map(lambda n: ["--max-steps", str(n)]),
            unknown(["no", "fp16", "bf16", "auto"]).map(lambda m: ["--mixed-precision", m]),
        )), None
    if kind == "recipe file":
        return [], draw(BROKEN_CONFIGS)
    if kind == "recipe name":
        name = draw(WORD.filter(lambda w: w not in recipe_names()))
        return ["--recipe", name], None
    return ["--resume", f"{WS}/missing/run"], None


@given(case=bad_train_input())
@example(case=([], b"\x80"))  # a recipe file that is not UTF-8
@example(case=(["--set", "model.norm_num_groups=0"], None))  # a division by it follows the check
@example(case=(["--set", "train.lr=nan"], None))
@settings(FUZZ, max_examples=40)
def test_train_dry_run_refuses_bad_config(ws, case):
    options, recipe = case
    with tempfile.TemporaryDirectory(dir=ws) as tmp:
        if recipe is not None:
            options = ["--recipe", _recipe_file(tmp, recipe)]
        elif "--recipe" not in options and "--resume" not in options:
            options = ["--recipe", "quickstart", *options]
        refused(ws, ["train", *options, "--output", f"{tmp}/run", "--dry-run"])


# ---------------------------------------------------------------- evaluate


@st.composite
def bad_sweeps(draw) -> str:
    """A --sweep that names no scheduler, an unknown one, or a step count that is no whole number in 1..T."""
    good = st.sampled_from(sorted(SCHEDULER_NAMES))
    kind = draw(st.sampled_from(["no colon", "unknown", "bad steps", "too many steps", "empty"]))
    if kind == "no colon":
        part = draw(TEXT.filter(lambda s: ":" not in s and ";" not in s and s.strip()))
    elif kind == "unknown":
        name = draw(unknown(SCHEDULER_NAMES).filter(lambda s: s.strip() and s.strip().lower() not in SCHEDULER_NAMES
                                                     and ":" not in s and ";" not in s))
        part = f"{name}:{draw(st.integers(1, 9))}"
    elif kind == "bad steps":
        token = draw(st.one_of(TEXT.filter(lambda s: not (s.strip().isascii() and s.strip().isdigit())
                                           and "," not in s and ";" not in s),
                               st.sampled_from(["0", "00", "²", "1.5", "-3"])))
        part = f"{draw(good)}:{token}" if token.strip() else f"{draw(good)}:{token},"
    elif kind == "too many steps":
        part = f"{draw(good)}:{draw(st.integers(TIMESTEPS + 1, 10**6))}"
    else:
        return draw(st.sampled_from(["", ";", " ; ;"]))
    valid = [f"ddim:{n}" for n in draw(st.lists(st.integers(1, TIMESTEPS), max_size=2))]
    parts = valid + [part]
    return ";".join(draw(st.permutations(parts)))


@st.composite
def bad_evaluate_input(draw) -> list[str]:
    model, images, features = f"{WS}/cond.safetensors", f"{WS}/images.npz", f"{WS}/features.pt"
    out = ["-o", f"{WS}/cwd/evaluation", "-q"]
    return draw(st.sampled_from([
        lambda: ["evaluate", model, "--sweep", draw(bad_sweeps()), "--reference", images, "--features", features, *out],
        lambda: ["evaluate", images, "--features", draw(unknown(["inception", "dinov2"]).filter(
            lambda s: not s.startswith("dinov2:") and s.strip() not in (".", "..") and "/" not in s)), *out],
        lambda: ["evaluate", images, "--features", f"{WS}/missing/{draw(WORD)}.pt", *out],
        lambda: ["evaluate", images, "--features", features, "--inception-weights", features, *out],
        lambda: ["evaluate", images, "--features", features, "--scheduler", "ddim", *out],
        lambda: ["evaluate", images, "--features", features, "--sweep", "ddim:2", "--reference", images, *out],
        lambda: ["evaluate", model, "--features", features, "--sweep", "ddim:2", *out],
        lambda: ["evaluate", images, draw(TEXT.filter(lambda s: not s.startswith("-"))), "--features", features, *out],
        lambda: ["evaluate", images, "--reference", draw(st.sampled_from(["", " "])), "--features", features, *out],
        lambda: ["stats", "--features", features, *out],
        lambda: ["stats", images, "--features", features],
        lambda: ["stats", images, "--features", features, "-o",
                 draw(st.sampled_from([f"{WS}/file.txt", f"{WS}/cwd/stats.npy", f"{WS}/file.txt/stats.npz"]))],
        lambda: ["stats", draw(st.sampled_from(["", " "])), "--features", features, "-o", f"{WS}/cwd/s.npz"],
    ]))()


@given(argv=bad_evaluate_input())
@settings(FUZZ, max_examples=40)
def test_evaluate_refuses_bad_input(ws, argv):
    refused(ws, argv)


# ---------------------------------------------------------------- paths that do not exist, with odd names


ODD_NAME = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00/"), min_size=1, max_size=24),
    st.text(" []{}()'\"`$%*?!&;|<>\\#~\n\t\r\u00e9\u2028\u200b\U0001f600", min_size=1, max_size=12),
).filter(lambda s: s not in (".", ".."))
TOO_LONG = st.integers(256, 400).map(lambda n: "x" * n)  # longer than a file name may be (255 bytes)


@st.composite
def odd_missing_paths(draw) -> list[str]:
    """A path that does not exist (below a folder that does not, or with a name too long to exist)."""
    name = draw(ODD_NAME)
    path = draw(st.sampled_from([f"{WS}/missing/{name}", f"{WS}/{draw(TOO_LONG)}", f"{WS}/file.txt/{name}"]))
    model, features = f"{WS}/cond.safetensors", f"{WS}/features.pt"
    return draw(st.sampled_from([
        ["sample", path], ["inspect", path], ["convert", path, f"{WS}/cwd/out"], ["evaluate", path],
        ["inpaint", path, f"{WS}/mask.png", "--model", model, "-o", f"{WS}/cwd/x.png"],
        ["inpaint", f"{WS}/image.png", path, "--model", model, "-o", f"{WS}/cwd/x.png"],
        ["inpaint", f"{WS}/image.png", f"{WS}/mask.png", "--model", path, "-o", f"{WS}/cwd/x.png"],
        ["evaluate", f"{WS}/images.npz", "--features", path + ".pt", "-o", f"{WS}/cwd/ev"],
        ["evaluate", f"{WS}/images.npz", "--reference", path, "--features", features, "-o", f"{WS}/cwd/ev"],
        ["train", "--recipe", path + ".yaml", "--dry-run"],
        ["train", "--resume", path, "--dry-run"],
    ]))


@given(argv=odd_missing_paths())
@settings(FUZZ, max_examples=40)
def test_paths_that_do_not_exist(ws, argv):
    refused(ws, [*argv, "-q"] if argv[0] in ("sample", "evaluate", "inpaint") else argv)


# ---------------------------------------------------------------- the installed executable


@pytest.mark.slow
@pytest.mark.parametrize("argv", [
    ["sample", f"{WS}/missing/model", "--steps", "5-2"],
    ["inspect", f"{WS}/file.txt/model.safetensors"],
    ["sample", f"{WS}/missing/a\nb[x]"],
    ["sample", "no-such-owner/no-such-model"],  # a hub id; HF_HUB_OFFLINE=1 keeps the check local
    ["train", "--set", "train.batch_size", "--dry-run"],
])
def test_installed_executable_refuses_in_one_line(ws, argv):
    env = {k: v for k, v in os.environ.items() if k != "DIFFTOOL_DEBUG"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = difftool_cmd() + [a.replace(WS, str(ws)) for a in argv]
    proc = subprocess.run(cmd, cwd=ws / "cwd", env=env, capture_output=True, text=True, timeout=HANG_SECONDS)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("difftool: error: "), lines
