"""Writing files so that they are never seen half-written, and checking output folders up front.

Every file pyfastnn writes (checkpoints, metrics, pictures, benchmark results, downloads) goes
through :func:`atomic_write`: the bytes go to a temporary file beside the target, which is renamed
over it only once complete, so an interrupted or failed write leaves the previous file (or none).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import re
import secrets
import stat
import sys
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator, List, NoReturn, Optional, Union

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks, no descriptor flags
    fcntl = None

__all__ = ["atomic_write", "ensure_writable_folder", "check_output_file", "check_output_names", "hold_folder",
           "output_folder", "output_file", "restore_output_folder", "is_standard_output", "json_bytes"]

PathLike = Union[str, "os.PathLike[str]"]

_DESCRIPTOR_ALIAS = re.compile(r"/dev/(stdin|stdout|stderr)|/dev/fd/(\d+)|/proc/(self|\d+)/fd/(\d+)")


def _descriptor_of(path: PathLike) -> Optional[int]:
    """The descriptor where ``path`` names one of this process's open files by an alias
    (``/dev/stdout``, ``/dev/fd/N``, ``/proc/self/fd/N``): written through it, the shell's ``>>``
    appends and a pipe stays a pipe, where opening the alias would truncate the file it stands for
    and replacing it would replace that file."""
    match = _DESCRIPTOR_ALIAS.fullmatch("/" + os.path.abspath(os.fspath(path)).lstrip("/"))  # also //dev/stdout
    if match is None or (match[3] not in (None, "self") and int(match[3]) != os.getpid()):
        return None
    if match[1]:
        return ("stdin", "stdout", "stderr").index(match[1])
    return int(match[2] or match[4])


def is_standard_output(path: PathLike) -> bool:
    """Whether ``path`` names this process's standard output (``/dev/stdout``, ``/dev/fd/1``), which
    :func:`atomic_write` writes through.

    Example:
        >>> from pyfastnn.files import is_standard_output
        >>> is_standard_output("/dev/stdout"), is_standard_output("/dev/fd/1"), is_standard_output("out.json")
        (True, True, False)
    """
    return _descriptor_of(path) == 1


@contextlib.contextmanager
def atomic_write(path: PathLike) -> Iterator[BinaryIO]:
    """Opens a binary file whose content replaces ``path`` atomically when the block ends without error.

    On an exception the temporary file is removed and ``path`` is left as it was. The file keeps the
    permissions of the file it replaces and a new one gets the usual ones (``0o666`` less the umask),
    as with ``open(path, "wb")``. A name ending in a separator, ``.`` or ``..`` raises
    ``IsADirectoryError``, as ``open`` does (``Path`` would drop the separator). Where ``path`` is
    a symbolic link, the file it points to is replaced (the link stays); where it is a device or a
    pipe (``/dev/null``), the bytes are written into it, as ``open`` would: there is no file to
    replace. ``/dev/stdout``, ``/dev/stderr`` and ``/dev/fd/N`` are written through the process's own
    descriptor, wherever it leads (``>> log`` appends). A folder raises ``IsADirectoryError`` before
    the block runs.

    Example:
        >>> from pyfastnn.files import atomic_write
        >>> import json, tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "result.json"
        >>> with atomic_write(target) as f:
        ...     f.write(json.dumps({"ok": True}).encode())
        12
        >>> json.loads(target.read_text())
        {'ok': True}
        >>> try:
        ...     with atomic_write(target) as f:
        ...         _ = f.write(b"half")
        ...         raise KeyboardInterrupt
        ... except KeyboardInterrupt:
        ...     pass
        >>> json.loads(target.read_text()), sorted(p.name for p in target.parent.iterdir())
        ({'ok': True}, ['result.json'])
    """
    shown = str(path)  # errors name the file asked for, not the link's target or the temporary file
    if _names_a_folder(path):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), shown)
    descriptor = _descriptor_of(path)
    path = Path(os.path.realpath(path))
    if descriptor is not None:
        writer = _write_through_descriptor(descriptor, shown)
    elif path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), shown)
    elif path.exists() and not path.is_file():  # a device or a pipe: nothing to replace
        writer = _write_into_device(path, shown)
    else:
        writer = _replace_file(path, shown)
    with writer as f:
        yield f


@contextlib.contextmanager
def _write_through_descriptor(descriptor: int, shown: str) -> Iterator[BinaryIO]:
    """atomic_write to one of the process's own descriptors (``/dev/stdout``): the whole content once
    the block succeeds, as a replaced file would get it."""
    buffer = io.BytesIO()
    yield buffer
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):  # what was printed comes first
        with contextlib.suppress(Exception):
            stream.flush()
    try:
        with os.fdopen(os.dup(descriptor), "wb") as f:  # a copy: closing it leaves the process's open
            f.write(buffer.getvalue())
    except OSError as e:
        _raise_naming(e, shown, cause=False)


@contextlib.contextmanager
def _write_into_device(path: Path, shown: str) -> Iterator[BinaryIO]:
    """atomic_write to a device or a pipe, which has no file to replace: written as it comes."""
    try:
        f = open(path, "wb")
    except OSError as e:
        _raise_naming(e, shown, cause=False)
    try:
        with f:
            yield f
    except OSError as e:  # "disk full" from a write or the closing flush names the device
        if e.filename is None or os.fspath(e.filename) == str(path):
            _raise_naming(e, shown)
        raise


@contextlib.contextmanager
def _replace_file(path: Path, shown: str) -> Iterator[BinaryIO]:
    """atomic_write to a file: a temporary file beside it, renamed over it once complete and on disk."""
    # Same folder, so the rename stays on one file system and is atomic; a dot name keeps it out of globs.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as e:
        _raise_naming(e, shown, cause=False)
    try:
        with os.fdopen(descriptor, "wb") as f:  # owns the descriptor from here, whatever fails
            with contextlib.suppress(FileNotFoundError):  # a file locked down to 0o600 stays so
                os.chmod(temporary, stat.S_IMODE(os.stat(path).st_mode))
            yield f
            f.flush()
            os.fsync(f.fileno())  # the content is on disk before the name points at it
        os.replace(temporary, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        # "disk full" names the file it hit; an error about another file (one the block reads) keeps its name
        if isinstance(e, OSError) and (e.filename is None or os.fspath(e.filename) == str(temporary)):
            _raise_naming(e, shown)
        raise
    _sync_folder(path.parent)


def json_bytes(data) -> bytes:
    r"""``data`` as indented JSON text ending in a newline (``>> log`` appends on a line of its own),
    every NaN or infinite float inside its dicts, lists and tuples written as ``null``: JSON has no
    such numbers, and strict readers refuse the ``NaN`` Python would write.

    Example:
        >>> from pyfastnn.files import json_bytes
        >>> json_bytes({"loss": float("nan"), "steps": [1, 2]})
        b'{\n  "loss": null,\n  "steps": [\n    1,\n    2\n  ]\n}\n'
    """
    return json.dumps(_finite_or_null(data), indent=2, allow_nan=False).encode() + b"\n"


def _finite_or_null(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    return value


def _names_a_folder(path: PathLike) -> bool:
    """Whether a path given as text ends in a separator, ``.`` or ``..``: a folder whatever exists
    (``Path()`` would drop a trailing ``/`` or ``/.``)."""
    return isinstance(path, str) and os.path.basename(path) in ("", ".", "..")


def _raise_naming(error: OSError, path: str, cause: bool = True) -> NoReturn:
    """Raises `error` again naming `path` (not a temporary file): ``[Errno 28] No space left on device: 'run/metrics.json'``."""
    if not (error.errno and error.strerror):
        raise error
    renamed = type(error)(error.errno, error.strerror, path)
    if cause:
        raise renamed from error
    raise renamed from None


def _sync_folder(folder: Path) -> None:
    """Makes the rename itself durable where the platform allows (POSIX); best effort elsewhere."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def ensure_writable_folder(path: PathLike, what: str = "output folder") -> Path:
    """Creates ``path`` (with parents) if needed and proves a file can be written there.

    Raises ``NotADirectoryError``, ``PermissionError`` or another ``OSError`` whose message names
    ``what`` and the path, so that a run fails before its work rather than when saving it.

    Example:
        >>> from pyfastnn.files import ensure_writable_folder
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp()) / "runs" / "a"
        >>> ensure_writable_folder(folder) == folder, folder.is_dir(), list(folder.iterdir())
        (True, True, [])
        >>> (folder / "notes").write_text("x")
        1
        >>> try:
        ...     ensure_writable_folder(folder / "notes" / "b")
        ... except NotADirectoryError as e:
        ...     print(str(e).replace(str(folder), "FOLDER"))
        output folder FOLDER/notes/b cannot be created: FOLDER/notes is a file
    """
    path = Path(path)
    existing = next(p for p in (path, *path.parents) if p.exists() or p.is_symlink())
    if not existing.exists():  # a symbolic link to nowhere: mkdir would say only "File exists"
        raise FileNotFoundError(f"{what} {path} cannot be created: {existing} is a symbolic link to "
                                f"{os.readlink(existing)}, which does not exist")
    if not existing.is_dir():
        raise NotADirectoryError(f"{what} {path} is a file, not a folder" if existing == path
                                 else f"{what} {path} cannot be created: {existing} is a file")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # in a read-only or virtual file system (/proc), say
        raise type(e)(f"{what} {path} cannot be created ({e.strerror or e})") from None
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise type(e)(f"{what} {path} is not writable ({e.strerror or e})") from None
    return path


