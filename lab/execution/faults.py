"""Fault injection for the recovery tests: what a worker does wrong, and when.

The tests set ``DETLAB_FAULT`` in the driver's environment; the runner and sweeps forward it to every
cell task and trial (``lab.execution.workerenv.FORWARD_ENV``), so a fault reaches a real worker process
through the same path as the tracking URI, and :func:`lab.execution.train.fit_cell` reads it where it is
called and hands it to every rank. This is the only fault-injection path. Unset, nothing here
does anything.

Grammar: items separated by ``;``, each ``kind:arg[:arg]``; every fault fires on the last rank
(``world - 1``) only, once per process:

* ``raise_after_epoch:E`` — raise after epoch ``E``'s checkpoint (0-based) is registered.
* ``exit_after_epoch:E`` — ``os._exit(1)`` there instead: the worker process dies unwinding nothing,
  as on an OOM kill or a segfault.
* ``pause_after_epoch:E:S`` — write this worker's Ray node id to ``DETLAB_FAULT_FILE`` and sleep ``S``
  seconds: the test kills that node meanwhile.
* ``nan_at_steps:S1/S2/...`` — the loss is NaN at these global steps (1-based, counted over epochs).

A fault "after epoch E" fires only when epoch E ran in this attempt, so a run resumed past E is
not hit again: the retry is what the test observes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

ENV = "DETLAB_FAULT"
FILE_ENV = "DETLAB_FAULT_FILE"
KINDS = ("raise_after_epoch", "exit_after_epoch", "pause_after_epoch", "nan_at_steps")


@dataclass(frozen=True)
class FaultPlan:
    """The parsed ``DETLAB_FAULT``; empty when unset."""

    raise_after_epoch: int | None = None
    exit_after_epoch: int | None = None
    pause_after_epoch: tuple[int, float] | None = None
    nan_at_steps: frozenset[int] = field(default_factory=frozenset)

    def __bool__(self) -> bool:
        return any(v not in (None, frozenset()) for v in vars(self).values())


def parse(spec: str | None) -> FaultPlan:
    """``DETLAB_FAULT`` text to a :class:`FaultPlan`; a malformed spec is an error, not ignored."""
    if not spec:
        return FaultPlan()
    values: dict[str, object] = {}
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        kind, _, arg = item.partition(":")
        try:
            if kind in ("raise_after_epoch", "exit_after_epoch"):
                values[kind] = int(arg)
            elif kind == "pause_after_epoch":
                epoch, seconds = arg.split(":")
                values[kind] = (int(epoch), float(seconds))
            elif kind == "nan_at_steps":
                values[kind] = frozenset(int(s) for s in arg.split("/"))
            else:
                raise ValueError(f"unknown kind {kind!r} (one of {', '.join(KINDS)})")
        except ValueError as e:
            raise ValueError(f"{ENV}={spec!r}: bad item {item!r}: {e}") from None
    return FaultPlan(**values)  # type: ignore[arg-type]


def from_env() -> FaultPlan:
    return parse(os.environ.get(ENV))
