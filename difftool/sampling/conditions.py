"""What to condition on: `--class` and `--guidance-scale` checked against what the model was trained with.

Shared by `sample` and `inpaint`. A class-conditional difftool model knows its class names
and its null class (the label dropout class that classifier-free guidance needs).
"""

from __future__ import annotations

import math

from difftool.errors import did_you_mean
from difftool.errors import UserError


def resolve_classes(tokens: list[str] | None, info: dict) -> list[int] | None:
    """`--class` names or ids -> class ids; a class-conditional model cycles through all by default."""
    num_classes, names = info.get("num_classes"), info.get("label_names") or []
    if not num_classes:
        if tokens:
            raise UserError("--class needs a class-conditional model; this one is unconditional")
        return None
    if not tokens:
        return list(range(num_classes))
    ids = []
    lowered = [n.lower() for n in names]
    for token in tokens:
        if token.isascii() and token.isdigit():  # not str.isdigit alone: int() refuses '²', which is a digit
            # compared as text first: int() refuses strings of over 4,300 digits
            if len(token.lstrip("0")) > len(str(num_classes)) or int(token) >= num_classes:
                raise UserError(f"--class {token} is out of range: the model has classes 0..{num_classes - 1}")
            ids.append(int(token))
        elif token.lower() in lowered:
            ids.append(lowered.index(token.lower()))
        else:
            known = f": {', '.join(names)}" if names else f" 0..{num_classes - 1} (it has no class names)"
            raise UserError(f"unknown class '{token}'{did_you_mean(token, names)}; the model knows{known}")
    return ids


def resolve_guidance_rescale(requested: float | None, default: float | None, guidance_scale: float) -> float:
    """phi of guidance rescale: requested, else the recipe's, else 0; it only acts where guidance does."""
    phi = requested if requested is not None else (default if default is not None else 0.0)
    if not (math.isfinite(phi) and 0 <= phi <= 1):
        raise UserError(f"--guidance-rescale must lie in [0, 1] (0 = off, 0.7 as Lin et al. suggest), got {phi}")
    if requested not in (None, 0.0) and guidance_scale == 1.0:
        raise UserError("--guidance-rescale acts on classifier-free guidance; add --guidance-scale above 1 "
                        "(class-conditional models)")
    return phi if guidance_scale != 1.0 else 0.0


def resolve_guidance(requested: float | None, default: float | None, info: dict, class_ids: list[int] | None) -> float:
    """The guidance scale to use: 1 (none) for unconditional models, else requested, recipe default or 1."""
    if class_ids is None:
        if requested not in (None, 1.0):
            raise UserError("--guidance-scale needs a class-conditional model; this one is unconditional")
        return 1.0
    scale = requested if requested is not None else (default if default is not None else 1.0)
    if not math.isfinite(scale):
        raise UserError(f"--guidance-scale must be a finite number, got {scale}")
    if scale < 0:
        raise UserError(f"--guidance-scale must be at least 0, got {scale}")
    if scale != 1.0 and info.get("null_class") is None:
        raise UserError("this model has no null class recorded, so classifier-free guidance is not possible; "
                        "use --guidance-scale 1")
    return scale
