"""Background work for an interactive front end: one worker thread, keyed jobs, latest request wins.

A job belongs to a *slot* (what it is for, e.g. ``"estimate"`` of one browser session) and has a *key* (its
inputs). Submitting a new key to a slot supersedes the slot's older job: a job that has not started is dropped,
a running one is asked to stop (its :class:`Cancel` token is set; long computations poll it through their
progress callback, see :meth:`Cancel.progress`) and its result is discarded. So at most one stale job runs per
slot, and what a slot shows is always for its latest inputs. ``Runner.cancel(owner)`` stops every job of an
owner (a closed browser session) at once.

Background precomputations (:meth:`Runner.precompute`) run only while no foreground request is in flight
(:meth:`Runner.foreground`): on two cores a background k-means would otherwise halve the speed of what the
user is waiting for.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Callable

__all__ = ["Cancelled", "Cancel", "Runner"]


class Cancelled(Exception):
    """A job was superseded or its owner went away; its result is not wanted."""


class Cancel:
    """A job's stop flag. ``progress`` is an engine progress callback (``progress(stage, done, total)``) that raises
    :class:`Cancelled` once the flag is set, so a fold stops at its next group or step."""

    def __init__(self):
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    @property
    def is_set(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled()

    def progress(self, *_args) -> None:
        self.check()


class _Job:
    def __init__(self, slot: tuple, key, fn: Callable[[Cancel], object], lane: str):
        self.slot, self.key, self.fn, self.lane = slot, key, fn, lane
        self.cancel = Cancel()
        self.future: Future = Future()


class Runner:
    """Worker threads running keyed jobs, the latest per slot (see the module docstring): one thread per lane,
    ``"work"`` for what a user waits for and ``"background"`` for precomputations, so neither queues behind
    the other."""

    LANES = ("work", "background")

    def __init__(self, name: str = "foldviz-jobs", keep: int = 64):
        self._name, self._keep = name, keep
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: list[_Job] = []
        self._current: dict[tuple, _Job] = {}          # slot -> its latest job
        self._done: OrderedDict = OrderedDict()         # (slot, key) -> finished future (latest results)
        self._threads: dict[str, threading.Thread] = {}
        self._foreground = 0
        self._idle = threading.Condition(threading.Lock())
        self.started = 0                                # jobs begun (a measure for tests and benchmarks)

    # ---- submitting ---------------------------------------------------------------------------------------
    def submit(self, slot: tuple, key, fn: Callable[[Cancel], object], lane: str = "work") -> Future:
        """Run ``fn(cancel)`` for ``key`` in ``slot``, superseding the slot's older job; a finished or queued job
        with the same key is reused."""
        if lane not in self.LANES:
            raise ValueError(f"unknown lane {lane!r}; choose one of {self.LANES}")
        with self._lock:
            done = self._done.get((slot, key))
            if done is not None:
                self._done.move_to_end((slot, key))
                return done
            cur = self._current.get(slot)
            if cur is not None and cur.key == key and not cur.cancel.is_set:
                return cur.future
            if cur is not None:
                cur.cancel.set()
                if cur in self._queue:
                    self._queue.remove(cur)
                    cur.future.cancel()
            job = self._current[slot] = _Job(slot, key, fn, lane)
            self._queue.append(job)
            self._ensure_thread(lane)
            self._wake.notify_all()
            return job.future

    def status(self, slot: tuple, key, fn: Callable[[Cancel], object]) -> tuple[str, object]:
        """Submit (or find) the job and say where it is: ("done", value), ("running", None) or ("failed", exc)."""
        fut = self.submit(slot, key, fn)
        if not fut.done():
            return "running", None
        if fut.cancelled():
            return "running", None
        exc = fut.exception()
        return ("failed", exc) if exc is not None else ("done", fut.result())

    def cancel(self, owner) -> int:
        """Stop every job whose slot starts with ``owner``; returns how many were stopped."""
        n = 0
        with self._lock:
            for slot, job in list(self._current.items()):
                if slot[:1] == (owner,) and not job.future.done():
                    job.cancel.set()
                    if job in self._queue:
                        self._queue.remove(job)
                        job.future.cancel()
                    n += 1
                    del self._current[slot]
        return n

    def owners(self) -> set:
        """The owners (first element of the slot) of every job not finished yet."""
        with self._lock:
            return {slot[0] for slot, job in self._current.items() if slot and not job.future.done()}

    def busy(self) -> bool:
        with self._lock:
            return bool(self._queue) or any(not j.future.done() for j in self._current.values())

    # ---- foreground / background ----------------------------------------------------------------------------
    @contextmanager
    def foreground(self):
        """Mark a page request in flight: background precomputations pause between their steps meanwhile."""
        with self._idle:
            self._foreground += 1
        try:
            yield
        finally:
            with self._idle:
                self._foreground -= 1
                self._idle.notify_all()

    def yield_to_foreground(self, timeout: float = 60.0) -> None:
        with self._idle:
            self._idle.wait_for(lambda: self._foreground == 0, timeout=timeout)

    def precompute(self, slot: tuple, key, steps: list[Callable[[], object]]) -> Future:
        """Run ``steps`` one after another in ``slot`` (superseding older precomputations of the slot), each
        only while no foreground request is in flight."""
        def run(cancel: Cancel):
            for step in steps:
                self.yield_to_foreground()
                cancel.check()
                step()
        return self.submit(slot, key, run, lane="background")

    # ---- the worker -----------------------------------------------------------------------------------------
    def _ensure_thread(self, lane: str) -> None:
        t = self._threads.get(lane)
        if t is None or not t.is_alive():
            t = self._threads[lane] = threading.Thread(target=self._loop, args=(lane,), name=f"{self._name}-{lane}",
                                                       daemon=True)
            t.start()

    def _loop(self, lane: str) -> None:
        while True:
            with self._lock:
                while not any(j.lane == lane for j in self._queue):
                    self._wake.wait()
                job = next(j for j in self._queue if j.lane == lane)
                self._queue.remove(job)
                self.started += 1
            if not job.future.set_running_or_notify_cancel():
                continue
            try:
                value = job.fn(job.cancel)
                job.cancel.check()   # superseded while finishing: the result is stale
            except Cancelled as exc:
                job.future.set_exception(exc)
                continue
            except BaseException as exc:  # noqa: BLE001 - reported to whoever polls the job
                job.future.set_exception(exc)
            else:
                job.future.set_result(value)
            with self._lock:
                self._done[(job.slot, job.key)] = job.future
                while len(self._done) > self._keep:
                    self._done.popitem(last=False)
