"""Writing the model a run produces, and loading a model from any source for the later commands.

`load_native` accepts a run folder, one of its checkpoints, a diffusers pipeline folder, a
unet/ folder, a single-file .safetensors (see `save_single_file`) or a Hub id, and always
returns the same thing: a UNet, its training scheduler config and what difftool knows about it.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from diffusers import DDPMScheduler, UNet2DModel

from difftool import __version__
from difftool.config import read_config
from difftool.errors import UserError, first_line, shown
from difftool.models.build import build_noise_scheduler, build_unet
from difftool.models.export import INFO_FILE, SINGLE_FILE_FORMAT
from difftool.models.hub import WEIGHT_FILES, download_unet
from difftool.models.sources import locate
from difftool.rundir import (
    PROGRESS_FILE,
    RunDir,
    read_progress,
)
from difftool.safeio import loads_json, read_json

CHECKPOINT_WEIGHTS = "model.safetensors"  # accelerate's save_state: the raw (non-EMA) weights
# accelerate saves the prepared model's keys: DDP adds `module.`, torch.compile `_orig_mod.`.
WRAPPER_PREFIXES = ("_orig_mod.", "module.")
# Reads of a run started again after its newest checkpoint was rotated away mid-read, before giving up.
ROTATION_RETRIES = 10


# ---------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    """A model from any source in one shape, so that no command needs to know where it came from."""

    unet: UNet2DModel  # eval mode, on the CPU, in the dtype it was stored in
    scheduler_config: dict  # the training DDPMScheduler config: betas, T, prediction type
    info: dict  # resolution, channels, num_classes, label_names, null_class (+ step, recipe... when known)
    source: str  # one line for people: where the weights came from and which ones
    weights: str  # "ema" or "raw"; "ema" also for sources with a single set of weights
    model_hash: str  # state_dict_hash of the weights, to tell models apart in outputs
    notes: list[str]  # to print once: what was assumed or chosen on the user's behalf


@dataclass
class _Found:
    """A source resolved to one set of weights, before any tensor is read."""

    source: str
    weights: str
    unet_config: dict
    weights_file: Path
    scheduler_config: dict
    info: dict
    notes: list[str] = field(default_factory=list)


def load_native(source: str | Path, *, weights: str | None = None) -> LoadedModel:
    """A model in one of difftool's own forms; `weights` None means EMA where there is a separate EMA copy.

    Callers use `difftool.models.load.load_model`, which adds the importers of other toolkits' pickles.
    """
    if weights not in (None, "ema", "raw"):
        raise UserError(f"--weights must be 'ema' or 'raw', not '{weights}'")
    path = locate(str(source))
    if path is not None and RunDir(path).is_run():
        return _load_run(RunDir(path), weights)
    return _loaded(_find_local(path if path is not None else download_unet(str(source)), weights, str(source)))


def _loaded(found: _Found) -> LoadedModel:
    unet = _load_unet(found.unet_config, found.weights_file)
    return LoadedModel(unet, found.scheduler_config, found.info, found.source, found.weights,
                       state_dict_hash(unet.state_dict()), found.notes)


def _load_run(run: RunDir, weights: str | None) -> LoadedModel:
    """A run's model (`_from_run`), read safely while the run trains and rotates its checkpoints.

    With checkpoint.total_limit, the newest checkpoint can be rotated away (renamed, then deleted) after it was
    chosen and before all its files were read. Its read then starts again from the run's newest complete
    checkpoint: only a checkpoint still in place when reading it fails is reported as damaged.
    """
    for _ in range(ROTATION_RETRIES):
        checkpoint = run.latest_checkpoint()
        try:
            return _loaded(_from_run(run, checkpoint, weights))
        except (UserError, OSError):
            if checkpoint is None or os.path.lexists(checkpoint):
                raise
    raise UserError(f"the newest checkpoint of {run.root} was rotated away while it was read, {ROTATION_RETRIES} "
                    f"times in a row: training replaces them faster than they are read. Try again, or train with a "
                    f"higher checkpoint.total_limit")


def state_dict_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes: the same weights give the same hash in any file."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _find_local(path: Path, weights: str | None, where: str) -> _Found:
    if path.is_file() and path.suffix == ".safetensors":
        return _from_single_file(path, weights)
    if (path / "progress.json").is_file() and RunDir(path.parent.parent).is_run():
        return _from_checkpoint(path, weights)
    if (path / "model_index.json").is_file() and (path / "unet").is_dir():
        return _from_pipeline(path, weights, where)
    if (path / "config.json").is_file():
        return _from_unet_folder(path, weights, where)
    raise UserError(f"{where} is not a model: expected a run folder, a diffusers pipeline folder, a unet/ folder, "
                    f"a single-file .safetensors, or a hub id")


def _choose(where: str, held: tuple[str, ...], weights: str | None) -> str:
    """Which of the weights a source holds to load; EMA by default where there is a choice."""
    if weights is None:
        return held[0]
    if weights in held:
        return weights
    if weights == "ema":
        raise UserError(f"{where} has no EMA weights (trained with ema.enabled=false); leave out --weights")
    raise UserError(f"{where} holds one set of weights, not separate raw ones; raw weights come with "
                    f"difftool run folders, their checkpoints and model/ folders of runs trained with EMA")


def _from_run(run: RunDir, checkpoint: Path | None, weights: str | None) -> _Found:
    """model/ once training has finished, else `checkpoint`, the latest one (with a note saying so)."""
    if (run.model_dir / "model_index.json").is_file():
        model_step = _optional_json(run.model_dir / INFO_FILE).get("step")
        if checkpoint is None or model_step is None or model_step >= read_progress(checkpoint)["step"]:
            return _from_pipeline(run.model_dir, weights, str(run.model_dir))
        found = _from_checkpoint(checkpoint, weights)
        found.notes.append(f"{run.model_dir} is from step {model_step} but training went on: using {found.source}")
        return found
    if checkpoint is None:
        raise UserError(f"{run.root} has no model yet: training has not saved a checkpoint (it saves one every "
                        f"checkpoint.every steps and when stopped with Ctrl-C); wait for one, or give another run")
    found = _from_checkpoint(checkpoint, weights)
    found.notes.append(f"training has not finished: using {found.source}, the latest checkpoint")
    return found


def _from_checkpoint(checkpoint: Path, weights: str | None) -> _Found:
    """EMA weights from unet_ema/, raw ones from accelerate's model.safetensors; configs from the run."""
    config_file = RunDir(checkpoint.parent.parent).config
    cfg = read_config(config_file)
    info = _check_record(read_progress(checkpoint), checkpoint / PROGRESS_FILE)
    ema_dir = checkpoint / "unet_ema"
    has_ema = (ema_dir / "config.json").is_file()
    kind = _choose(str(checkpoint), ("ema", "raw") if has_ema else ("raw",), weights)
    if has_ema:
        unet_config = _read_json(ema_dir / "config.json")
    else:
        with torch.device("meta"):  # only the config is wanted: allocate no weights
            unet_config = dict(build_unet(cfg.model, resolution=info["resolution"], channels=info["channels"],
                                          num_classes=info["num_classes"]).config)
    weights_file = _weights_file(ema_dir) if kind == "ema" else checkpoint / CHECKPOINT_WEIGHTS
    scheduler_config = _training_scheduler_config(build_noise_scheduler(cfg.scheduler).config, config_file)
    return _Found(_describe(checkpoint, kind), kind, unet_config, weights_file, scheduler_config, _full_info(info, unet_config))


