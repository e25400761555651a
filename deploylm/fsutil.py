"""Putting a finished folder in place of an existing one without a moment where neither exists.

On Linux, `renameat2(RENAME_EXCHANGE)` swaps two paths in one step: a reader (or a kill) sees either
the old folder or the new one at the target, never nothing. Where that call is missing (other systems,
old kernels, filesystems that refuse it), the two-rename fallback moves the old folder aside first:
a kill between the two renames then leaves the old folder at `.<name>.old-*` beside the target.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

try:
    import fcntl
except ImportError:                     # not on Windows: no writer lock there
    fcntl = None  # type: ignore[assignment]

from deploylm.errors import UsageError

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _renameat2()


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap the paths `a` and `b` (both must exist); False where the system can't."""
    if _RENAMEAT2 is None:
        return False
    rc = _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc != 0:
        errno = ctypes.get_errno()
        if errno in (38, 22, 95, 1):   # ENOSYS, EINVAL, EOPNOTSUPP, EPERM: not supported here
            return False
        raise OSError(errno, os.strerror(errno), str(a), None, str(b))
    return True


def _through_link(target: Path) -> Path:
    """The folder a symlinked output stands for: the link's target is written (the link keeps pointing at
    it), not the link itself, which a swap would turn into a folder and leave beside the output."""
    target = Path(target)
    return target.resolve() if target.is_symlink() else target


def temporary_sibling(target: Path) -> Path:
    """`.<name>.tmp-<random>-<pid>` beside `target`: unique, and naming the process that writes it, so
    `remove_stale_temporaries` can tell a killed writer's leftover from a save still running."""
    target = _through_link(target)
    return target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}-{os.getpid()}"


def _check_temporary_name_fits(out: Path, flag: str) -> None:
    """The output is first written as temporary_sibling's `.<name>.tmp-<8 hex>-<pid>`: a name that fits the
    file system but not with those 22 bytes more failed after all the work, naming the temporary folder."""
    target = _through_link(out)
    if not target.name:
        return
    try:
        limit = os.pathconf(next((p for p in (target.parent, *target.parent.parents) if p.exists()), Path(".")),
                            "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    extra = len(f"..tmp-{'0' * 8}-{'9' * 7}")
    size = len(os.fsencode(target.name))
    if size + extra > limit:
        raise UsageError(f"{flag} {str(out)!r}: its name is {size} bytes, and it is written first as "
                         f"'.<name>.tmp-...' beside it, which must fit the file system's {limit}: use a name of at most "
                         f"{limit - extra} bytes")


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Delete the `.<name>.tmp-...-<pid>` folders (and files: a half-written .png) that writers of `target`
    left when they were killed outright (SIGKILL, a power cut): those whose process is gone. Returns what it
    removed."""
    removed = []
    target = _through_link(target)
    for tmp in target.parent.glob(f".{target.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.is_file():
            tmp.unlink(missing_ok=True)
        else:
            continue
        removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def replace_dir(new: Path, target: Path, carry_over: bool = False) -> None:
    """Move the finished folder `new` to `target`, replacing what is there; the old folder is removed
    (with `carry_over`, its entries that `new` lacks are linked (or copied) into `new` before the swap, so
    that no moment, a SIGKILL included, leaves a target without them).

    With an existing target the swap is atomic where `exchange` works; otherwise the old folder is
    renamed aside first and put back if the second rename fails."""
    new, target = Path(new), _through_link(target)
    if not target.exists():
        os.replace(new, target)
        return
    if carry_over:
        for entry in target.iterdir():
            if not (new / entry.name).exists() and not (new / entry.name).is_symlink():
                _link_or_copy(entry, new / entry.name)
    if exchange(new, target):          # `new` now holds the old folder
        old = new
    else:
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
        try:
            os.replace(new, target)
        except BaseException:
            os.replace(old, target)
            raise
    shutil.rmtree(old, ignore_errors=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    """`src` (a file, a link or a folder) at `dst` as hard links where the filesystem has them (no data is
    copied), else as a copy."""
    def link(a: str, b: str) -> None:
        try:
            os.link(a, b, follow_symlinks=False)
        except OSError:
            shutil.copy2(a, b, follow_symlinks=False)

    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True, copy_function=link)
    else:
        link(str(src), str(dst))


def refuse_current_folder(target: Path, flag: str = "--out") -> None:
    """A folder to be replaced must not be the current folder or one that holds it: it cannot be
    renamed away while it is in use, and deleting it would take the caller's working folder."""
    target = Path(target)
    if target.exists() and Path.cwd().resolve().is_relative_to(target.resolve()):
        raise UsageError(f"{flag} {str(target)!r} is the current folder or holds it: choose another folder")


def check_output_folder(out: str | Path, force: bool, *, holds: str, ours: Callable[[Path], bool], not_ours: str,
                        without_force: str, flag: str = "--out",
                        inputs: dict[str, str | Path | None] | None = None) -> None:
    """The folder a command writes whole (an artifact, a training run, a student), checked before any
    work: it must be new or empty, or, with `force`, a folder that `ours` recognises as this kind of
    output, which the command then replaces. `force` never deletes a file, a folder of other things,
    the current folder (nor one holding it), or one holding a file the command reads (`inputs`: its flag
    -> its path, e.g. {"--data": ...}), and the place must take new files."""
    out = Path(out)
    if force and out.is_dir():
        for name, path in (inputs or {}).items():
            if path is not None and Path(path).resolve().is_relative_to(out.resolve()):
                raise UsageError(f"{name} {str(path)!r} is inside {flag} {str(out)!r}, which --force replaces: move "
                                 f"it out of {holds}'s folder first")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag} {str(out)!r} is a file: expected a folder for {holds}")
    if out.is_dir() and os.path.ismount(_through_link(out)):   # a separate disk, a container's volume
        raise UsageError(f"{flag} {str(out)!r} is a mount point: {holds} is written beside it and renamed into its "
                         f"place, which the system refuses for a mount point; choose a folder inside it, e.g. "
                         f"{str(out / 'out')!r}")
    _check_temporary_name_fits(out, flag)
    check_writable(out if out.is_dir() else out.parent, f"{flag} {str(out)!r}")
    if not out.exists():
        return
    refuse_current_folder(out, flag)
    if not any(out.iterdir()):
        return
    if not force and not ours(out):   # --force would be refused too: do not suggest it
        raise UsageError(f"{flag} {str(out)!r} already exists and {not_ours}: choose another {flag}")
    if not force:
        raise UsageError(f"{flag} {str(out)!r} already exists: {without_force}")
    if not ours(out):
        raise UsageError(f"--force: {str(out)!r} {not_ours}: refusing to replace it; choose another {flag}")


