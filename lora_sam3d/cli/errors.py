"""One line for an error, as the command prints it: its type, its message, and for an OS error the
operation and the path that failed."""

from __future__ import annotations

__all__ = ["error_line"]

_OS_OPERATIONS = {
    "mkdir": "create folder",
    "makedirs": "create folder",
    "open": "open",
    "_open_file": "open",
    "__init__": "open",
    "write_text": "write",
    "write_bytes": "write",
    "replace": "rename",
    "rename": "rename",
    "mkstemp": "create a temporary file in",
    "mkdtemp": "create a temporary folder in",
    "rmtree": "remove",
    "unlink": "remove",
    "utime": "stamp",
    "iterdir": "list",
    "stat": "read",
    "read_text": "read",
    "read_bytes": "read",
    "save": "write",
    "copyfile": "copy",
    "atomic_write": "write",
    "atomic_dir": "write",
}


def error_line(err: BaseException) -> str:
    """One line for an error: its type and message; an OS error says which operation failed on which
    path; an error raised in a DataLoader worker process reads as if raised here (torch wraps it as
    "Caught X in DataLoader worker process N" plus the worker's traceback)."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        name, _, message = last.partition(": ")
        return f"{name.rsplit('.', 1)[-1]}: {message} (in a DataLoader worker)"
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        tb, frame = err.__traceback__, None
        while tb is not None:  # the innermost Python frame names the operation (mkdir, open, rename...)
            frame, tb = tb.tb_frame, tb.tb_next
        operation = _OS_OPERATIONS.get(frame.f_code.co_name, "use") if frame is not None else "use"
        target = f"{err.filename} -> {err.filename2}" if err.filename2 else str(err.filename)
        return f"{type(err).__name__}: cannot {operation} {target}: {err.strerror}"
    return f"{type(err).__name__}: {' '.join(text.split()) if chr(10) in text else text}"
