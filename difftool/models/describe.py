"""What `difftool inspect` reports about a model: architecture, weights, noise schedule, files."""

from __future__ import annotations

from pathlib import Path

from difftool.models.load import load_model


def describe(source: str | Path, *, source_format: str = "auto", weights: str | None = None) -> dict:
    """A JSON-ready summary of the model at `source` (loaded the way `sample` and `convert` load it)."""
    model = load_model(source, source_format=source_format, weights=weights)
    unet, info, schedule = model.unet.config, model.info, model.scheduler_config
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.unet.parameters()})
    trained_betas = schedule.get("trained_betas") is not None
    return {
        "source": model.source,
        "weights": model.weights,
        "model_hash": model.model_hash,
        "parameters": sum(p.numel() for p in model.unet.parameters()),
        "dtype": ", ".join(dtypes),
        "size_on_disk": _size_on_disk(Path(source)),
        "resolution": unet.sample_size,
        "channels": unet.in_channels,
        "block_out_channels": list(unet.block_out_channels),
        "layers_per_block": unet.layers_per_block,
        "attention_levels": [i for i, kind in enumerate(unet.down_block_types) if "Attn" in kind],
        "class_conditional": bool(info.get("num_classes")),
        "classes": info.get("label_names") or info.get("num_classes"),
        "timesteps": schedule["num_train_timesteps"],
        "beta_schedule": "trained betas" if trained_betas else schedule["beta_schedule"],
        "prediction_type": schedule["prediction_type"],
        "clip_sample": schedule["clip_sample"],
        "step": info.get("step"),
        "recipe": info.get("recipe"),
        "dataset": info.get("dataset"),
        "difftool_version": info.get("difftool_version"),
        "notes": model.notes,
    }


def _size_on_disk(path: Path) -> int | None:
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(_size(p) for p in path.rglob("*"))
    return None  # a hub id: the cache holds it


def _size(path: Path) -> int:
    """A file's size; 0 for a folder, or a file gone since the folder was listed (a run rotating checkpoints)."""
    try:
        return path.stat().st_size if path.is_file() else 0
    except FileNotFoundError:
        return 0
