"""A few long-lived worker processes that run math-verify (sympy) under a hard wall-clock bound per pair.

Why this file exists: math-verify's own SIGALRM timeout only works on the main thread and cannot interrupt
sympy inside C code (`10^{10^{10}}`); killing a process always works. `reasoning.verifiers.math_equal_batch`
hands the pairs its cheap in-process checks could not decide to `get_pool().run(jobs, timeout_s)`: each job goes
to a ready worker, and a worker that overruns its deadline is killed and replaced (the pair is then False).

The workers (DEFAULT_WORKERS, forkserver context preloaded with sympy, so a replacement is forked warm) live
for the whole process and are killed at exit. Their start-up is not charged to any pair (`warm_up_grader()`
gets it out of the way). The bound is wall-clock, so on a badly overloaded CPU a slow but legitimate
comparison can time out and grade False: evaluation may pass a larger `timeout` than the RL loop does.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import multiprocessing
import os
import sys
import threading
import time
import types
from collections import deque
from multiprocessing.connection import wait as wait_for_connections

logger = logging.getLogger(__name__)

WORKER_STARTUP_S = 60.0      # waiting for a (re)started worker is not charged to the per-pair timeout
# Four workers even on small machines: idle ones cost only memory, and a killed worker's replacement needs
# ~1 s to warm up, so back-to-back timeouts still find a ready worker.
DEFAULT_WORKERS = 4
# If the parent dies mid-job nobody is left to kill a worker stuck in sympy; the kernel ends it after this much CPU.
ORPHAN_CPU_BUDGET_S = float(os.environ.get("REASONING_GRADER_ORPHAN_CPU_S", "60"))


# ------------------------------------------------------------------------ math-verify in a worker process

def _math_verify_equal(gold: str, pred: str, timeout_s: float) -> bool:
    """The sympy-backed comparison (runs inside a worker's main thread, so its SIGALRM guard works too)."""
    from math_verify import LatexExtractionConfig, parse, verify

    # LaTeX only: the plain-text extractor would pull any number out of an unparsable prediction
    # ("5 \\foo 6" → 5), a free second guess. Plain math such as "1/2" parses as LaTeX anyway.
    config = [LatexExtractionConfig()]
    alarm_s = max(1, math.ceil(timeout_s))
    parsed_gold = parse(f"${gold}$", extraction_config=config, parsing_timeout=alarm_s)
    parsed_pred = parse(f"${pred}$", extraction_config=config, parsing_timeout=alarm_s)
    if not parsed_gold or not parsed_pred:
        return False
    return bool(verify(parsed_gold, parsed_pred, timeout_seconds=alarm_s))


_WARM_UP_PAIRS = (("\\frac{x}{2}+\\sqrt{3}", "\\sqrt{3}+x/2"), ("\\cot x", "\\frac{\\cos x}{\\sin x}"),
                  ("(\\frac{3}{5},2]", "(0.6,2]"))


def _arm_cpu_limit(budget_s: float) -> None:
    """RLIMIT_CPU counts the whole process, so re-arm it before every job: this job may burn budget_s more."""
    try:
        import resource

        used = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
        hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
        resource.setrlimit(resource.RLIMIT_CPU, (math.ceil(used + budget_s), hard))
    except (ImportError, ValueError, OSError):  # not POSIX, or a finite hard limit below the target
        pass


def _worker_main(conn) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business; it kills us at exit
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # SIGXCPU (see _arm_cpu_limit) must not dump core
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    # First uses compile math-verify's regexes and load sympy's lazy modules (~1 s in all): pay that before
    # announcing readiness so that it is never charged to a job's deadline.
    for gold, pred in _WARM_UP_PAIRS:
        _math_verify_equal(gold, pred, 5.0)
    conn.send("ready")
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):  # parent gone
            return
        if job is None:
            return
        gold, pred, timeout_s = job
        _arm_cpu_limit(ORPHAN_CPU_BUDGET_S)
        try:
            result = _math_verify_equal(gold, pred, timeout_s)
        except BaseException:  # math-verify's TimeoutException is a BaseException
            result = False
        conn.send(result)


class _Worker:
    def __init__(self, ctx):
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child_conn,), daemon=True, name="grader")
        with _start_lock, _main_module_hidden():  # the lock: concurrent swaps of __main__ would lose it
            self.process.start()
        child_conn.close()
        self.ready = False
        self.started_at = time.monotonic()

    def check_ready(self, timeout: float = 0.0) -> bool:
        """Consume the start-up message if it has arrived. Raises EOFError if the worker died."""
        if not self.ready and self.conn.poll(timeout):
            self.ready = self.conn.recv() == "ready"
        return self.ready

    def kill(self) -> None:
        try:
            self.process.kill()
            self.process.join(timeout=5)
            self.conn.close()
        except Exception:
            pass


_start_lock = threading.Lock()


@contextlib.contextmanager
def _main_module_hidden():
    """Workers need nothing from __main__, but spawn/forkserver children re-import the caller's script unless
    told otherwise (slow, and it re-runs unguarded top-level code). Hide it while a worker is being started."""
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _mp_context():
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        # Workers fork from a server that already imported sympy and math-verify: a replacement skips that
        # ~1-2 s and only pays its warm-up (_WARM_UP_PAIRS, ~0.5-1 s).
        ctx.set_forkserver_preload(["math_verify", __name__])
        return ctx
    return multiprocessing.get_context("spawn")