@contextlib.contextmanager
def output_folder(path: PathLike, what: str = "output folder") -> Iterator[Path]:
    """The folder a run writes into, for the block that writes: created if needed and checked
    writable (:func:`ensure_writable_folder`), then held (:func:`hold_folder`). The folders it
    created are removed again, while still held, when the block fails leaving them empty, so that a
    run stopped before its first file leaves no trace; a run that finds the folder held removes
    nothing (it is the other run's).

    Example:
        >>> from pyfastnn.files import output_folder
        >>> import tempfile, pathlib
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> try:
        ...     with output_folder(root / "runs" / "a") as folder:
        ...         raise RuntimeError("stopped before writing")
        ... except RuntimeError:
        ...     pass
        >>> list(root.iterdir())
        []
    """
    path = Path(path)
    created = _missing_folders(path.absolute())  # as mkdir walks it: "q/../r" makes q too
    for attempt in range(3):
        held = contextlib.ExitStack()
        try:
            folder = ensure_writable_folder(path, what)
            held.enter_context(hold_folder(folder, what))
            break
        except (FileNotFoundError, FileExistsError, NotADirectoryError):  # removed meanwhile by its holder: again
            if attempt == 2:
                raise
    with held:
        try:
            yield folder
        except BaseException:
            _remove_while_empty(created)
            raise


