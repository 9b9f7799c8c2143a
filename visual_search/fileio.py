"""Durable, exclusive writes: unique temporary names, fsync, rename without replacing, locks; sha256; UTC times."""
import ctypes
import errno
import fcntl
import glob
import hashlib
import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

CATALOGUES_ENV = "VISUAL_SEARCH_CATALOGUES"  # where relative catalogue and change-log settings are taken from
RENAME_NOREPLACE = 1
_renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)


def under_catalogues(setting):
    """The path a setting names ($VARS expanded); a relative one is taken under $VISUAL_SEARCH_CATALOGUES."""
    path = Path(os.path.expandvars(str(setting)))
    return path if path.is_absolute() else Path(os.environ.get(CATALOGUES_ENV, ".")) / path


def utc_now():
    """The time now in UTC, ISO 8601 to the second with a Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def sha256_file(path, progress=False):
    """The hex sha256 of a file, read in blocks (a progress bar for large files when asked)."""
    digest, size = hashlib.sha256(), os.path.getsize(path)
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=f"sha256 {Path(path).name}",
                                     disable=not progress or size < (256 << 20), leave=False) as bar:
        for block in iter(lambda: f.read(8 << 20), b""):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def fsync_dir(path):
    """Makes the entries of folder `path` (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder):
    """fsyncs every file and folder below `folder`, and `folder` itself."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(root)


def rename_noreplace(source, target):
    """Renames `source` (a file or a folder) to `target`, failing with FileExistsError when `target` exists:
    renameat2's RENAME_NOREPLACE, or on a file system without it a hard link (files) or a check (folders)."""
    if _renameat2 is not None:
        if _renameat2(-100, os.fsencode(source), -100, os.fsencode(target), RENAME_NOREPLACE) == 0:
            return
        error = ctypes.get_errno()
        if error == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, f"{target} exists: it is never replaced", str(target))
        if error not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(error, os.strerror(error), str(source))
    if os.path.isdir(source):
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, f"{target} exists: it is never replaced", str(target))
        os.rename(source, target)
    else:
        os.link(source, target)
        os.unlink(source)


def temporary_name(path):
    """A unique hidden name beside `path`, for writing it: .<name>.<pid>.<random>.partial."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")


def remove_stale_partials(path):
    """Removes the temporary files or folders beside `path` whose writer process is gone (killed mid-write)."""
    path = Path(path)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.partial"):
        pid = stale.name[len(path.name) + 2:].split(".")[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def process_alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def write_atomically(path, data, replace=False, stat_from=None):
    """Writes `data` (bytes, str, or a function that writes to a binary file) to a unique temporary name beside
    `path`, fsyncs it, renames it to `path` and fsyncs the folder. An existing `path` is refused unless `replace`
    (a state file updated under its lock). `stat_from`: a file whose mode and times the new one takes. A failure
    leaves nothing behind. Returns `path`."""
    path = Path(path)
    remove_stale_partials(path)
    tmp = temporary_name(path)
    try:
        with open(tmp, "xb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            if stat_from is not None:
                shutil.copystat(stat_from, tmp)
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            rename_noreplace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def copy_into(path, file):
    """Copies the file at `path` into the open binary `file` (a write_atomically writer)."""
    with open(path, "rb") as source:
        shutil.copyfileobj(source, file, 1 << 20)


def write_json(path, value, replace=False):
    return write_atomically(path, json.dumps(value, indent=2) + "\n", replace=replace)


def read_json(path, what="state file"):
    """The JSON value in `path`; a file that is not JSON raises ValueError naming it in one line."""
    try:
        return json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: the {what} is corrupt ({error.__class__.__name__}: {error}); restore it from a "
                         f"backup or delete it") from None


@contextmanager
def staging_folder(final):
    """A new folder under a unique hidden name beside `final`; on success its tree is fsynced and it is renamed to
    `final` (never replacing one), on failure removed."""
    final = Path(final)
    if final.exists():
        raise FileExistsError(f"{final} exists: it is written once; choose a new name")
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(final)
    tmp = temporary_name(final)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        rename_noreplace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def exclusive_lock(path, wait=True, what=None):
    """Holds an exclusive lock on the lock file `path` (flock: released when the process dies). Without `wait`,
    a held lock raises BlockingIOError naming `what`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise BlockingIOError(errno.EWOULDBLOCK, f"{what or path} is being written by another process "
                                                     f"(lock {path}); try again when it is done") from None
        yield
    finally:
        os.close(fd)
