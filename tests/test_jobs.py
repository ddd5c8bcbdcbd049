"""Background jobs: the latest request of a slot wins, superseded work stops, an owner's jobs stop together.

Event-based: every wait is on an event a job sets, never on a sleep.
"""
from __future__ import annotations

import threading

import pytest

from foldviz.jobs import Cancel, Cancelled, Runner


def blocking_job(started: threading.Event, release: threading.Event, log: list, name: str):
    """A job that says it started, then polls its cancel token until released (like a fold's progress callback)."""
    def run(cancel: Cancel):
        log.append(f"start {name}")
        started.set()
        while not release.wait(0.01):
            cancel.check()
        cancel.check()
        log.append(f"done {name}")
        return name
    return run


def test_a_newer_request_supersedes_the_running_one_and_only_the_latest_result_is_shown():
    r = Runner()
    log, released = [], threading.Event()
    s1 = threading.Event()
    f1 = r.submit(("sess", "estimate"), 1, blocking_job(s1, released, log, "one"))
    assert s1.wait(10)
    # ten fast changes while the first runs: the queued ones are dropped, only the last runs
    futures = [r.submit(("sess", "estimate"), k, blocking_job(threading.Event(), released, log, f"#{k}"))
               for k in range(2, 12)]
    released.set()
    assert futures[-1].result(10) == "#11"
    with pytest.raises(Cancelled):
        f1.result(10)                                     # the superseded job stopped at its next check
    assert all(f.cancelled() for f in futures[:-1])       # never started
    assert log == ["start one", "start #11", "done #11"]
    assert r.status(("sess", "estimate"), 11, lambda c: None) == ("done", "#11")


def test_the_same_request_is_not_run_twice_and_slots_are_independent():
    r = Runner()
    calls = []
    f = r.submit(("a", "x"), "k", lambda c: calls.append(1) or 42)
    assert f.result(10) == 42
    assert r.submit(("a", "x"), "k", lambda c: calls.append(1) or 0).result(10) == 42   # reused
    assert r.submit(("b", "x"), "k", lambda c: calls.append(1) or 7).result(10) == 7    # another slot runs
    assert calls == [1, 1]


def test_closing_a_session_stops_its_work_and_leaves_others_running():
    r = Runner()
    log, release = [], threading.Event()
    sa, sb = threading.Event(), threading.Event()
    fa = r.submit(("closed", "estimate"), 1, blocking_job(sa, release, log, "closed"))
    assert sa.wait(10)
    fb = r.submit(("open", "estimate"), 1, blocking_job(sb, release, log, "open"))
    assert r.cancel("closed") == 1
    with pytest.raises(Cancelled):
        fa.result(10)
    assert sb.wait(10)            # the other session's job started as soon as the worker was free
    release.set()
    assert fb.result(10) == "open" and not r.busy()


def test_background_lane_yields_to_page_requests_and_never_blocks_the_work_lane():
    r = Runner()
    ran, work_done = threading.Event(), threading.Event()
    with r.foreground():
        bg = r.precompute(("path",), "g1", [ran.set])
        # the work lane is not queued behind the paused background lane
        assert r.submit(("s", "estimate"), 1, lambda c: work_done.set() or 1).result(10) == 1
        assert not ran.wait(0.5)   # still paused: a page request is in flight
    assert ran.wait(10) and bg.result(10) is None


def test_a_failing_job_reports_its_error():
    r = Runner()
    state, exc = "running", None
    fut = r.submit(("s", "x"), 1, lambda c: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        fut.result(10)
    state, exc = r.status(("s", "x"), 1, lambda c: 1 / 0)
    assert state == "failed" and isinstance(exc, ZeroDivisionError)
