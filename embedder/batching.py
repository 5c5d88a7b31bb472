"""Dynamic batching: concurrent requests are merged into one model run, as TF Serving's batcher does.

A batch closes when it reaches ``max_batch_size`` items, when its oldest request has waited
``batch_timeout_micros``, or, earlier than TF Serving would, once it holds the current demand: as
many items as were outstanding (queued or being computed) at the busiest moment since the previous
batch closed, less those still running. Under steady load from N clients that is all N, so the
batches are full instead of alternating between a straggler alone and everyone else; at low load
it is the one request that is there, which never waits for a batch that cannot fill. So
``batch_timeout_micros`` is an upper bound that only a sudden drop in load reaches (once).
``num_batch_threads`` batches run at once; padded to the next ``allowed_batch_sizes`` entry when
given. If a merged batch fails, each request is run alone so an error (a corrupt image) reaches
only the request that caused it, and good neighbours still succeed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from cbir.errors import InvalidInput, NotReady
from embedder import metrics
from embedder.model_config import BatchingParameters

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


@dataclass
class _Task:
    inputs: Arrays
    size: int
    enqueued: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    result: Arrays | None = None
    error: BaseException | None = None


class DynamicBatcher:
    """Merges ``submit`` calls from many threads into batched calls of ``process``.

    ``process`` takes and returns arrays whose first dimension is the batch. Results are the
    rows belonging to each request, in order; padding rows are dropped.
    """

    def __init__(self, process: Callable[[Arrays], Arrays], params: BatchingParameters, *, name: str):
        self._process = process
        self.params = params
        self.name = name
        self._queue: deque[_Task] = deque()
        self._queued_items = 0
        # Items submitted and not answered yet, and their peak since the last batch closed (the
        # demand the next batch waits for; see the module docstring).
        self._outstanding = 0
        self._peak = 0
        self._cond = threading.Condition()
        self._batch_size = metrics.BATCH_SIZE.labels(name)
        self._batch_wait = metrics.BATCH_WAIT.labels(name)
        self._closed_by = {
            reason: metrics.BATCHES_CLOSED.labels(name, reason)
            for reason in ("full", "demand", "timeout", "immediate")
        }
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"batch-{name}-{i}", daemon=True)
            for i in range(params.num_batch_threads)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, inputs: Arrays, size: int) -> Arrays:
        """Blocks until the request's rows have been computed in some batch."""
        limit = self.params.execution_batch_size
        if size > limit:
            if not self.params.enable_large_batch_splitting:
                raise InvalidInput(
                    f"Task size {size} is larger than maximum input batch size {self.params.max_batch_size}"
                )
            parts = [
                self.submit({k: v[i : i + limit] for k, v in inputs.items()}, min(limit, size - i))
                for i in range(0, size, limit)
            ]
            return {k: np.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}
        task = _Task(inputs, size)
        with self._cond:
            if self._closed:
                # The version is being unloaded; this request still holds it, so run it directly.
                return self._process(inputs)
            capacity = self.params.max_enqueued_batches * self.params.max_batch_size
            if self._queued_items + size > capacity:
                raise NotReady("The batch scheduling queue to which this session object feeds is full.")
            self._queue.append(task)
            self._queued_items += size
            self._outstanding += size
            self._peak = max(self._peak, self._outstanding)
            self._cond.notify_all()
        task.done.wait()
        if task.error is not None:
            raise task.error
        assert task.result is not None
        return task.result

    def close(self) -> None:
        """Stops the batch threads once the queued requests are done."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=30)

    # ------------------------------------------------------------------ batch threads

    def _next_batch(self) -> list[_Task] | None:
        limit = self.params.execution_batch_size
        timeout = self.params.batch_timeout_seconds
        with self._cond:
            while True:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return None
                deadline = self._queue[0].enqueued + timeout
                while (
                    self._queue
                    and not self._closed
                    and self._queued_items < self._target(limit)
                    and time.monotonic() < deadline
                ):
                    self._cond.wait(max(0.0, deadline - time.monotonic()))
                if not self._queue:
                    continue  # another batch thread took them while we waited
                batch: list[_Task] = []
                total = 0
                while self._queue and total + self._queue[0].size <= limit:
                    task = self._queue.popleft()
                    batch.append(task)
                    total += task.size
                self._closed_by[self._close_reason(limit, timeout, deadline)].inc()
                self._queued_items -= total
                self._peak = self._outstanding
                return batch

    def _close_reason(self, limit: int, timeout: float, deadline: float) -> str:
        if self._queued_items >= limit:
            return "full"
        if self._queued_items >= self._target(limit):
            return "demand"
        return "timeout" if timeout > 0 and time.monotonic() >= deadline else "immediate"

    def _target(self, limit: int) -> int:
        """Items the forming batch waits for: the demand, less what other batch threads are running."""
        running = self._outstanding - self._queued_items
        return max(1, min(limit, self._peak - running))

    def _answered(self, batch: list[_Task]) -> None:
        with self._cond:
            self._outstanding -= sum(task.size for task in batch)

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._run(batch)
            except BaseException as exc:  # noqa: BLE001 - a batch thread must never die
                log.exception("batch failed unexpectedly", extra={"batcher": self.name})
                for task in batch:
                    if not task.done.is_set():
                        task.error = exc
                        task.done.set()
            finally:
                self._answered(batch)

    def _run(self, batch: list[_Task]) -> None:
        started = time.monotonic()
        for task in batch:
            self._batch_wait.observe(started - task.enqueued)
        if len(batch) == 1:
            self._run_alone(batch[0])
            self._batch_size.observe(batch[0].size)
            return
        total = sum(task.size for task in batch)
        padded = self.params.padded_size(total)
        merged = {}
        for alias in batch[0].inputs:
            rows = [task.inputs[alias] for task in batch]
            if padded > total:
                # Padding repeats a real row, so it is always valid model input.
                rows.append(np.repeat(rows[-1][-1:], padded - total, axis=0))
            merged[alias] = np.concatenate(rows, axis=0)
        self._batch_size.observe(padded)
        try:
            outputs = self._process(merged)
        except Exception:  # noqa: BLE001 - attribute the failure to the request(s) that caused it
            for task in batch:
                self._run_alone(task)
            return
        offset = 0
        for task in batch:
            task.result = {alias: value[offset : offset + task.size] for alias, value in outputs.items()}
            offset += task.size
            task.done.set()

    def _run_alone(self, task: _Task) -> None:
        try:
            task.result = self._process(task.inputs)
        except BaseException as exc:  # noqa: BLE001 - delivered to the waiting request
            task.error = exc
        task.done.set()
