"""Named points in the workers where a fault can be injected, to test recovery: not part of any job's settings.

A caller plans a fault for the runs it starts in this process; the driver hands the plan to its workers, and a
worker that reaches the point calls the planned action with what it knows there (e.g. ``step=``, ``rank=``). With
nothing planned a point costs a dictionary look-up. ::

    with fault_injection.planned_fault("after_checkpoint", functools.partial(die_once, marker, 8, 1)):
        run_training(config)   # rank 1 dies once, after reporting step 8's checkpoint; Ray Train recovers

Points: ``after_checkpoint`` (every rank, after each checkpoint report of stage-2 training and of distillation).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

__all__ = ["POINTS", "planned_fault", "planned", "reach"]

POINTS = ("after_checkpoint",)

_planned: dict[str, Callable[..., None]] = {}


@contextmanager
def planned_fault(point: str, action: Callable[..., None]) -> Iterator[None]:
    """Within the block, runs started here call the picklable ``action(**context)`` at ``point`` in every worker."""
    if point not in POINTS:
        raise ValueError(f"unknown fault point {point!r}: use one of {', '.join(POINTS)}")
    _planned[point] = action
    try:
        yield
    finally:
        _planned.pop(point, None)


def planned() -> dict[str, Callable[..., None]]:
    """The faults planned now, to ship to workers with their configuration."""
    return dict(_planned)


def reach(point: str, faults: Mapping[str, Callable[..., None]] | None, **context: object) -> None:
    """A worker reached ``point``: run the action planned for it, if any."""
    action = (faults or {}).get(point)
    if action is not None:
        action(**context)
