"""What every image difftool makes records about itself, in sample.json and in its PNG text chunks.

`sample` and `inpaint` write the same keys for the same things, so that a PNG says which model,
weights and settings made it, whichever command wrote it.
"""

from __future__ import annotations

import json

from difftool import __version__
from difftool.models.checkpoints import LoadedModel


def model_settings(model: LoadedModel) -> dict:
    """The keys that name the model: the version that sampled it, where it came from, which weights."""
    return {"difftool_version": __version__, "model": model.source, "model_hash": model.model_hash,
            "weights": model.weights}


def image_metadata(settings: dict, index: int, label: int | None, label_names: list[str] | None,
                   **about: object) -> dict[str, str]:
    """PNG text chunks of image `index`: the settings, its class (id, and name where the model has names;
    "none" for the null class), and `about` (e.g. the image and mask it was inpainted from)."""
    meta = {**settings, "index": index, **about}
    if label is not None:
        meta["class_id"] = label
        if label_names:
            meta["class"] = label_names[label] if label < len(label_names) else "none"
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in meta.items()}
