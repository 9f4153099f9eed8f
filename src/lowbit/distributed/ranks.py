"""What each rank does around the run: its own log file, one console (rank 0's), and one error line for a failure.

A rank that raises logs its traceback to its own file, leaves a one-line note next to it and exits; the others
notice at their next collective (the peer's connection closes, or the collective times out) or are stopped by the
launcher. Rank 0 then prints one `error:` line naming the rank that failed first and its log.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

from lowbit.distributed.group import Group
from lowbit.errors import LowbitError, first_line

log = logging.getLogger(__name__)

LOG_DIR = "logs"  # inside the run's work directory
_NOTICE_SECONDS = 3.0  # how long rank 0 waits for another rank's note after its own collective failed


def rank_log(log_dir: Path, rank: int) -> Path:
    return log_dir / f"rank-{rank}.log"


def _note(log_dir: Path, rank: int) -> Path:
    return log_dir / f"rank-{rank}.error"


@contextlib.contextmanager
def rank_logging(group: Group, log_dir: Path, level: int) -> Iterator[Path]:
    """Send this rank's log records to its own file; on any rank but 0 the console handlers are silenced and what
    libraries write to stdout/stderr (progress bars of transformers, warnings) goes to the file too."""
    log_dir.mkdir(parents=True, exist_ok=True)
    _note(log_dir, group.rank).unlink(missing_ok=True)
    path = rank_log(log_dir, group.rank)
    handler = logging.FileHandler(path, mode="a")
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter(f"%(asctime)s rank {group.rank} %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    consoles = [h for h in root.handlers if type(h) is logging.StreamHandler]  # basicConfig's (not files)
    levels = [h.level for h in consoles]
    if not group.is_main:
        for console in consoles:
            console.setLevel(logging.CRITICAL + 1)
    root.addHandler(handler)
    try:
        with contextlib.ExitStack() as streams:
            if not group.is_main:
                streams.enter_context(contextlib.redirect_stderr(handler.stream))
                streams.enter_context(contextlib.redirect_stdout(handler.stream))
            log.info("rank %d of %d (%s, local rank %d)", group.rank, group.world_size, group.backend,
                     group.local_rank)  # fmt: skip
            yield path
    finally:
        root.removeHandler(handler)
        handler.close()
        for console, old in zip(consoles, levels, strict=True):
            console.setLevel(old)


def _first_failure(group: Group, log_dir: Path) -> tuple[int, str] | None:
    """The lowest other rank that left a failure note, with its message (waiting a moment for it to appear)."""
    deadline = time.monotonic() + _NOTICE_SECONDS
    while True:
        for rank in range(group.world_size):
            note = _note(log_dir, rank)
            if rank != group.rank and note.is_file():
                return rank, note.read_text().strip()
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)


class RankFailed(LowbitError):
    """A rank of a data-parallel run failed: what rank 0 reports (exit status 1, as for a crash, not 2)."""

    exit_status = 1


def _report(group: Group, log_dir: Path, error: BaseException) -> BaseException | None:
    """Log the failure to this rank's file and leave the note; on rank 0, the exception whose one line the CLI
    prints (the user's own error, an interrupt, or the first failed rank with its log). The launcher's stop signal
    is ignored meanwhile: this rank is ending anyway, and its note must get out."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    user = isinstance(error, LowbitError)
    interrupt = isinstance(error, KeyboardInterrupt)
    message = "interrupted" if interrupt else str(error) if user else f"{type(error).__name__}: {first_line(error)}"
    with contextlib.suppress(OSError), rank_log(log_dir, group.rank).open("a") as file:
        file.write(f"rank {group.rank} failed: {message}\n")
        if not user and not interrupt:
            traceback.print_exception(error, file=file)
    with contextlib.suppress(OSError):
        _note(log_dir, group.rank).write_text(message + "\n")
    if not group.is_main:
        return None
    other = None if user else _first_failure(group, log_dir)
    if other is not None:
        rank, text = other
        return RankFailed(f"rank {rank} failed: {text} (its log: {rank_log(log_dir, rank)})")
    if user:
        return error
    if interrupt:
        return KeyboardInterrupt(
            f"stopped by the user or by the launcher (a rank that dies without a word, killed or out of memory, "
            f"ends the others so; the ranks' logs: {log_dir})"
        )
    lowered = message.lower()
    if "timed out" in lowered or "timeout" in lowered:
        return RankFailed(
            f"rank 0 waited {group.timeout_s:g}s (--dist-timeout) at a collective: another rank stopped answering "
            f"(the ranks' logs: {log_dir})"
        )
    if "closed by peer" in lowered or "connection reset" in lowered:
        return RankFailed(f"another rank died without a word (killed, or out of memory?) (the ranks' logs: {log_dir})")
    return RankFailed(f"rank 0 failed: {message} (its log: {rank_log(log_dir, 0)})")


def run_rank(group: Group, log_dir: Path, level: int, work: Callable[[], int]) -> int:
    """Run `work` as this rank with its own log. A failure on another rank is an exit status 1 (it reports
    nothing); rank 0 raises the one error for the CLI to print (a `LowbitError`, or KeyboardInterrupt). After a
    success rank 0 removes the logs (no rank waits for another at the end: rank 0 may write the export for longer
    than a collective's timeout, and a rank still writing its last lines writes them to a removed file)."""
    with rank_logging(group, log_dir, level):
        try:
            status = work()
        except BaseException as error:  # noqa: BLE001 - every failure of a rank is reported the same way
            reported = _report(group, log_dir, error)
            if reported is None:
                return 2 if isinstance(error, LowbitError) else 1
            if reported is error:
                raise
            raise reported from None
        group.close()  # after a failure the process ends instead: leaving a broken group can block
    if group.is_main and status == 0:
        shutil.rmtree(log_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            log_dir.parent.rmdir()  # the work directory, if nothing else is left in it
    return status