def check_output_file(path: str | Path, flag: str, suffix: str | None = None) -> Path:
    """A file a command writes when it is done (--json, --plot, --out): checked before any work, so a
    bad path costs a one-line error, not a finished run. Its name ends in `suffix` (when given), and its
    folder must exist and take a new file."""
    if not str(path):                   # Path("") is ".": an unset variable in `--json "$OUT"`
        raise UsageError(f"{flag} '': expected the name of a file to write")
    out = Path(path)
    if suffix is not None and out.suffix.lower() != suffix:
        raise UsageError(f"{flag} {str(path)!r}: expected a file name ending in {suffix}")
    if out.is_dir():
        raise UsageError(f"{flag} {str(path)!r} is a folder: expected the name of a file to write")
    folder = out.parent
    if not folder.is_dir():
        raise UsageError(f"{flag} {str(path)!r}: folder {str(folder)!r} does not exist")
    check_writable(folder, f"{flag} {str(path)!r}")
    return out


def check_writable(folder: Path, what: str) -> None:
    """UsageError unless a file can be created in `folder`, or in its nearest existing parent when it
    is still to be made (a read-only mount, missing permissions, /proc ...)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise UsageError(f"{what}: cannot write in {str(folder)!r} ({exc.strerror or exc})") from None


@contextlib.contextmanager
def exclusive_writer(target: Path, flag: str = "--out") -> Iterator[None]:
    """Hold `target`'s writer lock (an flock on `.<name>.lock` beside it, removed afterwards) for the
    whole command: a second command writing the same folder is refused in one line instead of mixing
    its files with the first one's. Without a parent folder yet, or without flock, nothing is locked."""
    target = Path(target).resolve()
    if fcntl is None or not target.parent.is_dir():
        yield
        return
    lock_path = target.parent / f".{target.name}.lock"
    try:
        fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
    except OSError:                     # a read-only parent: the command's own checks say so
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"{flag} {str(target)!r} is being written by another deploylm command (it holds "
                             f"{lock_path.name}): wait for it to finish, or choose another folder") from None
        try:
            yield
        finally:
            lock_path.unlink(missing_ok=True)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: bytes) -> Path:
    """`data` at `path`, replaced atomically (a temporary sibling named by this process, then a rename); a full
    disk or a folder made read-only is one WriteFailed (exit status 1), and nothing is left there."""
    from deploylm.errors import WriteFailed

    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:          # a full disk, a folder made read-only during the run
        raise WriteFailed(f"could not write {path}: {exc.strerror or exc}; nothing was written there") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def json_finite(value: Any) -> Any:
    """`value` with every NaN/inf float (in dicts, lists, tuples) replaced by None: standard JSON, which
    json.dumps would otherwise write as the non-standard NaN / Infinity."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_finite(v) for v in value]
    return value
