"""Every expected failure is one line with a documented exit status (docs/reliability.md 4)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time


from pipeline.runtime.failures import EXIT_INTERRUPTED, EXIT_TERMINATED

from ..conftest import ROOT


def test_interrupts_end_in_one_line_and_their_exit_status(caplog):
    from jobs.cli import run_job

    args = type("Args", (), {"verbose": 0})()

    def sigint(_):
        raise KeyboardInterrupt

    def sigterm(_):
        os.kill(os.getpid(), signal.SIGTERM)  # the handler run_job installs turns it into an exception
        time.sleep(5)
        raise AssertionError("SIGTERM did not interrupt the job")

    previous = signal.getsignal(signal.SIGTERM)
    with caplog.at_level(logging.ERROR, logger="dvt"):
        assert run_job(sigint, args) == EXIT_INTERRUPTED
        assert run_job(sigterm, args) == EXIT_TERMINATED
    assert signal.getsignal(signal.SIGTERM) is previous
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["interrupted (SIGINT): finished work is kept in the output; re-run the same command to resume",
                     "terminated (SIGTERM): finished work is kept in the output; re-run the same command to resume"]


def test_expected_ray_line_is_dropped_from_the_console():
    """The C++ line Ray prints on every run goes, any other line (and a partial one) passes, in order."""
    code = ("import os, re; from pipeline.runtime.ray_session import filter_stderr, EXPECTED_RAY_LINES as P\n"
            "filter_stderr(P)\n"
            "os.write(2, b'before\\n[2026-01-01 00:00:00,000 E 1 1] core_worker.cc:2465: Actor with class name: '\n"
            "         b\"'MapWorker(X)' and ID: 'ab' has constructor arguments in the object store and max_restarts\"\n"
            "         b' > 0. If the arguments ...\\n[2026 E] core_worker.cc:12: something else\\nprogress 50%\\r')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=60)
    assert out.returncode == 0 and out.stderr == b"before\n[2026 E] core_worker.cc:12: something else\nprogress 50%\r"
