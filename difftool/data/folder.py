"""A local folder of images (subfolders are classes when labels are asked for), decoded once and cached."""

from __future__ import annotations

from pathlib import Path
from typing import Any


from difftool.errors import UserError
from difftool.images import IMAGE_SUFFIXES, image_files, printable
from difftool.data.cache import _cached
from difftool.data.decode import ImageData, _assemble, _decode_all
from difftool.data.hub import _warn_dropped_classes



def load_folder(root: Path, cfg: Any, cache: Path) -> ImageData:
    files, labels, label_names = _scan_folder(root, use_labels=cfg.label_column != "none")
    if cfg.max_images is not None and cfg.max_images < len(files):
        files, labels = files[: cfg.max_images], None if labels is None else labels[: cfg.max_images]
        _warn_dropped_classes(labels, label_names, cfg.max_images)
    key = {
        "kind": "folder",
        "root": str(root.resolve()),
        "files": [[f.relative_to(root).as_posix(), *_stat(f)] for f in files],
        "labels": labels is not None,
        "resolution": cfg.resolution,
        "channels": cfg.channels,
    }

    def build() -> ImageData:
        what = f"folder {printable(root)}"
        decoded, labels_kept = _decode_all(files, labels, cfg.resolution, what)
        return _assemble(decoded, labels_kept, label_names, cfg.channels, what)

    return _cached(cache, key, f"{root.resolve().name}-{cfg.resolution}px", build)


def _scan_folder(root: Path, use_labels: bool) -> tuple[list[Path], list[int] | None, list[str] | None]:
    """Image files under `root` in a stable order; classes are the immediate subfolders (if >= 2).

    Hidden files and folders are skipped (macOS "._x.jpg" files are not images).
    """
    rel = [p.relative_to(root) for p in image_files(root)]
    if not rel:
        raise UserError(f"no images found in {root} (looked for {'/'.join(IMAGE_SUFFIXES)} recursively); "
                        "point --dataset at a folder of images")
    files = [root / r for r in rel]
    classes = sorted({r.parts[0] for r in rel if len(r.parts) > 1})
    if not use_labels or len(classes) < 2:
        return files, None, None
    loose = [r.as_posix() for r in rel if len(r.parts) == 1]
    if loose:
        raise UserError(f"{root} has class subfolders ({', '.join(classes)}) but also {len(loose)} images "
                        f"directly inside it (e.g. {loose[0]}); move them into a class folder, or "
                        "pass --label-column none to train without labels")
    ids = {name: i for i, name in enumerate(classes)}
    return files, [ids[r.parts[0]] for r in rel], classes


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]
