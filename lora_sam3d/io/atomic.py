"""Write-then-rename, so an interrupted run never leaves a half-written file under its final name.

The temporary file is flushed to disk (fsync) before the rename, so after a crash of the machine,
not only of the process, the final name holds either the old or the whole new content.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_dir", "atomic_write"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``.

    The temporary name keeps the final suffixes (some writers pick the format from them); the
    file gets the usual permissions (0666 less the umask), not mkstemp's private 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + "".join(path.suffixes)
        )
    except OSError as err:
        raise _named(err, path) from err
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise _named(err, path) from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _named(err: OSError, path: Path) -> OSError:
    """The same error naming ``path`` when it names no file or only our temporary one (a full
    disk's ``write`` names none; a read-only folder fails on the temporary name); else ``err``."""
    if err.filename is not None and not Path(err.filename).name.startswith("."):
        return err
    if err.errno is None:  # numpy's short write: "N requested and M written"
        return OSError(0, f"{err} (disk full or a file-size limit?)", str(path))
    return type(err)(err.errno, err.strerror or str(err), str(path))


def atomic_dir(path: str | os.PathLike[str], write: Callable[[Path], None], exist_ok: bool = False) -> Path:
    """Fill a temporary folder beside ``path`` with ``write(tmp)``, then rename it to ``path``.

    With ``exist_ok``, a ``path`` that another process completed first (the rename then fails on
    the non-empty folder) counts as success: the temporary copy is dropped and ``path`` returned.
    """
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    except OSError as err:
        raise _named(err, path) from err
    try:
        write(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
        os.replace(tmp, path)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if exist_ok and path.is_dir() and any(path.iterdir()):
            return path
        raise _named(err, path) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
