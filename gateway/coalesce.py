"""Opportunistic batching: concurrent image searches share one Serving call and one Knn fan-out.

No request ever waits for a batch to fill: the first search goes out at once; searches that arrive
while ``max_in_flight`` batches are already running queue up, and when a batch finishes, the next
queued search leads everything queued so far as one batch. At one client this is a plain search; under
load, Serving gets bigger batches and the indexer fewer RPCs, which is what lets a 2-core machine pass
most of the model server's throughput on (see gateway/README.md for the measured effect).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar, cast

from cbir.errors import DeadlineExceeded, InvalidInput
from gateway import metrics


class _Deadline(Protocol):
    def remaining(self) -> float | None: ...


Q = TypeVar("Q")
R = TypeVar("R")
D = TypeVar("D", bound=_Deadline)


class QueriesRejected(InvalidInput):
    """Some queries of a batch are invalid on their own; ``rejected`` maps their positions in the
    batch to what is wrong with each, so the others can still be answered together."""

    def __init__(self, message: str, rejected: dict[int, str] | None = None):
        super().__init__(message)
        self.rejected = rejected or {}


class _Entry(Generic[Q, R, D]):
    __slots__ = ("query", "deadline", "wake", "lead", "done", "result", "error")

    def __init__(self, query: Q, deadline: D):
        self.query = query
        self.deadline = deadline
        self.wake = threading.Event()
        self.lead = False
        self.done = False
        self.result: R | None = None
        self.error: BaseException | None = None


class Coalescer(Generic[Q, R, D]):
    """Runs ``run_batch(queries, deadline) -> results`` over whatever searches are waiting."""

    def __init__(
        self,
        run_batch: Callable[[list[Q], D], list[R]],
        merge_deadlines: Callable[[list[D]], D],
        *,
        max_batch: int = 64,
        max_in_flight: int = 1,
    ):
        self._run_batch = run_batch
        self._merge_deadlines = merge_deadlines
        self.max_batch = max(1, max_batch)
        self.max_in_flight = max(1, max_in_flight)
        self._lock = threading.Lock()
        self._queue: list[_Entry[Q, R, D]] = []
        self._in_flight = 0

    def submit(self, query: Q, deadline: D) -> R:
        entry: _Entry[Q, R, D] = _Entry(query, deadline)
        with self._lock:
            if self._in_flight < self.max_in_flight:
                self._in_flight += 1
                entry.lead = True
            else:
                self._queue.append(entry)
        if not entry.lead:
            self._wait(entry)
        if entry.lead and not entry.done:
            self._lead(entry)
        if entry.error is not None:
            raise entry.error
        # Answered without an error, so the result is set (R itself may include None).
        return cast(R, entry.result)

    def _wait(self, entry: _Entry[Q, R, D]) -> None:
        """Until the entry is answered or asked to lead; DeadlineExceeded if its deadline passes in the queue."""
        if entry.wake.wait(entry.deadline.remaining()):
            return
        with self._lock:
            if entry in self._queue:
                self._queue.remove(entry)
                raise DeadlineExceeded("the request's deadline expired while queued behind other searches")
        # A leader took it meanwhile: the answer is on its way (bounded by the dependency timeout).
        entry.wake.wait()

    def _lead(self, entry: _Entry[Q, R, D]) -> None:
        with self._lock:
            take = self._queue[: self.max_batch - 1]
            del self._queue[: len(take)]
        batch = [entry, *take]
        metrics.COALESCED_BATCH.observe(len(batch))
        try:
            self._answer(batch)
        finally:
            with self._lock:
                self._in_flight -= 1
                successor = None
                if self._queue and self._in_flight < self.max_in_flight:
                    successor = self._queue.pop(0)
                    self._in_flight += 1
                    successor.lead = True
            if successor is not None:
                successor.wake.set()

    def _answer(self, batch: list[_Entry[Q, R, D]]) -> None:
        try:
            results = self._run_batch(
                [e.query for e in batch], self._merge_deadlines([e.deadline for e in batch])
            )
        except InvalidInput as exc:
            rejected = getattr(exc, "rejected", {})
            if len(batch) == 1:
                _fail(batch, exc)
            elif rejected:
                # The culprits are known: they fail, the others are answered together once more.
                for i, e in enumerate(batch):
                    if i in rejected:
                        e.error = InvalidInput(rejected[i])
                rest = [e for i, e in enumerate(batch) if i not in rejected]
                if rest:
                    self._answer(rest)
            else:
                # An image the model rejected must not fail the searches it was merged with.
                for e in batch:
                    try:
                        e.result = self._run_batch([e.query], e.deadline)[0]
                    except Exception as single:  # noqa: BLE001 - handed to its own caller
                        e.error = single
        except Exception as exc:  # noqa: BLE001 - every caller of the batch gets it
            _fail(batch, exc)
        else:
            for e, result in zip(batch, results, strict=True):
                e.result = result
        finally:
            for e in batch:
                e.done = True
                e.wake.set()


def _fail(batch: list[_Entry[Q, R, D]], exc: Exception) -> None:
    for e in batch:
        # Each caller raises its own instance, so tracebacks of different threads do not interleave.
        try:
            e.error = type(exc)(*exc.args)
        except Exception:  # noqa: BLE001 - exotic constructor: share the instance
            e.error = exc
