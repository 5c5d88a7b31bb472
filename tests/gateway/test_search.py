"""The search core over in-process fakes: answers, validation, consistency across generations, deadlines."""

import math

import numpy as np
import pytest

from cbir.errors import (
    Aborted,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidInput,
    NotFound,
    NotReady,
    ResourceExhausted,
)
from cbir.metric import Metric
from cbir.v1 import types_pb2
from gateway.images import ImageLimits
from gateway.search import Query, SearchCore, SearchLimits
from indexer.core import IndexerConfig, IndexerCore
from indexer.server import filter_from_proto
from tests.gateway.fakes import FakeEmbedder, FakeIndexer, fake_embedding
from trainer.synthetic import make_image

N_ITEMS = 30


def _item(i):
    return types_pb2.Item(
        id=f"item-{i:02d}",
        uri=f"/data/{i}.png",
        label=f"class{i % 3}",
        attributes={"colour": ["red", "blue"][i % 2]},
    )


def _images():
    return {f"item-{i:02d}": make_image(i, label=i % 3) for i in range(N_ITEMS)}


def _fill(indexer, generation, version, images):
    for i, image in enumerate(images.values()):
        indexer.put(generation, _item(i), fake_embedding(image, version))


@pytest.fixture()
def world():
    images = _images()
    embedder = FakeEmbedder(versions=(1, 2))
    indexer = FakeIndexer()
    indexer.add_generation("gen1", version=1)
    _fill(indexer, "gen1", 1, images)
    core = SearchCore(lambda name: embedder, indexer, SearchLimits(images=ImageLimits(max_bytes=100_000)))
    return core, embedder, indexer, images


def _search(core, **kwargs):
    return core.search(Query(**kwargs), core.deadline(None))


def test_catalogue_image_comes_back_first_with_its_metadata(world):
    core, _, _, images = world
    result = _search(core, image=images["item-07"], k=5)
    assert [h.id for h in result.hits][0] == "item-07"
    assert len(result.hits) == 5
    top = result.hits[0]
    assert math.isclose(top.score, 1.0, abs_tol=1e-5) and top.uri == "/data/7.png" and top.label == "class1"
    assert top.attributes["colour"] == "blue"
    assert result.generation.name == "gen1" and result.generation.space.model_version == 1
    assert [h.score for h in result.hits] == sorted((h.score for h in result.hits), reverse=True)


def test_k_zero_means_ten(world):
    core, _, _, images = world
    assert len(_search(core, image=images["item-00"]).hits) == 10


def test_more_like_this_excludes_the_item_and_uses_its_stored_vector(world):
    core, embedder, _, images = world
    by_id = _search(core, item_id="item-04", k=5)
    by_image = _search(core, image=images["item-04"], k=6)
    assert "item-04" not in [h.id for h in by_id.hits]
    assert [h.id for h in by_id.hits] == [h.id for h in by_image.hits][1:]
    assert embedder.calls == [(1, 1)]  # only the image query was embedded


def test_unknown_item_is_not_found(world):
    core, *_ = world
    with pytest.raises(NotFound, match="no catalogue item has id 'nope'"):
        _search(core, item_id="nope")


def test_filters_and_min_score(world):
    core, _, _, images = world
    flt = types_pb2.Filter(
        labels=["class2"], attributes=[types_pb2.AttributeFilter(key="colour", values=["red"])]
    )
    hits = _search(core, image=images["item-01"], k=50, filter=flt).hits
    assert hits and all(h.label == "class2" and h.attributes["colour"] == "red" for h in hits)
    assert len(hits) == len([i for i in range(N_ITEMS) if i % 3 == 2 and i % 2 == 0])
    high = _search(core, image=images["item-01"], k=50, min_score=0.9).hits
    assert high and all(h.score >= 0.9 for h in high)


@pytest.mark.parametrize(
    "kwargs, error, fragment",
    [
        (dict(k=-1), InvalidInput, "k must be between 1 and 1000"),
        (dict(k=1001), InvalidInput, "k must be between 1 and 1000"),
        (dict(ef=-5), InvalidInput, "ef must be"),
        (dict(min_score=float("nan")), InvalidInput, "min_score"),
        (dict(filter=types_pb2.Filter(labels=[""])), InvalidInput, "empty label"),
        (
            dict(filter=types_pb2.Filter(attributes=[types_pb2.AttributeFilter(key="", values=["x"])])),
            InvalidInput,
            "empty key",
        ),
        (
            dict(filter=types_pb2.Filter(attributes=[types_pb2.AttributeFilter(key="colour")])),
            InvalidInput,
            "has no values",
        ),
    ],
)
def test_bad_parameters(world, kwargs, error, fragment):
    core, _, indexer, images = world
    with pytest.raises(error, match=fragment):
        _search(core, image=images["item-00"], **kwargs)
    assert indexer.knn_calls == 0


