"""DynamicBatcher in-process: merging, padding, error isolation, queue limits."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from cbir.errors import InvalidInput, NotReady
from embedder.batching import DynamicBatcher
from embedder.model_config import BatchingParameters


class Recorder:
    """A 'model' that doubles its input and remembers the batch sizes it was run with."""

    def __init__(self, fail_on: float | None = None, gate: threading.Event | None = None):
        self.sizes: list[int] = []
        self.fail_on = fail_on
        self.gate = gate

    def __call__(self, inputs):
        if self.gate is not None:
            self.gate.wait(10)
        x = inputs["x"]
        self.sizes.append(len(x))
        if self.fail_on is not None and (x == self.fail_on).any():
            raise InvalidInput(f"bad value {self.fail_on}")
        return {"y": x * 2}


def wait_until(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        threading.Event().wait(0.005)


def run_concurrently(batcher, values, gate: threading.Event | None = None):
    """Submits every value from its own thread. With ``gate`` (the model's), the batch thread is held
    in the model until every request is in the batcher, so they queue up whatever the machine's load:
    what the batches hold then depends on the batcher's rules only, not on thread scheduling."""
    results, errors = {}, {}
    barrier = threading.Barrier(len(values))

    def one(value):
        barrier.wait()
        try:
            results[value] = batcher.submit({"x": np.array([value], np.float32)}, 1)["y"]
        except Exception as exc:  # noqa: BLE001
            errors[value] = exc

    threads = [threading.Thread(target=one, args=(v,)) for v in values]
    for t in threads:
        t.start()
    if gate is not None:
        wait_until(lambda: batcher._outstanding == len(values), "every request in the batcher")
        gate.set()
    for t in threads:
        t.join(30)
    return results, errors


def test_concurrent_requests_are_merged_and_get_their_own_rows():
    gate = threading.Event()
    model = Recorder(gate=gate)
    params = BatchingParameters(max_batch_size=8, batch_timeout_micros=200_000, num_batch_threads=1)
    batcher = DynamicBatcher(model, params, name="t")
    try:
        results, errors = run_concurrently(batcher, [float(v) for v in range(16)], gate)
    finally:
        batcher.close()
    assert not errors
    assert {v: float(r[0]) for v, r in results.items()} == {float(v): 2.0 * v for v in range(16)}
    # The batch the thread held took what had arrived (1-8); the rest queued and ran in full batches.
    assert max(model.sizes) == 8 and sum(model.sizes) == 16, model.sizes


def test_padding_to_allowed_batch_sizes():
    model = Recorder()
    params = BatchingParameters(
        max_batch_size=8, batch_timeout_micros=200_000, num_batch_threads=1, allowed_batch_sizes=(4, 8)
    )
    gate = threading.Event()
    model.gate = gate
    batcher = DynamicBatcher(model, params, name="t")
    try:
        results, errors = run_concurrently(batcher, [1.0, 2.0, 3.0, 4.0, 5.0], gate)
    finally:
        batcher.close()
    assert not errors and len(results) == 5
    assert all(size in (1, 4, 8) for size in model.sizes), model.sizes


def test_a_failing_request_does_not_fail_its_neighbours():
    gate = threading.Event()
    model = Recorder(fail_on=3.0, gate=gate)
    params = BatchingParameters(max_batch_size=8, batch_timeout_micros=200_000, num_batch_threads=1)
    batcher = DynamicBatcher(model, params, name="t")
    try:
        results, errors = run_concurrently(batcher, [1.0, 2.0, 3.0, 4.0], gate)
    finally:
        batcher.close()
    assert set(errors) == {3.0} and isinstance(errors[3.0], InvalidInput)
    assert {v: float(r[0]) for v, r in results.items()} == {1.0: 2.0, 2.0: 4.0, 4.0: 8.0}


def test_too_large_task_is_rejected_or_split():
    model = Recorder()
    batcher = DynamicBatcher(model, BatchingParameters(max_batch_size=4, num_batch_threads=1), name="t")
    try:
        with pytest.raises(InvalidInput, match="Task size 5 is larger than maximum input batch size 4"):
            batcher.submit({"x": np.arange(5, dtype=np.float32)}, 5)
    finally:
        batcher.close()
    splitting = DynamicBatcher(
        model,
        BatchingParameters(max_batch_size=4, num_batch_threads=1, enable_large_batch_splitting=True),
        name="t2",
    )
    try:
        out = splitting.submit({"x": np.arange(10, dtype=np.float32)}, 10)
    finally:
        splitting.close()
    np.testing.assert_array_equal(out["y"], np.arange(10) * 2)


def test_full_queue_is_unavailable():
    gate = threading.Event()
    model = Recorder(gate=gate)
    params = BatchingParameters(max_batch_size=2, max_enqueued_batches=1, num_batch_threads=1)
    batcher = DynamicBatcher(model, params, name="t")
    first = threading.Thread(target=batcher.submit, args=({"x": np.ones(2, np.float32)}, 2))
    first.start()  # taken by the batch thread, which blocks on the gate
    try:
        wait_until(lambda: batcher._outstanding == 2 and batcher._queued_items == 0, "the first batch taken")
        second = threading.Thread(target=batcher.submit, args=({"x": np.ones(2, np.float32)}, 2))
        second.start()  # fills the queue
        wait_until(lambda: batcher._queued_items == 2, "the second request queued")
        with pytest.raises(NotReady, match="queue"):
            batcher.submit({"x": np.ones(1, np.float32)}, 1)
    finally:
        gate.set()
        first.join(5)
        second.join(5)
        batcher.close()


class SlowRecorder(Recorder):
    """Takes a while per batch, so that clients queue up while one runs."""

    def __call__(self, inputs):
        threading.Event().wait(0.005)
        return super().__call__(inputs)


def _closed_loop(batcher, model, clients: int, batches: int, until=None) -> list[threading.Thread]:
    """``clients`` threads submitting back to back until the model has run ``batches`` batches (or
    until ``until(sizes)`` holds)."""
    until = until or (lambda sizes: len(sizes) >= batches)
    stop = threading.Event()

    def client(c: int) -> None:
        i = 0
        while not stop.is_set():
            batcher.submit({"x": np.array([c * 1000 + i], np.float32)}, 1)
            i += 1

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for thread in threads:
        thread.start()
    for _ in range(6000):
        if until(list(model.sizes)):
            break
        threading.Event().wait(0.01)
    stop.set()
    for thread in threads:
        thread.join(60)
    return threads


def _closed(name: str, reason: str) -> float:
    from embedder import metrics

    return metrics.BATCHES_CLOSED.labels(name, reason)._value.get()


def test_batches_close_once_they_hold_the_demand_so_steady_load_gives_full_batches():
    # max_batch_size above the number of clients: only the demand rule can close these batches early.
    params = BatchingParameters(max_batch_size=32, batch_timeout_micros=2_000_000, num_batch_threads=1)
    model = SlowRecorder()
    batcher = DynamicBatcher(model, params, name="demand")
    try:
        # Until 13 batches have run after the first full one (how many batches it takes the clients to
        # start and the demand to be learnt depends on the machine's load).
        threads = _closed_loop(
            batcher, model, clients=8, batches=0, until=lambda s: 8 in s and len(s) - s.index(8) >= 13
        )
    finally:
        batcher.close()
    assert not any(t.is_alive() for t in threads)
    # Once every client was outstanding at once, each batch holds all 8 and closes on the demand, not
    # the timeout (only the last ones, as clients leave, differ).
    first = model.sizes.index(8)
    assert model.sizes[first : first + 12] == [8] * 12, model.sizes
    assert _closed("demand", "demand") >= 12


def test_a_lone_client_never_waits_for_a_batch_that_cannot_fill():
    params = BatchingParameters(max_batch_size=32, batch_timeout_micros=60_000_000, num_batch_threads=1)
    model = Recorder()
    batcher = DynamicBatcher(model, params, name="lone")
    try:
        threads = _closed_loop(batcher, model, clients=1, batches=20)
    finally:
        batcher.close()
    assert not threads[0].is_alive(), "a batch waited for its timeout"
    assert set(model.sizes) == {1} and _closed("lone", "timeout") == 0