def _from_pipeline(folder: Path, weights: str | None, where: str) -> _Found:
    """A difftool model/ (EMA in unet/, raw in unet_raw/) or any diffusers pipeline with a UNet2DModel."""
    if not (folder / INFO_FILE).is_file():
        return _from_unet_folder(folder / "unet", weights, where)
    has_raw = (folder / "unet_raw" / "config.json").is_file()
    # Exported without EMA, unet/ holds the raw weights and there is no unet_raw/.
    kind = _choose(where, ("ema", "raw") if has_raw else ("raw",), weights)
    found = _from_unet_folder(folder / ("unet_raw" if kind == "raw" and has_raw else "unet"), None, where)
    found.source, found.weights = _describe(where, kind), kind
    return found


def _from_unet_folder(folder: Path, weights: str | None, where: str) -> _Found:
    """A UNet2DModel folder, read with the scheduler/ and difftool.json beside it where they exist."""
    unet_config = _read_json(folder / "config.json")
    if unet_config.get("_class_name") != "UNet2DModel":
        raise UserError(f"{where} holds a {unet_config.get('_class_name', 'model of unknown class')}, not a UNet2DModel: "
                        f"difftool loads pixel-space UNet2DModel models only")
    kind = _choose(where, ("ema",), weights)
    scheduler_file = folder.parent / "scheduler" / "scheduler_config.json"
    notes = []
    if scheduler_file.is_file():
        scheduler_config = _training_scheduler_config(_read_json(scheduler_file), scheduler_file)
    else:
        scheduler_config = _training_scheduler_config({}, scheduler_file)
        notes.append(f"{where} comes without {scheduler_file}: assuming the DDPMScheduler defaults "
                     f"(linear betas, 1000 steps, epsilon prediction)")
    info = _full_info(_check_record(_optional_json(folder.parent / INFO_FILE), folder.parent / INFO_FILE), unet_config)
    return _Found(where, kind, unet_config, _weights_file(folder), scheduler_config, info, notes)