@pytest.mark.parametrize(
    "query, error, fragment",
    [
        (Query(), InvalidInput, "exactly one"),
        (Query(image=b"x", item_id="a"), InvalidInput, "exactly one"),
        (Query(item_id=""), InvalidInput, "item_id must be 1..256 bytes of UTF-8, got 0 bytes"),
        (Query(item_id="a" * 300), InvalidInput, "item_id must be 1..256 bytes of UTF-8, got 300 bytes"),
        (Query(item_id="bad\nid"), InvalidInput, "control characters"),
        (Query(image=b""), InvalidInput, "empty"),
        (Query(image=b"not an image"), InvalidInput, "not a JPEG"),
        (Query(image=b"\0" * 100_001), ResourceExhausted, "--max-image-bytes"),
    ],
)
def test_bad_queries(world, query, error, fragment):
    core, embedder, *_ = world
    with pytest.raises(error, match=fragment):
        core.search(query, core.deadline(None))
    assert embedder.calls == []


def test_generation_switch_between_embedding_and_knn_redoes_the_search_in_the_new_space(world):
    core, embedder, indexer, images = world
    indexer.add_generation("gen2", version=2, activate=False)
    _fill(indexer, "gen2", 2, images)
    _search(core, image=images["item-03"])  # caches gen1
    embedder.on_embed = lambda: indexer.activate("gen2")  # activation lands while embedding
    result = _search(core, image=images["item-03"], k=3)
    assert result.generation.name == "gen2" and result.generation.space.model_version == 2
    assert result.hits[0].id == "item-03" and math.isclose(result.hits[0].score, 1.0, abs_tol=1e-5)
    assert embedder.calls[-2:] == [(1, 1), (1, 2)]


def test_pinned_version_missing_from_serving_is_unavailable_naming_it(world):
    core, embedder, _, images = world
    embedder.versions = {2}
    with pytest.raises(NotReady, match="version 1.*generation 'gen1'"):
        _search(core, image=images["item-03"])


def test_pinned_version_gone_because_a_new_generation_took_over_is_retried(world):
    core, embedder, indexer, images = world
    indexer.add_generation("gen2", version=2, activate=False)
    _fill(indexer, "gen2", 2, images)
    _search(core, image=images["item-03"])  # caches gen1
    indexer.activate("gen2")
    embedder.versions = {2}  # v1 unloaded right after the swap
    result = _search(core, image=images["item-03"])
    assert result.generation.name == "gen2" and result.hits[0].id == "item-03"


def test_generation_changing_all_the_time_is_aborted_after_bounded_retries(world):
    core, embedder, indexer, images = world

    class Flapping:
        def __getattr__(self, name):
            return getattr(indexer, name)

        def knn(self, *args, **kwargs):
            raise Aborted("generation is no longer active")

    core = SearchCore(lambda name: embedder, Flapping(), SearchLimits(generation_retries=2))
    with pytest.raises(Aborted, match="changed 3 times"):
        _search(core, image=images["item-01"])


def test_no_active_generation_is_failed_precondition():
    indexer = FakeIndexer()
    core = SearchCore(lambda name: FakeEmbedder(), indexer)
    with pytest.raises(FailedPrecondition, match="no active generation"):
        _search(core, image=make_image(1))


def test_model_name_flag_mismatch_is_failed_precondition(world):
    _, embedder, indexer, images = world
    core = SearchCore(lambda name: embedder, indexer, model_name="other")
    with pytest.raises(FailedPrecondition, match="--model-name"):
        _search(core, image=images["item-01"])


def test_batch_embeds_all_images_in_one_call_and_answers_in_order(world):
    core, embedder, _, images = world
    queries = [
        Query(image=images["item-01"], k=2),
        Query(item_id="item-05", k=3),
        Query(image=images["item-09"], k=2),
        Query(image=images["item-12"], k=4),
    ]
    results, generation = core.batch_search(queries, core.deadline(None))
    assert embedder.calls == [(3, 1)]
    assert [len(r.hits) for r in results] == [2, 3, 2, 4]
    assert results[0].hits[0].id == "item-01" and results[2].hits[0].id == "item-09"
    assert "item-05" not in [h.id for h in results[1].hits]
    assert generation.name == "gen1" and all(r.generation == generation for r in results)


