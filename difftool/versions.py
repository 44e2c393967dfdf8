"""The versions that wrote a file (run config, checkpoint, model, session), and how to say them."""

from __future__ import annotations

from difftool import __version__


def made_by() -> dict[str, str]:
    """The versions that write a run folder, recorded so that a later version can say what it is reading."""
    import accelerate
    import diffusers
    import torch

    return {"difftool_version": __version__, "diffusers_version": diffusers.__version__,
            "accelerate_version": accelerate.__version__, "torch_version": torch.__version__}


def describe_versions(recorded: dict) -> str:
    """`difftool 0.1.0 (diffusers 0.42.1, accelerate 1.12.0, torch 2.13.0)`, from what a file recorded."""
    names = [n for n in ("diffusers", "accelerate", "torch") if recorded.get(f"{n}_version")]
    extra = ", ".join(f"{n} {recorded[f'{n}_version']}" for n in names)
    return f"difftool {recorded.get('difftool_version', '(unrecorded)')}" + (f" ({extra})" if extra else "")
