"""What a person sees on the console: the project's own lines, not Ray's.

Ray's console output (Train's worker-group messages and per-report echoes, Ray Data's
execution plans and progress bars, every worker's stdout) goes to Ray's log files under
the session directory (``/tmp/ray/session_latest/logs``) unless ``--verbose``. What stays:

- one line per training epoch, said by rank 0 through a small "board" actor that the
  driver polls and prints (worker stdout no longer reaches the driver);
- scoring progress (users/s, ETA) from a counter on the same board: one line updated in
  place on a terminal, a plain line every ``PLAIN_EVERY_S`` otherwise;
- the flow's stage messages and timings (the ``bert4rec`` logger, INFO);
- warnings and errors.

A failed run prints one line naming the stage and the path (``failure_line``); its
traceback goes to the job's log, or to a file whose path that line gives.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import sys
import tempfile
import threading
import time
import traceback
import warnings

log = logging.getLogger("bert4rec")

BOARD = "bert4rec-console"  # the board actor's name, in the job's namespace
POLL_S = 1.0
PLAIN_EVERY_S = 10.0


# ---------------------------------------------------------------------------------------
# logging and Ray's knobs


class StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not the stream of the
    moment the handler was made (which may since have been replaced and closed)."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(verbose: bool) -> None:
    """The driver's logging: the project's INFO lines on stderr; Ray's loggers at WARNING
    unless ``verbose``."""
    global _verbose
    _verbose = verbose
    root = logging.getLogger()
    if not root.handlers:
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.WARNING)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in ("ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)
    # a failed dataset logs ERROR lines of its own; the run reports the failure in its one line
    logging.getLogger("ray.data").setLevel(logging.NOTSET if verbose else logging.CRITICAL)
    if not verbose:
        # counted on the read's block estimate, before the pipelines' own split into
        # batch-sized blocks that gives every actor its share: not true of our pipelines
        warnings.filterwarnings("ignore", message="The minimum number of concurrent actors", category=UserWarning)
    # that the cluster uses token authentication is the cluster's set-up, said on every start
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.NOTSET if verbose else logging.ERROR)
    if not verbose:
        # Ray's deprecation notices address Ray's API users, not whoever runs the job
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray(\.|$)")


def ray_init_kwargs(verbose: bool) -> dict:
    """``ray.init`` arguments: without ``verbose``, workers' stdout/stderr stay in Ray's log
    files (the epoch lines come through the board instead)."""
    return {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.WARNING}


def quiet_ray_data(verbose: bool) -> None:
    """Ray Data's execution plans and progress bars off, unless ``verbose``; our own progress
    line replaces them. Datasets capture this context when created, so it also reaches the
    coordinator actors that Ray Train's dataset splits run in."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose
    # Ray Data sets its loggers' levels when it is imported, after setup_logging ran
    # a failed dataset logs ERROR lines of its own; the run reports the failure in its one line
    logging.getLogger("ray.data").setLevel(logging.NOTSET if verbose else logging.CRITICAL)


# ---------------------------------------------------------------------------------------
# the board: workers say lines and count work; the driver prints


class _Board:
    def __init__(self):
        self.count = 0
        self.lines: list[str] = []

    def add(self, n: int) -> None:
        self.count += n

    def say(self, line: str) -> None:
        self.lines.append(line)

    def take(self) -> tuple[int, list[str]]:
        lines, self.lines = self.lines, []
        return self.count, lines


def board():
    """The driver's board actor, or None (a test's Ray, a worker of another driver)."""
    import ray

    if not ray.is_initialized():
        return None
    try:
        return ray.get_actor(BOARD)
    except ValueError:
        return None


def say(line: str) -> None:
    """Prints ``line`` on the driver's console; from any Ray worker of this job."""
    b = board()
    if b is not None:
        b.say.remote(line)
    else:
        print(line, file=sys.__stdout__ or sys.stdout, flush=True)


