"""Where shards, runs and experiments live: a local path, or a URI that pyarrow's filesystems
open (``s3://``, ``gs://``, ``hdfs://``, ...), with credentials and endpoint the standard way
(for S3: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_ENDPOINT_URL``, or the
instance's role). Every read and write of a location goes through here, so one job code path
serves both (docs/design.md, "Object storage").

pyarrow's filesystems, not fsspec: pyarrow already reads and writes the shards, Ray Train and
Ray Data resolve their own ``s3://`` paths with it, and its S3 client needs nothing more.

Object stores have no rename, so a write is atomic in the way each store allows: a local file
goes to a temporary name, then is renamed; an object is one PUT (or one completed multipart
upload), which readers see whole or not at all.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs

from bonescan_model.errors import InputError, first_line


def is_uri(location: str | os.PathLike) -> bool:
    """A URI of a filesystem other than the local one (``file://`` is local)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def absolute(location: str | os.PathLike) -> str:
    """The location as recorded in run.json / experiment.json: a URI as given, without a
    trailing slash; a local path made absolute (a run is resumed from any working directory)."""
    text = str(location)
    if is_uri(text):
        return text.rstrip("/")
    # realpath, not Path.resolve, which raises RuntimeError on a symlink loop
    return os.path.realpath(text.removeprefix("file://"))


def locate(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it); an InputError naming the location when pyarrow cannot
    open it (an unknown scheme, a filesystem pyarrow was built without)."""
    text = str(location)
    if not is_uri(text):
        return pafs.LocalFileSystem(), absolute(text)
    try:
        fs, path = pafs.FileSystem.from_uri(text)
    except (ValueError, OSError, TypeError) as err:  # ArrowInvalid is a ValueError
        raise InputError(text, f"not a storage location pyarrow can open ({err})") from None
    return fs, path.rstrip("/")


def join(location: str | os.PathLike, *names: str) -> str:
    if is_uri(location):
        return "/".join([str(location).rstrip("/"), *names])
    return str(Path(location, *names))


def relative(location: str | os.PathLike, root: str | os.PathLike) -> str:
    """``location`` relative to ``root`` (a folder above it), as a POSIX path."""
    if is_uri(root):
        return str(location)[len(str(root).rstrip("/")) + 1:]
    return Path(location).relative_to(root).as_posix()


def name(location: str | os.PathLike) -> str:
    """The last component: a run's name (the dashboards' tag, the MLflow model's)."""
    return PurePosixPath(str(location).rstrip("/")).name if is_uri(location) else Path(location).name


def _info(location) -> pafs.FileInfo:
    fs, path = locate(location)
    try:
        return fs.get_file_info(path)
    except OSError as err:  # an unreachable endpoint, a bucket that does not exist, no access
        raise InputError(str(location), f"cannot be reached ({first_line(err)})") from None


def stamp(location) -> tuple[int, int] | None:
    """(size, modification time in ns) of a file, None where there is none: what tells a
    file changed since it was last read, without reading it."""
    info = _info(location)
    return (info.size, info.mtime_ns or 0) if info.type == pafs.FileType.File else None


def is_file(location) -> bool:
    return _info(location).type == pafs.FileType.File


def is_dir(location) -> bool:
    return _info(location).type == pafs.FileType.Directory


def exists(location) -> bool:
    return _info(location).type != pafs.FileType.NotFound


def read_bytes(location) -> bytes:
    """The file's bytes; FileNotFoundError when there is none."""
    fs, path = locate(location)
    if not is_uri(location):
        return Path(path).read_bytes()
    if not is_file(location):
        raise FileNotFoundError(str(location))
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(location) -> str:
    return read_bytes(location).decode("utf-8")


def write_bytes(location, data: bytes) -> None:
    """Atomic: a local temporary name then a rename; an object in one upload. A write that
    fails (a full disk, a read-only mount) leaves no temporary file and is an InputError
    naming the location."""
    fs, path = locate(location)
    if not is_uri(location):
        target = Path(path)
        tmp = target.with_name(f".{target.name}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, target)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise InputError(target, f"cannot be written ({err.strerror or type(err).__name__})") from None
        return
    try:
        with fs.open_output_stream(path) as f:
            f.write(data)
    except OSError as err:
        raise InputError(str(location), f"cannot be written ({first_line(err)})") from None


def check_writable(location, *, file: bool = False) -> None:
    """Fail before any work, naming the location, where an output cannot be written: a path
    under /proc, on a read-only mount, on a full disk, or below a file. A local location is
    probed where it would be created (its nearest existing folder: a one-byte temporary file
    written and removed there), so nothing is left behind when the check fails, nor when it passes.
    file: ``location`` is a file (``evaluate --json``), whose folder is probed. Object
    storage is checked by its first write, which names the location the same way."""
    if is_uri(location):
        return
    target = Path(absolute(location))
    if file and target.is_dir():
        raise InputError(location, "is a folder, not a file to write")
    if not file and target.exists() and not target.is_dir():
        raise InputError(location, "is a file, not a folder to write into")
    folder = target.parent if file else target
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(location, f"cannot be written: {folder} is a file, not a folder")
    try:  # a byte, not an empty file: a full disk still takes empty files and folders
        handle, probe = tempfile.mkstemp(prefix=".bonescan-probe-", dir=folder)
        try:
            os.write(handle, b"\0")
        finally:
            os.close(handle)
            os.unlink(probe)
    except OSError as err:
        raise InputError(location, f"cannot be written ({err.strerror or type(err).__name__})") from None


def write_text(location, text: str) -> None:
    write_bytes(location, text.encode("utf-8"))


def delete(location) -> None:
    """Remove one file; a missing one is not an error."""
    fs, path = locate(location)
    if _info(location).type == pafs.FileType.File:
        fs.delete_file(path)


def listdir(location) -> list[str]:
    """The names directly inside a folder; [] when there is none."""
    fs, path = locate(location)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except NotADirectoryError:
        return []
    except OSError as err:
        raise InputError(str(location), f"cannot be listed ({first_line(err)})") from None
    return sorted(PurePosixPath(i.path).name for i in infos)


def makedirs(location) -> None:
    """A local folder is created; an object store needs none (a prefix exists by its objects)."""
    if not is_uri(location):
        Path(absolute(location)).mkdir(parents=True, exist_ok=True)


def upload(local: Path, location: str, keep: Callable[[str], bool] = lambda _: True) -> None:
    """Copy the files under ``local`` (relative paths that ``keep`` accepts) to ``location``."""
    fs, root = locate(location)
    for file in sorted(p for p in Path(local).rglob("*") if p.is_file()):
        relative = file.relative_to(local).as_posix()
        if keep(relative):
            with fs.open_output_stream(f"{root}/{relative}") as out:
                out.write(file.read_bytes())


def download(location: str, local: Path, keep: Callable[[str], bool] = lambda _: True) -> None:
    """Copy the files under ``location`` (relative paths that ``keep`` accepts) into ``local``."""
    fs, root = locate(location)
    selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
    try:
        infos = fs.get_file_info(selector)
    except OSError as err:
        raise InputError(location, f"cannot be listed ({first_line(err)})") from None
    for info in infos:
        relative = info.path[len(root):].lstrip("/")
        if info.type != pafs.FileType.File or not keep(relative):
            continue
        target = Path(local, relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(info.path) as f:
            target.write_bytes(f.read())


@contextmanager
def local_file(location: str) -> Iterator[Path]:
    """A local path holding the file at ``location``: the path itself, or a downloaded copy
    removed on exit. FileNotFoundError when there is none."""
    if not is_uri(location):
        yield Path(location)
        return
    data = read_bytes(location)
    with tempfile.TemporaryDirectory(prefix="bonescan-") as tmp:
        path = Path(tmp, name(location))
        path.write_bytes(data)
        yield path


@contextmanager
def fetched(location: str, keep: Callable[[str], bool] = lambda _: True) -> Iterator[Path]:
    """A read-only local view of the folder ``location``: the folder itself when it is local;
    otherwise a temporary copy of its files that ``keep`` accepts, removed on exit (nothing
    goes back)."""
    if not is_uri(location):
        yield Path(absolute(location))
        return
    with tempfile.TemporaryDirectory(prefix="bonescan-") as tmp:
        local = Path(tmp, name(location))
        local.mkdir()
        download(location, local, keep)
        yield local


@contextmanager
def staged(location: str, keep: Callable[[str], bool] = lambda _: True) -> Iterator[Path]:
    """A local folder a job writes for ``location``: the folder itself when it is local (made
    if missing); otherwise a temporary folder of the same name, holding what ``location``
    already holds (the files ``keep`` accepts), whose files go back to ``location`` when the
    job ends without an error (``publish`` sends them earlier), and which is removed then."""
    if not is_uri(location):
        path = Path(absolute(location))
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with fetched(location, keep) as stage:
        yield stage
        publish(stage, location)


def publish(stage: Path, location: str) -> None:
    """Send a staged folder's files to its location now (a no-op for a local folder, which
    is its own stage)."""
    if is_uri(location):
        upload(stage, location)



@contextmanager
def local_checkpoint(location: str) -> Iterator[Path]:
    """The one rule for naming a checkpoint: a ``model.pt``, or a folder holding one (a run
    folder keeps its kept model there), local or a URI -> the local path of that file, which
    ``bonescan_model.checkpoint.load_model`` opens (a downloaded copy for a URI). InputError
    where there is none."""
    from bonescan_model.checkpoint import FILENAME, model_file

    if not is_uri(location):
        yield model_file(location)
        return
    target = location if is_file(location) else join(location, FILENAME)
    if not is_file(target):
        raise InputError(location, f"no checkpoint here (expected a {FILENAME} or a run folder holding one)")
    with local_file(target) as path:
        yield path
