"""Opportunistic batching of concurrent image searches: same answers, fewer dependency calls, isolation."""

import threading

import pytest

from cbir.errors import DeadlineExceeded, InvalidInput
from cbir.v1 import types_pb2
from gateway.search import Query, SearchCore, SearchLimits
from tests.gateway.fakes import FakeEmbedder, FakeIndexer, fake_embedding
from trainer.synthetic import make_image

N = 24


@pytest.fixture()
def world():
    embedder = FakeEmbedder()
    indexer = FakeIndexer()
    indexer.add_generation("gen1", version=1)
    images = [make_image(i, label=i % 5) for i in range(N)]
    for i, image in enumerate(images):
        indexer.put("gen1", types_pb2.Item(id=f"id{i}"), fake_embedding(image, 1))
    return embedder, indexer, images


def _concurrently(core, queries):
    results, errors = [None] * len(queries), [None] * len(queries)
    barrier = threading.Barrier(len(queries))

    def one(i):
        barrier.wait()
        try:
            results[i] = core.search(queries[i], core.deadline(10))
        except Exception as exc:  # noqa: BLE001 - inspected by the test
            errors[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(queries))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results, errors


def _release_when_queued(core: SearchCore, embedder: FakeEmbedder, total: int) -> threading.Thread:
    """Opens the embedder's gate once every one of ``total`` searches is either in the running call or
    queued behind it (ordering by state, not by sleeping, so a busy machine cannot change the batches)."""

    def watch() -> None:
        for _ in range(3000):
            if embedder.entered.is_set() and embedder.entered_with + len(core._coalescer._queue) == total:
                break
            threading.Event().wait(0.01)
        embedder.gate.set()

    thread = threading.Thread(target=watch)
    thread.start()
    return thread


def test_concurrent_searches_share_calls_and_each_gets_its_own_answer(world):
    embedder, indexer, images = world
    embedder.gate = threading.Event()
    core = SearchCore(lambda name: embedder, indexer, SearchLimits(coalesce_in_flight=1))
    queries = [Query(image=images[i], k=3) for i in range(N)]
    watcher = _release_when_queued(core, embedder, N)
    results, errors = _concurrently(core, queries)
    watcher.join(30)
    assert errors == [None] * N
    assert [r.hits[0].id for r in results] == [f"id{i}" for i in range(N)]
    # The first batch goes out at once; everything that queued meanwhile is the second (or was taken
    # into the first when the leader was slow to start).
    assert sum(n for n, _ in embedder.calls) == N and len(embedder.calls) <= 2
    assert indexer.knn_calls == len(embedder.calls)


def test_different_parameters_in_one_batch_are_respected(world):
    embedder, indexer, images = world
    embedder.delay = 0.02
    core = SearchCore(lambda name: embedder, indexer, SearchLimits(coalesce_in_flight=1))
    queries = [Query(image=images[i], k=1 + i % 4) for i in range(12)]
    results, errors = _concurrently(core, queries)
    assert errors == [None] * 12 and [len(r.hits) for r in results] == [1 + i % 4 for i in range(12)]


def test_an_image_the_model_rejects_fails_alone(world):
    embedder, indexer, images = world
    embedder.delay = 0.02
    embedder.reject = {images[5]}
    core = SearchCore(lambda name: embedder, indexer, SearchLimits(coalesce_in_flight=1))
    results, errors = _concurrently(core, [Query(image=images[i], k=2) for i in range(10)])
    assert isinstance(errors[5], InvalidInput)
    assert all(results[i].hits[0].id == f"id{i}" for i in range(10) if i != 5)


def test_deadline_passing_in_the_queue(world):
    embedder, indexer, images = world
    embedder.gate = threading.Event()  # the first search's Serving call lasts until the test says so
    core = SearchCore(lambda name: embedder, indexer, SearchLimits(coalesce_in_flight=1))
    first = threading.Thread(target=core.search, args=(Query(image=images[0]), core.deadline(10)))
    first.start()
    try:
        assert embedder.entered.wait(10)
        with pytest.raises(DeadlineExceeded, match="queued"):
            core.search(Query(image=images[1]), core.deadline(0.1))
    finally:
        embedder.gate.set()
        first.join(10)


def test_disabled_means_one_call_per_search(world):
    embedder, indexer, images = world
    embedder.delay = 0.01
    core = SearchCore(lambda name: embedder, indexer, SearchLimits(coalesce_in_flight=0))
    results, errors = _concurrently(core, [Query(image=images[i]) for i in range(8)])
    assert errors == [None] * 8 and len(embedder.calls) == 8


def test_a_corrupt_image_in_a_merged_batch_fails_alone_with_pillows_reason_and_the_rest_share_one_call(world):
    from tests.gateway import badimages as bad

    embedder, indexer, images = world
    embedder.delay = 0.02
    core = SearchCore(lambda name: embedder, indexer, SearchLimits(coalesce_in_flight=1))
    queries = [Query(image=images[i], k=2) for i in range(10)]
    # The gateway checks only the header; the "model" (here Pillow in the fake) refuses the pixels.
    queries[4] = Query(image=bad.truncated(images[4], 0.6), k=2)
    embedder.calls.clear()
    results, errors = _concurrently(core, queries)
    assert isinstance(errors[4], InvalidInput) and "cannot be decoded" in errors[4].message
    assert all(errors[i] is None and results[i].hits[0].id == f"id{i}" for i in range(10) if i != 4)
    # Each merged batch that held the culprit is redone once without it, not image by image.
    assert len(embedder.calls) < 8