def progress_line(label: str, done: int, total: int, elapsed_s: float) -> str:
    """``scoring: 1,200/5,000 users (24%)  400 users/s  ETA 10s`` (pure)."""
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    pct = f" ({100 * done / total:.0f}%)" if total else ""
    eta = f"  ETA {format_seconds((total - done) / rate)}" if rate > 0 and total and done < total else ""
    return f"{label}: {done:,}/{total:,} users{pct}  {rate:,.0f} users/s{eta}  {format_seconds(elapsed_s)} elapsed"


def format_seconds(s: float) -> str:
    """``42s``, ``3m05s``, ``1h02m`` (pure)."""
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Console:
    """The driver's side of the board: a thread that prints what workers said and, while
    ``progress`` is open, a progress line."""

    def __init__(self, stream=None):
        import ray

        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.board = ray.remote(num_cpus=0)(_Board).options(name=BOARD, get_if_exists=True).remote()
        self._bar: tuple[str, int, float, int] | None = None  # label, total, start, count at start
        self._last_plain = 0.0
        self._open_line = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bert4rec-console", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def progress(self, label: str, total: int):
        count, _ = self._take(print_lines=True)
        self._bar, self._last_plain = (label, total, time.time(), count), time.time()
        try:
            yield
        finally:
            self._poll(final=True)
            self._bar = None
            self._end_line()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._take(print_lines=True)

    def _take(self, print_lines: bool) -> tuple[int, list[str]]:
        import ray

        try:
            count, lines = ray.get(self.board.take.remote(), timeout=10)
        except Exception:  # the console never fails a run
            return 0, []
        if print_lines:
            for line in lines:
                self._end_line()
                print(line, file=self.stream, flush=True)
        return count, lines

    def _end_line(self) -> None:
        if self._open_line:
            print(file=self.stream, flush=True)
            self._open_line = False

    def _poll(self, final: bool = False) -> None:
        """Prints what workers said and the progress line: in place on a terminal; otherwise
        a plain line every PLAIN_EVERY_S, and always the last one (the totals and the rate)."""
        count, _ = self._take(print_lines=True)
        if self._bar is None:
            return
        label, total, start, base = self._bar
        now = time.time()
        line = progress_line(label, count - base, total, now - start)
        if self.tty:
            print("\r" + line + "\x1b[K", end="", file=self.stream, flush=True)
            self._open_line = True
        elif final or now - self._last_plain >= PLAIN_EVERY_S:
            print(line, file=self.stream, flush=True)
            self._last_plain = now

    def _loop(self) -> None:
        while not self._stop.wait(POLL_S):
            self._poll()


_console: Console | None = None


def stop() -> None:
    """Prints what is left on the board and stops the console's thread."""
    global _console
    if _console is not None:
        _console.close()
        _console = None


_verbose = False


def ensure_ray(**resources) -> None:
    """Joins the cluster this process runs in (a Ray job, ``RAY_ADDRESS``), else starts a
    local one (``resources``: its ``ray.init`` sizes, e.g. ``num_cpus``), with Ray's own
    console output quiet unless ``setup_logging(verbose=True)`` ran; then the console that
    prints what workers say. Every command calls it once its own checks of the input have
    passed, so that bad input is refused without starting Ray. A Ray that is already running
    (a test's, a notebook's) is used as it is."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), **resources, **ray_init_kwargs(_verbose))
        start()
    quiet_ray_data(_verbose)


def start() -> Console:
    """Starts (once per driver) the console that prints what workers say."""
    global _console
    if _console is None:
        _console = Console()
    return _console


@contextlib.contextmanager
def progress(label: str, total: int):
    """A progress line for ``total`` users while the block runs (nothing without a console)."""
    if _console is None:
        yield
    else:
        with _console.progress(label, total):
            yield


# ---------------------------------------------------------------------------------------
# stages and failures


@contextlib.contextmanager
def stage(name: str, timings: dict[str, float]):
    """Times the block into ``timings[name + "_s"]``; an exception leaving it carries the
    stage's name (``stage_of``)."""
    t = time.time()
    try:
        yield
    except BaseException as e:
        if stage_of(e) is None:
            e.add_note(f"{_STAGE_NOTE}{name}")
        raise
    finally:
        timings[f"{name}_s"] = time.time() - t


