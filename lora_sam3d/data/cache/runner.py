"""Running one job per case in a process pool: a progress bar, Ctrl-C and SIGTERM stop the build cleanly
(finished entries stay), and failed cases are reported together (`check_failed`)."""

from __future__ import annotations

import contextlib
import os
import signal
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lora_sam3d.data.cases import Case
from lora_sam3d.data.nifti import DataError

__all__ = ["BuildInterrupted", "check_failed", "each_case"]


class BuildInterrupted(KeyboardInterrupt):
    """A build stopped by Ctrl-C (SIGINT) or SIGTERM: the queued cases were cancelled, the running
    ones stopped (their temporary folders removed), the finished entries kept."""

    def __init__(self, finished: int, total: int, what: str) -> None:
        super().__init__(f"{what}: {finished} of {total} finished before the interrupt")
        self.finished, self.total, self.what = finished, total, what


_BUSY = False
"""In a build worker process: a case is being built (SIGINT then stops it; an idle worker ignores it)."""


def _stop_build(signum: int, frame: Any) -> None:
    global _BUSY
    if _BUSY:
        _BUSY = False  # one interrupt per case: a second one must not cut the clean-up short
        raise KeyboardInterrupt


def _worker_init() -> None:
    signal.signal(signal.SIGINT, _stop_build)


def _run_job(fn: Callable[..., Path], case: Case, *args: Any) -> Path:
    global _BUSY
    _BUSY = True
    try:
        return fn(case, *args)
    finally:
        _BUSY = False


def _in_processes(
    jobs: Sequence[tuple[Case, Callable[..., Path], tuple[Any, ...]]],
    workers: int,
    done: Callable[[Case, Path | BaseException], None],
) -> None:
    """The jobs in ``workers`` spawned processes, at most one queued per free worker, so an interrupt
    leaves nothing queued: the running builds get SIGINT and clean up, the pool then shuts down."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    spawn = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads
    pool = ProcessPoolExecutor(min(workers, len(jobs)), mp_context=spawn, initializer=_worker_init)
    todo, running = list(jobs), {}
    try:
        while todo or running:
            while todo and len(running) < workers:
                case, fn, args = todo.pop(0)
                # a worker may be spawned here: it inherits an ignored SIGINT (Python keeps it so while
                # it starts), so a Ctrl-C cannot kill it mid-import; `_worker_init` sets its handler
                with _signal_handled(signal.SIGINT, signal.SIG_IGN):
                    running[pool.submit(_run_job, fn, case, *args)] = case
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                done(running.pop(future), future.exception() or future.result())
    except BaseException:
        for process in list(getattr(pool, "_processes", {}).values()):
            with contextlib.suppress(OSError):
                os.kill(process.pid, signal.SIGINT)  # SIGTERM reached us alone; Ctrl-C reached all
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def each_case(
    jobs: Sequence[tuple[Case, Callable[..., Path], tuple[Any, ...]]],
    description: str,
    workers: int,
    progress: bool,
) -> tuple[dict[str, Path], dict[str, str]]:
    """Run ``fn(case, *args)`` for each job, ``workers`` processes at once when there is more than
    one; ``progress`` shows a bar with the time left and a line per failed case. Returns (case id ->
    result, case id -> why it failed): a case whose files are bad (`DataError`: unreadable, another
    grid, ...) fails alone; any other error (a full disk, a read-only cache folder) stops the build;
    Ctrl-C or SIGTERM stops it too, as `BuildInterrupted`. Memory: one case per process."""
    results: dict[str, Path] = {}
    failed: dict[str, str] = {}
    bar = _progress() if progress and jobs else contextlib.nullcontext()
    with _signal_handled(signal.SIGTERM, _interrupt), bar as shown:
        task = shown.add_task(description, total=len(jobs)) if shown else None

        def done(case: Case, result: Path | BaseException) -> None:
            if isinstance(result, DataError):
                failed[case.case_id] = str(result)
                if shown:
                    shown.console.print(
                        f"[red]failed[/red] {case.case_id}: {result}", highlight=False, soft_wrap=True
                    )
            elif isinstance(result, BaseException):
                raise result
            else:
                results[case.case_id] = result
            if shown:
                shown.advance(task)

        try:
            if workers > 1 and len(jobs) > 1:
                _in_processes(jobs, workers, done)
            else:
                for case, fn, args in jobs:
                    try:
                        done(case, fn(case, *args))
                    except DataError as err:
                        done(case, err)
        except KeyboardInterrupt:
            raise BuildInterrupted(len(results) + len(failed), len(jobs), description) from None
    return results, failed


@contextlib.contextmanager
def _signal_handled(signum: int, handler: Any) -> Any:
    """``handler`` for ``signum`` inside the block, in the main thread (elsewhere Python cannot set one)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signum, handler)
    try:
        yield
    finally:
        signal.signal(signum, previous)


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM (a scheduler's stop, ``kill``) stops a build as Ctrl-C does."""
    raise KeyboardInterrupt


def _progress() -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
    )


def check_failed(failed: Mapping[str, str], n_cases: int, on_bad_case: str = "error") -> None:
    """Cases that could not be cached are an error naming each, or (``on_bad_case='skip'``) a warning
    that says which and how many are left out."""
    if not failed:
        return
    listed = "; ".join(f"{case}: {why}" for case, why in sorted(failed.items()))
    if on_bad_case != "skip":
        raise DataError(
            f"{len(failed)} of {n_cases} cases could not be cached: {listed} "
            "(set data.cases.on_bad_case: skip to go on without them)"
        )
    warnings.warn(
        f"{len(failed)} of {n_cases} cases could not be cached and are left out: {listed}", stacklevel=3
    )