@contextlib.contextmanager
def output_file(path: PathLike, what: str = "--json") -> Iterator[Path]:
    """The file a command writes when its work is done, for the block that does the work: checked
    up front (:func:`check_output_file`, which creates its folder), and the folders that check
    created removed again when the block fails leaving them empty, so that a command stopped
    before its result leaves no trace.

    Example:
        >>> from pyfastnn.files import output_file
        >>> import tempfile, pathlib
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> try:
        ...     with output_file(root / "new" / "bench.json"):
        ...         raise KeyboardInterrupt
        ... except KeyboardInterrupt:
        ...     pass
        >>> list(root.iterdir())
        []
    """
    # Where check_output_file creates folders (a link's target's); none for a descriptor's alias.
    created = [] if _descriptor_of(path) is not None else _missing_folders(Path(os.path.realpath(path)).parent)
    try:
        checked = check_output_file(path, what)
        yield checked
    except BaseException:
        _remove_while_empty(created)
        raise


def restore_output_folder(path: PathLike, what: str = "--json") -> None:
    """Makes the folder of the file ``path`` again where it went missing since :func:`output_file`
    checked it (another run's :func:`output_file` may remove an empty folder it made when that run
    stops); nothing for a descriptor or a device.

    Example:
        >>> import tempfile, pathlib
        >>> from pyfastnn.files import restore_output_folder
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "gone" / "bench.json"
        >>> restore_output_folder(target)
        >>> target.parent.is_dir()
        True
    """
    if _descriptor_of(path) is not None:
        return
    folder = Path(os.path.realpath(path)).parent
    if not folder.is_dir():
        ensure_writable_folder(folder, f"folder for {what}")


def _missing_folders(folder: Path) -> List[Path]:
    """``folder`` and its parents that do not exist (yet), the deepest first; a ``..`` or ``.`` step
    is no folder of its own (``q/..`` is q's parent, which exists once q does)."""
    return [p for p in (folder, *folder.parents) if p.name not in ("..", ".") and not p.exists()]