class GraderPool:
    """A few long-lived worker processes; a job that overruns its deadline gets its worker killed and replaced."""

    def __init__(self, num_workers: int):
        self._ctx = _mp_context()
        self._cond = threading.Condition()
        self._idle: list[_Worker] = [_Worker(self._ctx) for _ in range(num_workers)]
        self._all: set[_Worker] = set(self._idle)
        self.owner_pid = os.getpid()  # a forked child must not talk to its parent's workers
        self.kills = 0

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        fresh = _Worker(self._ctx)
        with self._cond:  # re-entrant (Condition's default RLock): also called with it held
            self._all.discard(worker)
            self._all.add(fresh)
        return fresh

    def run(self, jobs: list[tuple[str, str]], timeout_s: float) -> list[bool]:
        with self._cond:
            if not self._cond.wait_for(lambda: self._idle, timeout=WORKER_STARTUP_S):
                logger.warning("verifier: no grader worker free for %.0f s; grading False", WORKER_STARTUP_S)
                return [False] * len(jobs)
            for i, worker in enumerate(self._idle):
                try:
                    alive = worker.process.is_alive()
                    if alive:
                        worker.check_ready()
                except (EOFError, OSError):
                    alive = False
                if not alive:  # died while idle (OOM killer, a stray signal): start its replacement now
                    self._idle[i] = self._replace(worker)
            self._idle.sort(key=lambda w: not w.ready)  # ready workers first
            take = min(len(jobs), len(self._idle))
            workers, self._idle = self._idle[:take], self._idle[take:]
        results = [False] * len(jobs)
        pending = deque(range(len(jobs)))
        busy: dict[_Worker, tuple[int, float]] = {}
        try:
            while pending or busy:
                for i, worker in enumerate(workers):
                    if worker.ready and worker not in busy and pending:
                        index = pending.popleft()
                        try:
                            worker.conn.send((*jobs[index], timeout_s))
                        except (OSError, ValueError):  # it died while idle: requeue the job on a fresh worker
                            pending.appendleft(index)
                            workers[i] = self._replace(worker)
                            continue
                        busy[worker] = (index, time.monotonic() + timeout_s)
                starting = [w for w in workers if not w.ready]
                now = time.monotonic()
                deadlines = [d for _, d in busy.values()] + [w.started_at + WORKER_STARTUP_S for w in starting]
                readable = wait_for_connections([w.conn for w in busy] + [w.conn for w in starting],
                                                timeout=max(0.0, min(deadlines) - now))
                for i, worker in enumerate(list(workers)):
                    if worker.conn in readable:
                        try:
                            message = worker.conn.recv()
                        except (EOFError, OSError):  # the worker crashed (segfault, OOM kill)
                            message = None
                        if message == "ready":
                            worker.ready = True
                            continue
                        if worker in busy:
                            results[busy.pop(worker)[0]] = message is True
                        if message is None:
                            workers[i] = self._replace(worker)
                    elif worker in busy and time.monotonic() >= busy[worker][1]:
                        busy.pop(worker)
                        self.kills += 1
                        workers[i] = self._replace(worker)
                    elif not worker.ready and time.monotonic() >= worker.started_at + WORKER_STARTUP_S:
                        logger.warning("verifier: grader worker did not start; restarting it")
                        workers[i] = self._replace(worker)
        except Exception:
            logger.exception("verifier: grader pool failure; remaining pairs graded False")
            for worker in list(busy):
                workers[workers.index(worker)] = self._replace(worker)
        finally:
            with self._cond:
                self._idle.extend(workers)
                self._cond.notify_all()
        return results

    def wait_ready(self) -> None:
        """Block until every idle worker has finished starting (bounded by WORKER_STARTUP_S)."""
        deadline = time.monotonic() + WORKER_STARTUP_S
        with self._cond:
            workers, self._idle = self._idle, []
        try:
            for i, worker in enumerate(workers):
                try:
                    worker.check_ready(timeout=max(0.0, deadline - time.monotonic()))
                except (EOFError, OSError):
                    workers[i] = self._replace(worker)
        finally:
            with self._cond:
                self._idle.extend(workers)
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            workers, self._idle = list(self._all), []
            self._all = set()
        for worker in workers:
            worker.kill()


_pool: GraderPool | None = None
_pool_lock = threading.Lock()


def get_pool() -> GraderPool:
    """This process's pool, started on first use (a forked child starts its own)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool.owner_pid != os.getpid():
            _pool = GraderPool(int(os.environ.get("REASONING_GRADER_WORKERS", DEFAULT_WORKERS)))
        return _pool


@atexit.register
def shutdown_grader() -> None:
    """Kill the grader workers (also runs at interpreter exit); the next call starts new ones."""
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is not None and pool.owner_pid == os.getpid():  # never the workers of the process we forked from
        pool.close()


def warm_up_grader() -> None:
    """Start the workers and wait until they are ready (the first grading otherwise pays ~1-3 s of start-up;
    worker start-up is never charged to a pair's timeout, but a caller may want it out of the way)."""
    get_pool().wait_ready()
