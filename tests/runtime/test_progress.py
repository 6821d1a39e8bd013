"""Progress keeps reporting, and warns when nothing finishes."""

from __future__ import annotations

import logging
import time


from pipeline.runtime.progress import Progress



def test_progress_keeps_reporting_and_warns_when_nothing_finishes(caplog):
    progress = Progress(total=10, label="job", every_s=0.05, stall_s=0.3)
    with caplog.at_level(logging.INFO, logger="dvt"):
        progress.start()
        progress.update(ok=1)
        time.sleep(0.9)
        progress.close()
    lines = [r for r in caplog.records if r.name == "dvt"]
    assert sum("job: 1/10 images" in r.getMessage() for r in lines) >= 3  # the line keeps coming while quiet
    warnings = [r.getMessage() for r in lines if r.levelno == logging.WARNING]
    assert warnings and "no image finished for" in warnings[0] and "stalled" in warnings[0]
    steady = Progress(total=10, every_s=1.0, stall_s=1.0)
    steady.update(ok=1)
    assert not steady.stalled()