def _remove_while_empty(folders) -> None:
    """Removes ``folders`` (the deepest first) while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # it holds something now (or went away): it and its parents stay
            break


def check_output_file(path: PathLike, what: str = "--json") -> Path:
    """Checks up front that a file can be written at ``path`` (not a folder; its folder created and
    writable), so that a long run fails before its work rather than when saving it.

    Example:
        >>> from pyfastnn.files import check_output_file
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> check_output_file(folder / "out" / "bench.json") == folder / "out" / "bench.json"
        True
        >>> try:
        ...     check_output_file(folder)
        ... except IsADirectoryError as e:
        ...     print(str(e).replace(str(folder), "FOLDER"))
        --json FOLDER is a folder; give a file name
    """
    if _names_a_folder(path):
        raise IsADirectoryError(f"{what} {path} names a folder; give a file name")
    path = Path(path)
    descriptor = _descriptor_of(path)
    if descriptor is not None:  # written through the open descriptor (atomic_write): open for writing
        try:
            mode = os.fstat(descriptor).st_mode
            writable = fcntl is None or fcntl.fcntl(descriptor, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY
        except (OSError, OverflowError):
            raise OSError(errno.EBADF, f"{what} is not an open descriptor", str(path)) from None
        if stat.S_ISDIR(mode) or not writable:
            raise PermissionError(errno.EACCES, f"{what} is not open for writing", str(path))
        return path
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder; give a file name")
    real = Path(os.path.realpath(path))  # what atomic_write opens
    if real.exists() and not real.is_file():  # a device or a pipe, written as open() would write it
        if stat.S_ISSOCK(real.stat().st_mode):
            raise FileExistsError(errno.EEXIST, f"{what} is a socket, which no file can be written to",
                                  str(path))
        if not os.access(real, os.W_OK):
            raise PermissionError(errno.EACCES, f"{what} is not writable", str(path))
        return path
    # The folder the file will really be written in: a symbolic link's target's (atomic_write writes there).
    ensure_writable_folder(real.parent, f"folder for {what}")
    return path


def check_output_names(folder: PathLike, names, what: str = "output folder") -> None:
    """Raises ``IsADirectoryError`` where one of the files a run writes into ``folder`` is taken by
    a folder, ``FileExistsError`` where by something else that is not a file (a pipe, a socket, a
    device, which writing would block on or spill into), ``FileNotFoundError`` where by a symbolic
    link into a folder that does not exist: up front, rather than when the run saves it.

    Example:
        >>> from pyfastnn.files import check_output_names
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> (folder / "metrics.json").mkdir()
        >>> try:
        ...     check_output_names(folder, ["checkpoint.pt", "metrics.json"])
        ... except IsADirectoryError as e:
        ...     print(str(e).replace(str(folder), "FOLDER"))
        output folder FOLDER holds a folder named metrics.json where a file is written; move it away or choose another folder
    """
    folder = Path(folder)
    for name in names:
        path = folder / name
        if path.is_dir():
            raise IsADirectoryError(f"{what} {folder} holds a folder named {name} where a file is written; "
                                    f"move it away or choose another folder")
        if path.exists() and not path.is_file():
            raise FileExistsError(f"{what} {folder} holds {name}, which is not a regular file (a pipe, socket or "
                                  f"device), where a file is written; move it away or choose another folder")
        if path.is_symlink() and not Path(os.path.realpath(path)).parent.is_dir():  # written where it points
            raise FileNotFoundError(f"{what} {folder} holds {name}, a symbolic link to {os.readlink(path)}, whose "
                                    f"folder does not exist; make that folder, or remove the link")


@contextlib.contextmanager
def hold_folder(path: PathLike, what: str = "output folder") -> Iterator[Path]:
    """Holds the folder ``path`` for this block: another process (or another block here) that asks
    for it meanwhile gets ``BlockingIOError`` at once, so two runs never write into one folder at the
    same time. The hold is an advisory lock on the folder itself (no lock file is left behind), freed
    when the block ends or the process dies. Where the system has no such locks, or the folder cannot
    be read, the block just runs. ``FileNotFoundError``: the folder was removed while being taken.

    Example:
        >>> from pyfastnn.files import hold_folder
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> with hold_folder(folder):
        ...     try:
        ...         with hold_folder(folder):
        ...             pass
        ...     except BlockingIOError as e:
        ...         print(str(e).replace(str(folder), "FOLDER"))
        output folder FOLDER is in use by another run; wait for it to end or choose another folder
    """
    path = Path(path)
    try:  # no flock (Windows): nothing to hold
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if fcntl is not None else None
    except PermissionError:  # a folder this process may write but not read: nothing to hold it by
        fd = None
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BlockingIOError(f"{what} {path} is in use by another run; wait for it to end or choose "
                                      f"another folder") from None
            except OSError as e:  # a file system without locks (some network mounts)
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS):
                    raise
            # The run that held it before may have removed it (stopped before its first file): the
            # lock is then on a folder no path leads to.
            if not path.is_dir() or not os.path.samestat(os.fstat(fd), os.stat(path)):
                raise FileNotFoundError(errno.ENOENT, f"{what} was removed while being taken", str(path))
        yield path
    finally:
        if fd is not None:
            os.close(fd)
