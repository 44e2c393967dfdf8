"""Files that difftool reads from a run folder, or writes anywhere: never through a link, never into a device,
FIFO or socket, never unbounded; every output created atomically, so a path that cannot be created is one
clear error and a file or folder under its final name is complete.

A run folder may come from someone else. Its files are data: a `train.lock` that is a symbolic link to one of
the user's files must not be written through, a preview grid that links to a private picture must not be
inlined into a page, a FIFO must not hang a reader, and a file of '[' * 5000 must give one line naming it,
not a RecursionError. Links are checked on the last part of a path only: a run folder kept on another disk
through a linked parent folder is the user's own doing, and works.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from difftool.errors import UserError, is_storage_error, os_errors_of_writers

# Bounds on what difftool reads from files it wrote: far above anything it writes, far below a memory problem.
JSON_LIMIT = 16 * 2**20  # progress.json, a lock, an evaluation's metrics.json
JSONL_LIMIT = 512 * 2**20  # metrics.jsonl and sessions.jsonl of a very long run
IMAGE_LIMIT = 64 * 2**20  # a preview grid

_KINDS = {stat.S_IFLNK: "a symbolic link", stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder"}


class UnsafeFile(UserError):
    """A file difftool would read or write is a link, a special file, too large, or outside where it belongs."""


def kind_of(path: Path) -> str | None:
    """'a symbolic link', 'a FIFO (named pipe)', 'a folder', ... for what is at `path` (not followed); None for a
    regular file or nothing."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    return _KINDS.get(stat.S_IFMT(mode)) if not stat.S_ISREG(mode) else None


def is_special(path: Path) -> bool:
    """True for a FIFO, a device or a socket at `path` (not followed): no command may write into or replace one."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISSOCK(mode)


def refuse_special(path: Path) -> None:
    """Refuse an output that is a FIFO, a device or a socket: replacing one (/dev/null) is never what was meant."""
    if is_special(path):
        raise UserError(f"the output {path} is {kind_of(path)}, not a file or folder; difftool writes only files "
                        f"and folders, --overwrite or not: choose another output path")


def open_regular(path: Path, flags: int, mode: int = 0o644, *, follow: bool = False) -> int:
    """`os.open` of a regular file that never follows a link at `path` (unless `follow`) and never blocks on a FIFO.

    A link (unless followed), a FIFO, a device, a socket or a folder there is an UnsafeFile naming it; other OS
    errors pass through. `follow` is for reading model folders, whose files are links in the Hugging Face cache:
    the file reached must still be a regular file.
    """
    nofollow = 0 if follow else os.O_NOFOLLOW
    try:
        fd = os.open(path, flags | nofollow | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR, errno.ENODEV, errno.EOPNOTSUPP):
            raise _unsafe(path, kind_of(path) or "not a regular file") from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _unsafe(path, _KINDS.get(stat.S_IFMT(mode), "not a regular file") if follow else
                          kind_of(path) or "not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_regular(*paths: Path) -> None:
    """Refuse, before any work, a file that a command will read or append to and that is not a regular file."""
    for path in paths:
        kind = kind_of(path)
        if kind is not None:
            raise _unsafe(path, kind)


def _unsafe(path: Path, kind: str) -> UnsafeFile:
    return UnsafeFile(f"{path} is {kind}, not a regular file; difftool never reads or writes through links or "
                      f"into special files in its folders: remove it, or use a copy of the folder without it")


def read_bounded(path: Path, limit: int, *, inside: Path | None = None, follow: bool = False) -> bytes:
    """The bytes of the regular file `path` (not a link, unless `follow`), at most `limit` of them, and, with
    `inside`, only if the file really lies in that folder (no linked parent leads out of it)."""
    fd = open_regular(path, os.O_RDONLY, follow=follow)
    try:
        if inside is not None and not Path(os.path.realpath(path)).is_relative_to(os.path.realpath(inside)):
            raise UnsafeFile(f"{path} lies outside {inside} (through a linked folder); difftool reads only "
                             f"files inside the folder: remove the link")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(2**20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:
        raise UnsafeFile(f"{path} is larger than {limit // 2**20} MiB, far more than difftool writes there; "
                         f"it is not a file difftool made: remove it or use another")
    return b"".join(chunks)


def loads_json(text: str | bytes):
    """`json.loads` that reports nesting too deep for the parser ('[' * 5000) as the ValueError of bad JSON.

    Bytes must be UTF-8, as difftool writes them (json.loads would guess UTF-16 from a byte-order mark).
    """
    try:
        return json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)
    except RecursionError:
        raise ValueError("nested too deeply to be a file difftool wrote") from None


def read_json(path: Path, limit: int = JSON_LIMIT, *, follow: bool = False):
    """The JSON value in the regular file `path`: ValueError if it is not JSON, UnsafeFile if it is not a file."""
    return loads_json(read_bounded(path, limit, follow=follow))


def append_text(path: Path, text: str) -> None:
    """Append to the regular file `path`, creating it; never through a link or into a special file."""
    fd = open_regular(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        data = text.encode()
        while data:
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)


def create_new(path: Path) -> None:
    """Create the empty file `path`, replacing whatever a crash left under that name but never writing
    through it (O_EXCL also refuses a link)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        raise _unsafe(path, "a folder") from None
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644))


# ---------------------------------------------------------------- creating outputs

TMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def creating(path: Path) -> Iterator[None]:
    """Creating the output `path`: whatever the OS says, one clear line, never an internal error.

    ENOENT (/proc), ENOTDIR and EEXIST (a file on the way, perhaps one made since it was checked),
    ENAMETOOLONG and the rest become a UserError naming `path` and what to do. A full disk, a read-only
    file system or missing permissions stay OSErrors: every command already reports those in one line,
    and `train` and `sample` add where to resume.
    """
    try:
        yield
    except OSError as err:
        if is_storage_error(err):
            raise
        raise UserError(f"cannot create {path}: {_why_uncreatable(err, Path(path))}") from err


def _why_uncreatable(err: OSError, path: Path) -> str:
    reason = err.strerror or type(err).__name__
    if err.errno == errno.ENAMETOOLONG:
        return f"{reason}; shorten it"
    with contextlib.suppress(OSError):
        blocking = file_in_the_way(path) if err.errno in (errno.ENOTDIR, errno.EEXIST) else None
        if blocking is not None:
            return f"{_in_the_way(blocking)}; choose another output path"
        if err.errno == errno.ENOENT and path.parent.is_dir():  # /proc, /sys: folders that take no new entries
            return f"{reason} ({path.parent} takes no new files or folders); choose another output path"
    return f"{reason}; choose another output path"


def make_folder(path: Path, *, output: Path | None = None) -> bool:
    """Create the folder `path` and the folders above it, for `output` (default: the folder itself; see `creating`).

    True if it was not there.
    """
    with creating(output or path):
        created = not path.is_dir()
        path.mkdir(parents=True, exist_ok=True)
    return created


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; it replaces `path` only if the block succeeds.

    A FIFO, device or socket at `path` is refused; a link there is replaced itself, never written through.
    """
    refuse_special(path)
    make_folder(path.parent, output=path)
    tmp = path.with_name(f"{TMP_PREFIX}{os.getpid()}-{path.name}")
    with creating(path):
        create_new(tmp)
    try:
        with os_errors_of_writers(path):
            yield tmp
        # Some writers (safetensors) create private 0600 files; the result gets the usual permissions.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it takes the place of `path`.

    An existing `path` is moved aside first and deleted only after the new one is in place,
    so there is always one complete copy on disk. A FIFO, device or socket at `path` is refused; a link
    there is replaced itself, never followed.
    """
    refuse_special(path)
    make_folder(path.parent, output=path)
    tmp = temporary_dir(path)
    old = _set_aside(path)
    restore_set_aside(path)
    remove_entry(tmp)
    with creating(path):
        tmp.mkdir()
    try:
        with os_errors_of_writers(path):
            yield tmp
        if os.path.lexists(path):
            remove_entry(old)  # left by an interrupted earlier replacement
            os.replace(path, old)
        os.replace(tmp, path)
        remove_entry(old)
    finally:
        remove_entry(tmp)


def remove_entry(path: Path) -> None:
    """Delete what is at `path` if anything: a folder with what it holds, a file or a link (never what it points to)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _set_aside(path: Path) -> Path:
    """Where `atomic_dir` moves the complete old copy of `path` while the new one takes its place."""
    return path.with_name(f"{TMP_PREFIX}old-{path.name}")


def restore_set_aside(path: Path) -> None:
    """Put back the old copy of `path` that a replacement killed between its two renames left aside.

    The set-aside copy is complete (it was `path`); the new one beside it may not be. Where `path`
    exists, the set-aside copy is a leftover of the final deletion and is left to the cleaners.
    """
    old = _set_aside(path)
    if old.is_dir() and not path.exists():
        os.replace(old, path)


def temporary_dir(path: Path) -> Path:
    """The folder `atomic_dir(path)` fills before it takes the place of `path`."""
    return path.with_name(f"{TMP_PREFIX}{path.name}")


def file_in_the_way(folder: Path) -> Path | None:
    """The file that stands where `folder`, or one of the folders above it, would have to be."""
    nearest = next((p for p in (folder, *folder.parents) if p.exists()), None)
    return nearest if nearest is not None and not nearest.is_dir() else None


def refuse_file_in_the_way(folder: Path, option: str = "--output") -> None:
    """Stop before any work when a file stands where `folder`, or one of the folders above it, would have to be."""
    blocking = file_in_the_way(folder)
    if blocking is not None:
        raise UserError(f"cannot write into {folder}: {_in_the_way(blocking)}; choose another {option}")


def _in_the_way(blocking: Path) -> str:
    return f"{blocking} is a file, not a folder"


def remove_tree(path: Path) -> None:
    """Delete a folder by first renaming it to a temporary name: a kill halfway through the deletion
    leaves a leftover that `clean_temporaries` removes, never a half-deleted folder under its name."""
    doomed = path.with_name(f"{TMP_PREFIX}del-{path.name}")
    remove_entry(doomed)
    if os.path.lexists(path):
        os.replace(path, doomed)
    remove_entry(doomed)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def append_jsonl(path: Path, record: dict) -> None:
    """One line appended to `path` (never through a link, never into a special file)."""
    append_text(path, json.dumps(record) + "\n")


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """The JSON objects of a file written by `append_jsonl`, and how many lines were not one.

    A file another process is appending to may end in half a line, and a killed one may have left one:
    those are counted, never fatal. A missing file has no records; a link or a special file is an UnsafeFile.
    """
    try:
        text = read_bounded(path, JSONL_LIMIT).decode(errors="replace")
    except FileNotFoundError:
        return [], 0
    records, damaged = [], 0
    for line in filter(str.strip, text.splitlines()):
        try:
            record = loads_json(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            damaged += 1
    return records, damaged


def fsync_tree(folder: Path, files: bool = True) -> None:
    """Flush `folder` (and the files in it, recursively) to disk, so a rename after it is durable."""
    paths = [p for p in folder.rglob("*") if p.is_file()] if files else []
    for path in [*paths, *({p.parent for p in paths} | {folder})]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