_STAGE_NOTE = "bert4rec stage: "


def stage_of(e: BaseException) -> str | None:
    """The stage an exception left (set by ``stage``), or None."""
    for note in getattr(e, "__notes__", ()):
        if note.startswith(_STAGE_NOTE):
            return note[len(_STAGE_NOTE) :]
    return None


def _chain(e: BaseException) -> list[BaseException]:
    out, seen = [], set()
    while e is not None and id(e) not in seen:
        out.append(e)
        seen.add(id(e))
        # Ray's task errors keep the original exception in .cause
        e = e.__cause__ or getattr(e, "cause", None) or (None if e.__suppress_context__ else e.__context__)
    return out


def failure_line(command: str, e: BaseException, traceback_path: str | None = None) -> str:
    """The one line a failed run prints (pure): the stage, the exception, the path an
    OSError was about, where its traceback is."""
    msg = str(e).strip().splitlines()
    text = msg[-1] if msg else repr(e)
    paths = [x.filename for x in _chain(e) if isinstance(x, OSError) and x.filename]
    path = next((str(p) for p in paths if str(p) not in text), None)
    where = f" in stage {stage_of(e)}" if stage_of(e) else ""
    line = f"bert4rec {command}: failed{where}: {type(e).__name__}: {text}"
    if path:
        line += f" (path: {path})"
    if traceback_path:
        line += f" (traceback: {traceback_path})"
    return line


def write_traceback(command: str, e: BaseException, directory: str | None = None) -> str | None:
    """Writes ``e``'s traceback to a file under ``directory`` (default: the temp dir's
    ``bert4rec-logs``); returns its path, or None when it cannot be written."""
    directory = directory or os.path.join(tempfile.gettempdir(), "bert4rec-logs")
    stamp = dt.datetime.now().strftime("%Y%m%dT%H%M%S")
    path = os.path.join(directory, f"{command}-{stamp}-{os.getpid()}.log")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(path, "w") as f:
            f.write("".join(traceback.format_exception(e)))
    except OSError:
        return None
    return path


# ---------------------------------------------------------------------------------------
# the result, at the end


def _scalars(obj: dict, prefix: str = "", depth: int = 2) -> list[str]:
    lines = []
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            if depth > 1:
                lines += _scalars(value, name + ".", depth - 1)
        elif isinstance(value, float):
            lines.append(f"{name}: {value:.4f}")
        elif value is None or isinstance(value, (str, int, bool)):
            lines.append(f"{name}: {value}")
    return lines


def summary(command: str, result: dict, out: str | None = None) -> list[str]:
    """What a finished command prints: a few lines a person reads (``--json`` prints the
    whole result instead). For ``nightly``, where the table and its report are; for the
    others, the result's figures (numbers and strings, two levels deep; no lists)."""
    if command != "nightly":
        return _scalars(result)
    lines = [f"{result.get('date')}: {result.get('status')}"]
    table, test = result.get("table") or {}, result.get("test") or {}
    where = out.rstrip("/") + "/" if out else ""
    if table.get("path"):
        lines.append(f"table: {where}{table['path']} ({table.get('rows')} users, model {table.get('model_version')})")
        lines.append(f"report: {where}{table['path']}/_report/report.md")
    if test.get("ndcg@10") is not None:
        pop = (test.get("popularity") or {}).get("ndcg@10")
        lines.append(f"test NDCG@10: {test['ndcg@10']:.4f}" + (f" (most popular: {pop:.4f})" if pop is not None else ""))
    if result.get("latest"):
        lines.append(f"latest: {result['latest']}")
    return lines
