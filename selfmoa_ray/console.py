"""What reaches the user's terminal during a run, and what goes to ``<run>/logs/run.log`` instead.

By default the terminal shows one line per finished stage, a live progress bar of the running
stage (on a TTY only) and errors; Ray's own logs and its workers' output go to the run's log file.
The redirect works on file descriptors 1 and 2 (``os.dup2``), not on ``sys.stdout``: Ray's C++ core
writes to fd 2 directly, and worker output forwarded by ``log_to_driver`` is printed to whatever
``sys.stdout``/``sys.stderr`` are, so only the descriptors catch all of it. The console keeps
duplicates of the terminal's descriptors and writes our own lines there (and to the log, so the log
holds the whole story). ``--verbose`` or ``SELFMOA_VERBOSE=1`` redirects nothing: everything reaches
the terminal as it comes, Ray Data's progress included; our lines still go to the log too.

A Ray worker (a Ray Train worker, say) moves a driver-side bar through :func:`remote_progress`,
whose :class:`ProgressChannel` is picklable.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

LOG_FILE = "logs/run.log"  # run-relative
VERBOSE_ENV = "SELFMOA_VERBOSE"
MAX_LINE = 160  # a stage line's cap when the terminal's width is unknown (CI logs, pipes)


@dataclass
class Console:
    """Where our own output goes: ``out`` (lines), ``err`` (bars, failures), ``log`` (a copy).

    ``live``: progress bars are drawn (a quiet session on a terminal); elsewhere they stay silent,
    so a pipe or a CI log gets no bar frames and no Ray progress.
    """

    out: TextIO
    err: TextIO
    log: TextIO | None = None
    live: bool = False
    log_path: Path | None = None

    def line(self, text: str) -> None:
        """One line (or a few) of our own, on the terminal and in the log."""
        with tqdm.external_write_mode(file=self.err):  # lift a live bar out of the way
            self.out.write(text + "\n")
            self.out.flush()
        if self.log is not None:
            self.log.write(text + "\n")
            self.log.flush()

    def width(self) -> int:
        """The terminal's width when ``out`` is one, else :data:`MAX_LINE`."""
        if _isatty(self.out):
            return min(MAX_LINE, shutil.get_terminal_size((MAX_LINE, 24)).columns)
        return MAX_LINE

    def bar(self, desc: str, total: int | None = None, *, unit: str = "row") -> tqdm:
        """A tqdm bar on the terminal; disabled unless the console is ``live``."""
        return tqdm(
            total=total, desc=desc, unit=unit, file=self.err, disable=not self.live, leave=False,
            mininterval=0.5,
        )  # fmt: skip


_active: Console | None = None


def current() -> Console:
    """The console of the running session, or one on the current ``sys`` streams (no bars)."""
    return _active or Console(out=sys.stdout, err=sys.stderr)


@contextlib.contextmanager
def using(console: Console) -> Iterator[Console]:
    """Make ``console`` the current one for the block (sessions do; so can tests)."""
    global _active
    before, _active = _active, console
    try:
        yield console
    finally:
        _active = before


def verbose_from_env() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def fit(text: str, width: int | None = None) -> str:
    """``text`` cut to ``width`` characters (default: the console's), with an ellipsis."""
    width = width or current().width()
    return text if len(text) <= width else text[: width - 1] + "…"


@contextlib.contextmanager
def session(root: str | os.PathLike[str], *, verbose: bool | None = None) -> Iterator[Console]:
    """Route the process's output for one run: fds 1 and 2 to ``<root>/logs/run.log`` (appended)
    and our own lines to the terminal, until the block ends; then restore the descriptors.

    An error leaving the block is written to the log, then propagates with the terminal restored,
    so its message (or traceback) reaches the user in full; so does ``KeyboardInterrupt``.
    ``verbose`` (default: ``$SELFMOA_VERBOSE``) keeps everything on the terminal.
    """
    if _active is not None:  # a nested run (compare runs recipes) shares the outer session
        yield _active
        return
    verbose = verbose_from_env() if verbose is None else verbose
    path = Path(root) / LOG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed in finally
    log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} selfmoa {' '.join(sys.argv[1:])}\n")
    redirect = None if verbose else _Redirect.start(log)
    if redirect is None:
        console = Console(out=sys.stdout, err=sys.stderr, log=log, log_path=path)
    else:
        console = Console(out=redirect.out, err=redirect.err, log=log, log_path=path,
                          live=_isatty(redirect.err))  # fmt: skip
        console.line(f"log: {path} (Ray's output; --verbose shows it here)")
    progress = _quiet_ray_data() if redirect is not None else contextlib.nullcontext()
    try:
        with using(console), progress:
            yield console
    except BaseException as err:
        log.write(traceback.format_exc())
        if redirect is not None:
            console.err.write(f"selfmoa: {type(err).__name__}; the run's full output: {path}\n")
        raise
    finally:
        if redirect is not None:
            redirect.stop()
        log.close()