def _from_single_file(path: Path, weights: str | None) -> _Found:
    meta = read_single_file_metadata(path)
    kind = _choose(str(path), ("ema",), weights)
    return _Found(str(path), kind, meta["unet_config"], path, _training_scheduler_config(meta["scheduler_config"], path),
                  _full_info(_check_record(meta["info"], path), meta["unet_config"]))


def _describe(where: Path | str, kind: str) -> str:
    return f"{where} ({'EMA' if kind == 'ema' else 'raw'} weights)"


def _full_info(stored: dict, unet_config: dict) -> dict:
    """difftool's own record where there is one; for foreign models, what the UNet config tells."""
    derived = {"resolution": unet_config.get("sample_size"), "channels": unet_config.get("in_channels"),
               "num_classes": unet_config.get("num_class_embeds"), "label_names": None, "null_class": None}
    return {**derived, **stored}


def _whole(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


# The values of difftool's record of a model that building and sampling it rely on.
_RECORD_CHECKS = {
    "resolution": lambda v: _whole(v, 1),
    "channels": lambda v: _whole(v, 1),
    "num_classes": lambda v: v is None or _whole(v, 0),
    "null_class": lambda v: v is None or _whole(v, 0),
    "label_names": lambda v: v is None or (isinstance(v, list) and all(isinstance(n, str) for n in v)),
}


def _check_record(record: dict, where: Path) -> dict:
    """`record` as read from `where`, refused now if a value is unusable, rather than crashed on later."""
    if not isinstance(record, dict):
        raise UserError(f"{where} is damaged: it holds a JSON {type(record).__name__}, not an object; "
                        f"use an intact copy of the model")
    damaged = [f"{key}={shown(record[key])}" for key, usable in _RECORD_CHECKS.items() if key in record and not usable(record[key])]
    if damaged:
        raise UserError(f"{where} is damaged: it records {', '.join(damaged)}; use an intact copy of the model")
    return record


def _training_scheduler_config(config, where: Path) -> dict:
    """A complete DDPMScheduler config as a plain dict, whatever (if any) file `where` it came from."""
    accepted = inspect.signature(DDPMScheduler.__init__).parameters
    try:
        full = DDPMScheduler.from_config({k: v for k, v in config.items() if k in accepted}).config
    except Exception as err:  # values read from a file can break the constructor in any way
        reason = first_line(err)
        raise UserError(f"the scheduler config in {where} does not make a DDPMScheduler ({reason})") from err
    return {k: v for k, v in full.items() if not k.startswith("_")}


# ---------------------------------------------------------------- weights


def _load_unet(unet_config: dict, weights_file: Path) -> UNet2DModel:
    """The UNet of `unet_config` holding the tensors of `weights_file`, in their stored dtype.

    Not `from_pretrained`: it warns about the EMA keys in unet_ema/config.json and explains
    weights that do not fit their config poorly. Built on the meta device: the file's tensors are
    assigned in place of the parameters, so none are allocated, however large a config claims to be.
    """
    accepted = inspect.signature(UNet2DModel.__init__).parameters
    try:
        with torch.device("meta"):
            unet = UNet2DModel.from_config({k: v for k, v in unet_config.items() if k in accepted})
    except Exception as err:  # values read from a file can break the constructor in any way
        reason = first_line(err)
        raise UserError(f"diffusers cannot build the UNet2DModel configured for {weights_file} ({reason})") from err
    state = _read_tensors(weights_file)
    _check_match(unet.state_dict(), state, weights_file)
    unet.load_state_dict(state, assign=True)  # assign: keep the stored dtype
    return unet.eval()


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".bin":
        state = load_pickle(path)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise UserError(f"{path} does not hold a state dict (names -> tensors); give the weights saved with "
                            f"save_pretrained or torch.save(model.state_dict(), ...)")
    else:
        try:
            state = safetensors.torch.load_file(path)
        except (safetensors.SafetensorError, OSError) as err:
            raise UserError(f"{path} is not a readable safetensors file ({err})") from err
    return {_unwrapped(key): value for key, value in state.items()}


def load_pickle(path: Path):
    """`torch.load` that runs no code: pickles of anything but tensors and plain containers are refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # arbitrary bytes make torch.load fail in many ways
        # The weights-only unpickler's message is a paragraph; one line of it says what it refused.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        if isinstance(err, pickle.UnpicklingError) and (refused := next((ln for ln in lines if "GLOBAL" in ln), None)):
            raise UserError(f"{path} needs code to load ({refused[:200]}); difftool never runs code from checkpoint "
                            f"files: re-save its state dict (torch.save(model.state_dict(), ...)) where it was "
                            f"made") from err
        detail = next((lines[i + 1] for i, ln in enumerate(lines[:-1]) if "WeightsUnpickler error" in ln),
                      lines[0] if lines else "")
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: {detail[:160]}); "
                        f"give a state dict saved with torch.save, or a .safetensors file") from err


def _unwrapped(key: str) -> str:
    while key.startswith(WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def _check_match(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], path: Path) -> None:
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {list(state[k].shape)} vs {list(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    problems = [f"{len(found)} {what} (first: {found[0]})" for found, what in
                ((missing, "missing keys"), (unexpected, "unexpected"), (shapes, "shape mismatches")) if found]
    if problems:
        raise UserError(f"weights in {path} do not match its config: {', '.join(problems)}")


def _weights_file(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise UserError(f"{folder} has a config.json but no weights ({' or '.join(WEIGHT_FILES)})")


def _optional_json(path: Path) -> dict:
    return _read_json(path) if path.is_file() else {}


def _read_json(path: Path) -> dict:
    try:
        value = read_json(path, follow=True)  # the Hugging Face cache links a snapshot's files to its blobs
    except (OSError, ValueError) as err:  # ValueError: not JSON, or not UTF-8
        raise UserError(f"cannot read {path} ({first_line(err)})") from err
    if not isinstance(value, dict):
        raise UserError(f"cannot read {path}: it holds a JSON {type(value).__name__}, not an object of settings")
    return value


# ---------------------------------------------------------------- single file


def read_single_file_metadata(path: Path) -> dict:
    """{"unet_config", "scheduler_config", "info"} from a file written by `save_single_file`."""
    try:
        with safetensors.safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except (safetensors.SafetensorError, OSError) as err:
        raise UserError(f"{path} is not a readable safetensors file ({err})") from err
    if "difftool_format" not in meta or "unet_config" not in meta:
        raise UserError(f"{path} has no UNet config in its metadata; give the folder with config.json, "
                        f"or make a single file with `difftool convert`")
    if meta["difftool_format"] != SINGLE_FILE_FORMAT:
        raise UserError(f"{path} is in single-file format {meta['difftool_format']}, which this difftool "
                        f"({__version__}) does not read; upgrade difftool")
    try:
        found = {"unet_config": loads_json(meta["unet_config"]),
                 "scheduler_config": loads_json(meta["scheduler_config"]), "info": loads_json(meta["difftool"])}
    except (KeyError, ValueError) as err:
        raise UserError(f"{path} has damaged difftool metadata ({err!r})") from err
    not_objects = [key for key, value in found.items() if not isinstance(value, dict)]
    if not_objects:
        raise UserError(f"{path} has damaged difftool metadata ({', '.join(not_objects)}: not a JSON object)")
    return found


def place(unet: UNet2DModel, device=None, dtype: torch.dtype | None = None) -> UNet2DModel:
    """Move and cast a UNet; diffusers' `.to` warns about keep-in-fp32 modules even when there are none."""
    if getattr(unet, "_keep_in_fp32_modules", None):
        return unet.to(device=device, dtype=dtype)
    return torch.nn.Module.to(unet, device=device, dtype=dtype)
