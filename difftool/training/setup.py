"""What a training run is set up with: the Accelerator and its precision, the data, the start weights and state."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration
from diffusers import UNet2DModel

from difftool import config as config_mod
from difftool.models.checkpoints import INFO_FILE, LoadedModel, load_pickle
from difftool.compiling import check_can_compile
from difftool.config import Config
from difftool.data import ImageData, load_dataset
from difftool.errors import UserError, first_line
from difftool.rundir import RunDir, damaged_checkpoint, read_progress
from difftool.versions import describe_versions, made_by
from difftool.runlock import on_main_process


def resolve_precision(requested: str, on_cpu: bool) -> str:
    """`auto` means bf16 where the hardware computes it natively, else fp32 ("no").

    On CPUs, bf16 autocast pays off only with AVX512-BF16 or AMX (about 2x on the quickstart
    model); elsewhere it is emulated and slower than fp32.
    """
    if requested != "auto":
        return requested
    if not on_cpu:
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    native = [getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return "bf16" if any(native) else "no"


def make_accelerator(cfg: Config, run: RunDir) -> Accelerator:
    on_cpu = not torch.cuda.is_available()
    precision = resolve_precision(cfg.train.mixed_precision, on_cpu)
    if on_cpu and precision == "fp16":
        raise UserError("train.mixed_precision=fp16 needs a CUDA GPU; on CPU use bf16, auto or no")
    if cfg.train.compile:
        check_can_compile(torch.device("cpu" if on_cpu else "cuda"), "train.compile=true")
    # accelerate keeps the precision and compile settings of the first Accelerator of a process: a later
    # one with another precision raised, and one asking for compilation silently ran eagerly. Each run
    # starts from its own; the process state (devices, process group) is kept.
    AcceleratorState._reset_state()
    return Accelerator(
        cpu=on_cpu,
        mixed_precision=precision,
        log_with=list(cfg.log.trackers) or None,
        project_config=ProjectConfiguration(project_dir=str(run.root), logging_dir=str(run.logs_dir)),
        dynamo_backend="inductor" if cfg.train.compile else None,
    )


def hardware(accelerator: Accelerator) -> dict:
    """What a run trains on, for its sessions.jsonl: processes, device and its name, precision, host, CPU."""
    device = accelerator.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {"processes": accelerator.num_processes, "device": device.type, "device_name": name,
            "mixed_precision": accelerator.mixed_precision, "host": socket.gethostname(), "cpu": _cpu_name(),
            "cpu_count": os.cpu_count()}


def _cpu_name() -> str:
    """The CPU's model name (Linux says it in /proc/cpuinfo; platform.processor() is often empty there)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def flat_config(cfg: Config) -> dict:
    """Trackers want scalar hyper-parameters: `section.key` -> number/string/bool."""
    flat = {}
    for section, values in config_mod.to_dict(cfg).items():
        if isinstance(values, dict):
            for key, value in values.items():
                flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def load_data(accelerator: Accelerator, cfg: Config) -> ImageData:
    """The main process loads first (filling the cache the others then read)."""
    data = on_main_process(accelerator, lambda: load_dataset(cfg.data))
    return data if accelerator.is_main_process else load_dataset(cfg.data)


def exported_step(run: RunDir) -> int | None:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return json.loads((run.model_dir / INFO_FILE).read_text()).get("step")
    return None


def load_start_weights(unet: UNet2DModel, start: LoadedModel) -> None:
    """`train.init_from`'s weights into the UNet the recipe built, refused unless every tensor matches."""
    have = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in start.unet.state_dict().items()}
    differ = sorted(k for k in have.keys() | given.keys() if have.get(k) != given.get(k))
    if differ:
        key = differ[0]
        raise UserError(f"train.init_from {start.source} is not the UNet this recipe builds ({len(differ)} tensors "
                        f"differ, e.g. {key}: {given.get(key, 'absent')} there, {have.get(key, 'absent')} here); "
                        f"train with the model settings, resolution, channels and classes it was trained with")
    unet.load_state_dict(start.unet.state_dict())


def load_state(accelerator: Accelerator, checkpoint: Path) -> None:
    """Restore model, optimizer, EMA, LR schedule and RNG; a failure says whether versions or damage are why.

    accelerate unpickles the registered objects' states (LR schedule, EMA) with weights_only=False,
    which would run code planted in a checkpoint; each is first read with the loader that refuses code.
    """
    for state in sorted(checkpoint.glob("custom_checkpoint_*.pkl")):
        load_pickle(state)
    try:
        accelerator.load_state(str(checkpoint))
    except Exception as err:  # whatever fails inside accelerate/torch, the remedy is the same
        written_by, this = describe_versions(read_progress(checkpoint)), describe_versions(made_by())
        problem = f"cannot resume from {checkpoint} ({type(err).__name__}: {first_line(err)})"
        if written_by != this:
            raise UserError(f"{problem}; it was written by {written_by} and this is {this}. Install those versions "
                            f"to resume it; its weights can still be sampled and converted") from err
        raise damaged_checkpoint(checkpoint, f"it does not load ({type(err).__name__}: {first_line(err)})") from err


def micro_batch_size(cfg: Config, world: int) -> int:
    per_step = world * cfg.train.grad_accum
    if cfg.train.batch_size % per_step:
        raise UserError(
            f"train.batch_size={cfg.train.batch_size} does not split over {world} process(es) x "
            f"{cfg.train.grad_accum} accumulation step(s); use a multiple of {per_step}")
    return cfg.train.batch_size // per_step