@dataclass
class _Redirect:
    """fds 1 and 2 pointed at the log; ``out``/``err`` write to the saved terminal descriptors."""

    saved: tuple[int, int]
    out: TextIO
    err: TextIO

    @classmethod
    def start(cls, log: TextIO) -> _Redirect | None:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        try:
            saved = (os.dup(1), os.dup(2))
        except OSError:  # no descriptors to save (a closed stdout): leave everything as it is
            return None
        out, err = (
            open(fd, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
            for fd in saved
        )
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        return cls(saved, out, err)

    def stop(self) -> None:
        for stream in (sys.stdout, sys.stderr, self.out, self.err):
            with contextlib.suppress(Exception):
                stream.flush()
        for fd, saved in zip((1, 2), self.saved, strict=True):
            os.dup2(saved, fd)
            os.close(saved)
        self.out.close()
        self.err.close()


@contextlib.contextmanager
def _quiet_ray_data() -> Iterator[None]:
    """No Ray Data progress while quiet: off a terminal (our redirect) Ray logs a progress report
    of every operator every 10 s (ray/data/_internal/progress/__init__.py), ~770 lines a demo."""
    from ray.data import DataContext

    context = DataContext.get_current()
    before = context.enable_progress_bars
    context.enable_progress_bars = False
    try:
        yield
    finally:
        context.enable_progress_bars = before


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# --------------------------------------------------------------------------- progress


@contextlib.contextmanager
def row_progress(
    desc: str, total: int | None = None, *, tokens: bool = False
) -> Iterator[Callable[[Any], None]]:
    """A bar over rows; yields ``advance(table)`` to call with each Arrow batch as it lands.

    ``tokens``: also show generated tokens per second, from the batches' ``response_tokens``.
    """
    bar = current().bar(desc, total)
    generated = 0

    def advance(batch: Any) -> None:
        nonlocal generated
        if bar.disable:
            return
        if tokens and "response_tokens" in batch.column_names:
            generated += sum(v or 0 for v in batch.column("response_tokens").to_pylist())
            elapsed = bar.format_dict["elapsed"]
            if elapsed > 0.5:
                bar.set_postfix_str(f"{generated / elapsed:.1f} tok/s", refresh=False)
        bar.update(batch.num_rows)

    try:
        yield advance
        bar.refresh()  # the last frame, whatever mininterval held back
    finally:
        bar.close()


class ProgressChannel:
    """A picklable handle through which Ray workers move a bar drawn by the driver.

    Made by :func:`remote_progress`; pass it to the workers (a task argument, an actor's
    constructor, Ray Train's ``train_loop_config``). Reports are absolute, so a restarted worker
    that reports an earlier step moves the bar back rather than past its total.
    """

    def __init__(self, queue: Any):
        self._queue = queue  # a ray.util.queue.Queue: an actor, so any node can reach it

    def report(self, done: int, total: int | None = None, **postfix: Any) -> None:
        """``done`` units of ``total`` so far; ``postfix`` (e.g. ``loss=0.41``) shown beside."""
        with contextlib.suppress(Exception):  # progress must never fail the work it reports on
            self._queue.put_nowait((int(done), total, postfix))


@contextlib.contextmanager
def remote_progress(
    desc: str, total: int | None = None, *, unit: str = "step", poll_s: float = 0.5
) -> Iterator[ProgressChannel | None]:
    """A driver-side bar that Ray workers advance through the yielded :class:`ProgressChannel`.

    Yields None when no bar is drawn (not a live console): no queue actor is started then, and
    workers skip reporting. A driver thread drains the queue every ``poll_s`` into the bar.
    """
    console = current()
    if not console.live:
        yield None
        return
    from ray.util.queue import Queue

    queue = Queue(actor_options={"num_cpus": 0})  # it must not take a CPU the work needs
    bar = console.bar(desc, total, unit=unit)
    stop = threading.Event()

    def drain() -> None:
        while True:
            try:
                items = queue.get_nowait_batch(queue.qsize())
            except Exception:  # Ray shut down: nothing more will come
                return
            for done, new_total, postfix in items:
                if new_total is not None and new_total != bar.total:
                    bar.total = new_total
                if postfix:
                    bar.set_postfix(postfix, refresh=False)
                bar.update(done - bar.n)
            if stop.is_set():
                return
            stop.wait(poll_s)

    thread = threading.Thread(target=drain, name="selfmoa-progress", daemon=True)
    thread.start()
    try:
        yield ProgressChannel(queue)
    finally:
        stop.set()
        thread.join(timeout=10)  # its last pass drains what the workers reported last
        bar.refresh()
        bar.close()
        with contextlib.suppress(Exception):
            queue.shutdown(force=True)