def test_batch_fails_on_the_first_invalid_query_naming_it(world):
    core, embedder, _, images = world
    queries = [Query(image=images["item-01"]), Query(image=images["item-02"], k=5000), Query(image=b"")]
    with pytest.raises(InvalidInput, match=r"queries\[1\]: k must be"):
        core.batch_search(queries, core.deadline(None))
    with pytest.raises(InvalidInput, match="at least one"):
        core.batch_search([], core.deadline(None))
    with pytest.raises(InvalidInput, match="--max-batch"):
        core.batch_search([Query(item_id="item-01")] * 65, core.deadline(None))
    assert embedder.calls == []


def test_expired_deadline_is_deadline_exceeded(world):
    core, embedder, indexer, images = world
    clock = [100.0]
    core = SearchCore(lambda name: embedder, indexer, clock=lambda: clock[0])
    deadline = core.deadline(0.5)
    clock[0] += 1.0
    with pytest.raises(DeadlineExceeded, match="deadline expired before"):
        core.search(Query(image=images["item-01"]), deadline)


def test_dependency_timeouts_are_the_remaining_time(world):
    core, embedder, indexer, images = world
    seen = []
    original = indexer.knn

    def knn(*args, timeout=None, **kwargs):
        seen.append(timeout)
        return original(*args, timeout=timeout, **kwargs)

    indexer.knn = knn
    # A clock that moves only when told: the answer cannot depend on how busy the machine is.
    now = [100.0]
    core = SearchCore(lambda name: embedder, indexer, core.limits, clock=lambda: now[0])
    embedder.on_embed = lambda: now.__setitem__(0, now[0] + 0.3)  # Serving took 0.3 s
    core.search(Query(image=images["item-01"]), core.deadline(0.8))
    core.search(Query(image=images["item-01"]), core.deadline(None))
    assert seen[0] == pytest.approx(0.5) and seen[1] == core.limits.dependency_timeout


def test_serving_info(world):
    core, embedder, indexer, _ = world
    info = core.serving_info(core.deadline(None))
    assert info.generation.name == "gen1" and info.item_count == N_ITEMS
    assert info.dimension == 12 and info.shard_count == 1 and info.available_model_versions == [1, 2]


def test_indexer_down_is_unavailable(world):
    core, _, indexer, images = world
    indexer.down = True
    with pytest.raises(NotReady):
        _search(core, image=images["item-01"])


def test_results_are_exactly_the_brute_force_neighbours(world):
    core, _, indexer, images = world
    query = images["item-11"]
    vector = fake_embedding(query, 1)
    stored = indexer.vectors["gen1"]
    expected = sorted(stored, key=lambda i: -float(np.dot(vector, stored[i])))[:7]
    assert [h.id for h in _search(core, image=query, k=7).hits] == expected


@pytest.fixture()
def shard(tmp_path):
    """An indexer core with an empty active generation of dimension 4."""
    core = IndexerCore(IndexerConfig(tmp_path))
    core.load()
    core.create_generation("g", "m", 1, Metric.COSINE, 4)
    core.activate_generation("g")
    yield core
    core.close()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(ef=-1),
        dict(ef=100_001),
        dict(min_score=float("nan")),
        dict(min_score=float("inf")),
        dict(filter=types_pb2.Filter(labels=["x"] * 1025)),
        dict(filter=types_pb2.Filter(attributes=[types_pb2.AttributeFilter(key="", values=["x"])])),
        dict(filter=types_pb2.Filter(attributes=[types_pb2.AttributeFilter(key="colour")])),
    ],
)
def test_the_gateway_and_the_indexer_refuse_a_mistake_in_the_same_words(world, shard, kwargs):
    core, _, _, images = world
    with pytest.raises(InvalidInput) as at_gateway:
        _search(core, image=images["item-00"], **kwargs)
    flt = kwargs.get("filter")
    with pytest.raises(InvalidInput) as at_indexer:
        shard.knn(
            np.ones((1, 4), np.float32),
            1,
            ef=kwargs.get("ef", 0),
            min_score=kwargs.get("min_score"),
            item_filter=filter_from_proto(flt) if flt is not None else None,
        )
    assert at_gateway.value.message == at_indexer.value.message


def test_k_out_of_range_reads_the_same_and_the_gateway_adds_what_0_means(world, shard):
    core, _, _, images = world
    with pytest.raises(InvalidInput) as at_gateway:
        _search(core, image=images["item-00"], k=1001)
    with pytest.raises(InvalidInput) as at_indexer:
        shard.knn(np.ones((1, 4), np.float32), 1001)
    assert at_indexer.value.message == "k must be between 1 and 1000, got 1001"
    assert at_gateway.value.message == "k must be between 1 and 1000 (0 means 10), got 1001"
