"""IndexerCore in-process: recall vs exact, restarts, filters, validation, generations, concurrency."""

from __future__ import annotations

import shutil
import threading
import time

import numpy as np
import pytest

from cbir.errors import Aborted, AlreadyExists, FailedPrecondition, InvalidInput, NotFound, NotReady
from cbir.sharding import shard_of
from indexer.core import IndexerConfig, IndexerCore, ItemFilter
from indexer.graph import ExactIndex
from indexer.store import ItemRow

COSINE, L2, IP = 1, 2, 3
DIM = 32


def _core(path, **kw) -> IndexerCore:
    core = IndexerCore(IndexerConfig(path, **kw))
    core.load()
    return core


def _fill(core, gen, ids, x, batch=2000, labels=None, attrs=None):
    for s in range(0, len(ids), batch):
        core.upsert(
            gen,
            [
                (
                    ItemRow(ids[j], f"uri/{ids[j]}", labels[j] if labels else "", attrs[j] if attrs else {}),
                    x[j],
                )
                for j in range(s, min(s + batch, len(ids)))
            ],
        )


def _recall(results, exact_ids) -> float:
    return float(
        np.mean(
            [len({h.item.id for h in r} & set(e)) / len(e) for r, e in zip(results, exact_ids, strict=True)]
        )
    )


def _clustered(rng, n, dim, centres=100, intrinsic=8):
    """Gaussian blobs, each spread over its own 8-dim subspace (+ small noise): like real embeddings,
    clustered by class with a low intrinsic dimension. (Isotropic 32-dim blobs are a much harder,
    unrealistic case: see indexer/README.md.)"""
    c = rng.normal(size=(centres, dim)) * 2
    bases = rng.normal(size=(centres, intrinsic, dim)) / np.sqrt(intrinsic)
    which = rng.integers(0, centres, n)
    z = rng.normal(size=(n, intrinsic))
    return (c[which] + np.einsum("ni,nid->nd", z, bases[which]) + 0.1 * rng.normal(size=(n, dim))).astype(
        np.float32
    )


@pytest.mark.parametrize("kind", ["uniform", "clustered", "clustered, queries from other clusters"])
def test_recall_at_10_with_default_params_and_identical_after_restart(tmp_path, kind):
    rng = np.random.default_rng(1)
    n = 20_000
    if kind == "uniform":
        x, q = rng.normal(size=(n, DIM)).astype(np.float32), rng.normal(size=(200, DIM)).astype(np.float32)
    elif kind == "clustered":  # queries drawn from the catalogue's own clusters
        pool = _clustered(rng, n + 200, DIM)
        x, q = pool[:n], pool[n:]
    else:  # queries unlike any catalogue item (other clusters): the hard case for HNSW
        x, q = _clustered(rng, n, DIM), _clustered(rng, 200, DIM)
    ids = [f"item-{j}" for j in range(n)]
    core = _core(tmp_path)
    core.create_generation("g", "m", 1, COSINE, DIM)
    core.activate_generation("g")
    _fill(core, "", ids, x)
    exact_ids, _ = ExactIndex(COSINE, ids, x).search(q, 10)
    results, row = core.knn(q, 10)
    assert row.name == "g"
    assert _recall(results, exact_ids) >= 0.98
    before = [[(h.item.id, round(h.score, 6)) for h in r] for r in results]
    core.close()

    again = _core(tmp_path)
    after = [[(h.item.id, round(h.score, 6)) for h in r] for r in again.knn(q, 10)[0]]
    assert after == before  # the snapshot is the same graph
    again.close(snapshot=False)


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_missing_or_corrupt_snapshot_is_rebuilt_from_the_store(tmp_path, damage):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2000, 8)).astype(np.float32)
    ids = [f"r{j}" for j in range(2000)]
    core = _core(tmp_path)
    core.create_generation("g", "m", 1, L2, 8)
    core.activate_generation("g")
    _fill(core, "", ids, x)
    core.close()  # writes the snapshot
    graph_file = tmp_path / "generations" / "g" / "hnsw.bin"
    if damage == "missing":
        shutil.rmtree(graph_file.parent)
    else:
        data = bytearray(graph_file.read_bytes())
        data[100:200] = bytes(100)
        graph_file.write_bytes(bytes(data))
    rebuilt = _core(tmp_path)
    q = rng.normal(size=(50, 8)).astype(np.float32)
    exact_ids, _ = ExactIndex(L2, ids, x).search(q, 10)
    assert rebuilt.get_generation().item_count == 2000
    assert _recall(rebuilt.knn(q, 10)[0], exact_ids) >= 0.98
    rebuilt.close()


def test_restart_replays_changes_made_after_the_snapshot(tmp_path):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(500, 4)).astype(np.float32)
    core = _core(tmp_path)
    core.create_generation("g", "m", 1, L2, 4)
    core.activate_generation("g")
    _fill(core, "", [f"a{j}" for j in range(300)], x[:300])
    core.snapshot_all()
    _fill(core, "", [f"b{j}" for j in range(200)], x[300:])  # after the snapshot
    core.delete([f"a{j}" for j in range(100)])
    core.store.close()  # "crash": no snapshot on the way out
    again = _core(tmp_path)
    assert again.get_generation().item_count == 400
    hit = again.knn(x[350:351], 1)[0][0][0]
    assert hit.item.id == "b50"
    assert again.knn(x[5:6], 1)[0][0][0].item.id != "a5"  # deleted stays deleted
    again.close()


@pytest.fixture
def small(tmp_path):
    """A core with 600 items of dim 8 in an active cosine generation, labels and attributes."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(600, 8)).astype(np.float32)
    ids = [f"s{j}" for j in range(600)]
    labels = [f"cls{j % 6}" for j in range(600)]
    attrs = [{"color": ["red", "green", "blue"][j % 3], "size": str(j % 4)} for j in range(600)]
    core = _core(tmp_path, exact_threshold=50)
    core.create_generation("g1", "m", 1, COSINE, 8)
    core.activate_generation("g1")
    _fill(core, "", ids, x, batch=250, labels=labels, attrs=attrs)
    yield core, ids, x, labels, attrs
    core.close()


@pytest.mark.parametrize(
    "flt",
    [
        ItemFilter(labels=("cls1",)),
        ItemFilter(labels=("cls1", "cls2")),
        ItemFilter(attributes=(("color", ("red",)),)),
        ItemFilter(labels=("cls0", "cls3"), attributes=(("color", ("red", "blue")), ("size", ("0", "2")))),
        ItemFilter(labels=("cls5",), attributes=(("size", ("1",)),)),  # few matches: exact search
        ItemFilter(labels=("nothing",)),
    ],
)
def test_filters_give_the_exact_filtered_answers(small, flt):
    core, ids, x, labels, attrs = small
    q = np.random.default_rng(3).normal(size=(20, 8)).astype(np.float32)
    keep = [j for j in range(len(ids)) if flt.matches(ItemRow(ids[j], "", labels[j], attrs[j]))]
    exact_ids, _ = ExactIndex(COSINE, [ids[j] for j in keep], x[keep]).search(q, 10)
    results, _ = core.knn(q, 10, item_filter=flt)
    for r, e in zip(results, exact_ids, strict=True):
        assert all(flt.matches(h.item) for h in r)
        assert len(r) == len(e)
    assert _recall(results, exact_ids) >= 0.97 if keep else all(not r for r in results)


def test_ef_override_is_per_query(small):
    core, ids, x, *_ = small
    q = np.random.default_rng(11).normal(size=(20, 8)).astype(np.float32)
    exact_ids, _ = ExactIndex(COSINE, ids, x).search(q, 10)
    assert all(len(r) == 10 for r in core.knn(q, 10, ef=1)[0])  # hnswlib widens to k itself
    assert _recall(core.knn(q, 10, ef=600)[0], exact_ids) == 1.0
    assert core._generations["g1"].graph.index.ef == core.get_generation().row.ef_search  # restored


def test_fewer_than_k_deletes_exclusions_and_min_score(small):
    core, ids, x, *_ = small
    res, _ = core.knn(x[:1], 1000)
    assert len(res[0]) == 600 and res[0][0].item.id == "s0"
    core.delete(ids[:590])
    res, _ = core.knn(x[:1], 10)
    assert sorted(h.item.id for h in res[0]) == sorted(ids[590:])
    res, _ = core.knn(x[595:596], 3, exclude_ids=["s595"])
    assert len(res[0]) == 3 and "s595" not in {h.item.id for h in res[0]}
    res, _ = core.knn(x[595:596], 10, min_score=0.99)
    assert [h.item.id for h in res[0]] == ["s595"]
    assert res[0][0].score == pytest.approx(1.0, abs=1e-5) and res[0][0].distance >= 0


def test_scores_follow_each_metric(tmp_path):
    core = _core(tmp_path)
    a, b = np.array([1.0, 0.0], np.float32), np.array([2.0, 2.0], np.float32)
    for name, metric, score in (("c", COSINE, 1 / np.sqrt(2)), ("l", L2, 1 / (1 + 5.0)), ("i", IP, 2.0)):
        core.create_generation(name, "m", 1, metric, 2)
        core.upsert(name, [(ItemRow("b"), b)])
        hit = core.knn(a[None], 1, generation=name)[0][0][0]
        assert hit.score == pytest.approx(score, rel=1e-5)
    core.close()


def test_validation_errors_name_the_problem(small):
    core, ids, x, *_ = small
    cases = [
        (lambda: core.upsert("", [(ItemRow("a"), np.ones(7))]), InvalidInput, "dimension 8"),
        (lambda: core.upsert("", [(ItemRow("a"), [np.nan] * 8)]), InvalidInput, "NaN"),
        (lambda: core.upsert("", [(ItemRow("a"), [np.inf] + [0] * 7)]), InvalidInput, "infinite"),
        (lambda: core.upsert("", [(ItemRow(""), np.ones(8))]), InvalidInput, "id must be"),
        (lambda: core.upsert("", [(ItemRow("x" * 257), np.ones(8))]), InvalidInput, "256"),
        (lambda: core.upsert("", [(ItemRow("a\n"), np.ones(8))]), InvalidInput, "control"),
        (lambda: core.upsert("", [(ItemRow("a", label="l" * 300), np.ones(8))]), InvalidInput, "label"),
        (lambda: core.upsert("", [(ItemRow("a", uri="u" * 3000), np.ones(8))]), InvalidInput, "uri"),
        (
            lambda: core.upsert("", [(ItemRow("a", attributes={str(i): "" for i in range(65)}), np.ones(8))]),
            InvalidInput,
            "64 attributes",
        ),
        (
            lambda: core.upsert("", [(ItemRow("a", attributes={"k": "v" * 1025}), np.ones(8))]),
            InvalidInput,
            "1024",
        ),
        (lambda: core.upsert("nope", [(ItemRow("a"), np.ones(8))]), NotFound, "nope"),
        (lambda: core.knn(x[:1], 0), InvalidInput, "k must be"),
        (lambda: core.knn(x[:1], 1001), InvalidInput, "k must be"),
        (lambda: core.knn(x[:1, :4], 1), InvalidInput, "dimension"),
        (lambda: core.knn([[np.nan] * 8], 1), InvalidInput, "NaN"),
        (lambda: core.knn(np.zeros((0, 8)), 1), InvalidInput, "at least one"),
        (lambda: core.knn(x[:1], 1, ef=-1), InvalidInput, "ef"),
        (lambda: core.knn(x[:1], 1, item_filter=ItemFilter(attributes=(("", ("a",)),))), InvalidInput, "key"),
        (lambda: core.knn(x[:1], 1, item_filter=ItemFilter(attributes=(("a", ()),))), InvalidInput, "value"),
        (lambda: core.knn(x[:1], 1, generation="nope"), NotFound, "nope"),
        (lambda: core.get(["s1", "missing"]), NotFound, "missing"),
        (lambda: core.delete(["s1", "missing"]), NotFound, "missing"),
        (lambda: core.create_generation("bad name", "m", 1, COSINE, 8), InvalidInput, "name"),
        (lambda: core.create_generation("g2", "", 1, COSINE, 8), InvalidInput, "model_name"),
        (lambda: core.create_generation("g2", "m", 0, COSINE, 8), InvalidInput, "model_version"),
        (lambda: core.create_generation("g2", "m", 1, 0, 8), InvalidInput, "metric"),
        (lambda: core.create_generation("g2", "m", 1, COSINE, 5000), InvalidInput, "dimension"),
        (lambda: core.create_generation("g1", "m", 1, COSINE, 8), AlreadyExists, "g1"),
        (lambda: core.drop_generation("g1"), FailedPrecondition, "active"),
        (lambda: core.list_pending("g1", page_token="zz"), InvalidInput, "token"),
    ]
    for call, error, text in cases:
        with pytest.raises(error, match=text):
            call()
    assert core.get(["s1"])[0][0][0].id == "s1"  # nothing half-written by the failures
    assert core.stats().item_count == 600


def test_shard_ownership_and_not_ready(tmp_path):
    core = IndexerCore(IndexerConfig(tmp_path, shard_id=1, shard_count=2))
    with pytest.raises(NotReady):
        core.knn(np.ones((1, 2)), 1)
    core.load()
    core.create_generation("g", "m", 1, COSINE, 2)
    mine = next(f"id{j}" for j in range(100) if shard_of(f"id{j}", 2) == 1)
    other = next(f"id{j}" for j in range(100) if shard_of(f"id{j}", 2) == 0)
    core.upsert("g", [(ItemRow(mine), np.ones(2))])
    with pytest.raises(FailedPrecondition, match="belongs to shard 0"):
        core.upsert("g", [(ItemRow(other), np.ones(2))])
    core.close()


def test_generations_pending_and_atomic_activation(tmp_path):
    core = _core(tmp_path)
    rng = np.random.default_rng(0)
    old = rng.normal(size=(100, 4)).astype(np.float32)
    with pytest.raises(FailedPrecondition, match="no generation is active"):
        core.upsert("", [(ItemRow("a"), old[0])])
    core.create_generation("v1", "m", 1, COSINE, 4)
    core.activate_generation("v1")
    ids = [f"i{j}" for j in range(100)]
    _fill(core, "", ids, old)
    # A reindex into v2 (other model version, other dimension) while writes go on in v1.
    core.create_generation("v2", "m", 2, COSINE, 6)
    assert core.get_generation("v2").pending_count == 100
    new = rng.normal(size=(100, 6)).astype(np.float32)
    _fill(core, "v2", ids, new)
    assert core.get_generation("v2").pending_count == 0
    assert core.get_generation("v1").pending_count == 0  # unchanged items stay current in v1
    core.upsert("", [(ItemRow("i5", label="changed"), old[5])])  # a write to the active generation
    core.upsert("", [(ItemRow("brand-new"), old[6])])
    core.delete(["i7"])
    items, token, total = core.list_pending("v2")
    assert {i.id for i in items} == {"i5", "brand-new"} and total == 2 and token == ""
    with pytest.raises(FailedPrecondition, match="2 pending"):
        core.activate_generation("v2")
    with pytest.raises(Aborted):
        core.activate_generation("v2", allow_pending=True, expected_active="v0")
    core.upsert("v2", [(ItemRow("i5", label="changed"), new[5]), (ItemRow("brand-new"), new[6])])
    assert core.get_generation("v2").pending_count == 0
    assert core.knn(old[:1], 1, generation="v1", require_active=True)[1].name == "v1"
    core.activate_generation("v2", expected_active="v1")
    with pytest.raises(Aborted, match="no longer the active"):
        core.knn(old[:1], 1, generation="v1", require_active=True)
    hits, row = core.knn(new[5:6], 1)
    assert row.name == "v2" and row.model_version == 2 and hits[0][0].item.label == "changed"
    assert core.knn(old[:1], 1, generation="v1")[1].name == "v1"  # retired: still queryable by name
    states = {g.row.name: g.row.state for g in core.list_generations()}
    assert states == {"v1": 3, "v2": 2}
    assert core.get_generation("v2").item_count == 100  # 99 + brand-new (i7 deleted)
    core.drop_generation("v1")
    with pytest.raises(NotFound):
        core.get_generation("v1")
    core.close()
    again = _core(tmp_path)
    assert again.active_name() == "v2" and again.get_generation().item_count == 100
    assert again.get(["i5"])[0][0][0].label == "changed"
    again.close()


def test_list_pending_pages(tmp_path):
    core = _core(tmp_path)
    core.create_generation("a", "m", 1, COSINE, 2)
    core.upsert("a", [(ItemRow(f"p{j:03d}"), np.ones(2)) for j in range(25)])
    core.create_generation("b", "m", 2, COSINE, 2)
    seen, token = [], ""
    while True:
        items, token, total = core.list_pending("b", page_size=10, page_token=token)
        assert total == 25
        seen += [i.id for i in items]
        if not token:
            break
    assert seen == sorted(f"p{j:03d}" for j in range(25))
    core.close()


def test_compaction_keeps_answers_exact(tmp_path):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3000, 8)).astype(np.float32)
    ids = [f"c{j}" for j in range(3000)]
    core = _core(tmp_path)
    core.create_generation("g", "m", 1, L2, 8)
    core.activate_generation("g")
    _fill(core, "", ids, x)
    core.delete(ids[:1500])
    deadline = time.monotonic() + 30
    while core.get_generation().deleted_slots and time.monotonic() < deadline:
        time.sleep(0.05)
    assert core.get_generation().deleted_slots == 0  # compacted in the background
    q = rng.normal(size=(50, 8)).astype(np.float32)
    exact_ids, _ = ExactIndex(L2, ids[1500:], x[1500:]).search(q, 10)
    assert _recall(core.knn(q, 10)[0], exact_ids) >= 0.98
    core.close()


def test_concurrent_writers_and_readers_match_exact(tmp_path):
    rng = np.random.default_rng(9)
    base = rng.normal(size=(2000, 8)).astype(np.float32)
    core = _core(tmp_path)
    core.create_generation("g", "m", 1, L2, 8)
    core.activate_generation("g")
    _fill(core, "", [f"b{j}" for j in range(2000)], base)
    stop = threading.Event()
    errors: list[BaseException] = []

    # Readers query vectors of items no writer touches: their answer must be themselves, exactly.
    def reader():
        try:
            while not stop.is_set():
                j = rng.integers(0, 1000, 16)
                res, _ = core.knn(base[j], 1)
                assert [r[0].item.id for r in res] == [f"b{i}" for i in j]
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def writer(w):
        try:
            local = np.random.default_rng(w)
            n = 0
            while not stop.is_set():
                batch = local.normal(size=(20, 8)).astype(np.float32) + 50  # far from the base items
                core.upsert("", [(ItemRow(f"w{w}-{n + j}"), batch[j]) for j in range(20)])
                core.delete([f"w{w}-{n + j}" for j in range(0, 20, 2)])
                core.upsert("", [(ItemRow(f"b{1000 + (n % 1000)}"), local.normal(size=8).astype(np.float32))])
                n += 20
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(3)] + [
        threading.Thread(target=writer, args=(w,)) for w in range(2)
    ]
    for t in threads:
        t.start()
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors[0]
    # Final state equals exact search over what the store holds.
    got = core.list_items("g", page_size=10_000, include_vectors=True)[0]
    all_ids = [i.id for i, _ in got]
    vectors = np.stack([v for _, v in got])
    q = rng.normal(size=(30, 8)).astype(np.float32)
    exact_ids, _ = ExactIndex(L2, all_ids, vectors).search(q, 10)
    assert _recall(core.knn(q, 10)[0], exact_ids) >= 0.98
    assert core.get_generation().item_count == len(all_ids)
    core.close()


def test_partition_generation_through_the_core(tmp_path):
    """Created, filled past the training size (trained inline here), answered with the right search
    width field, filtered, and validated; ef is HNSW's and is ignored here."""
    from indexer.partitions import TRAIN_MIN
    from indexer.store import PARTITIONS

    core = _core(tmp_path, train_in_background=False, exact_below=0, exact_threshold=0)
    rng = np.random.default_rng(12)
    n = TRAIN_MIN + 1000
    x = _clustered(rng, n, DIM)
    ids = [f"p{j}" for j in range(n)]
    labels = ["odd" if j % 2 else "even" for j in range(n)]
    with pytest.raises(InvalidInput, match="INDEX_TYPE_PARTITIONS"):
        core.create_generation("h", "m", 1, L2, DIM, lists=4)
    with pytest.raises(InvalidInput, match="partition_params.probes"):
        core.create_generation("p", "m", 1, L2, DIM, index_type=PARTITIONS, probes=-1)
    core.create_generation("p", "m", 1, L2, DIM, index_type=PARTITIONS)
    _fill(core, "p", ids, x, labels=labels)
    info = core.get_generation("p")
    assert info.partition_lists > 1 and info.deleted_slots == 0
    q = x[:20] + 0.01
    exact_ids, _ = ExactIndex(L2, ids, x).search(q, 10)
    every = core.knn(q, 10, generation="p", probes=info.partition_lists)[0]
    assert [[h.item.id for h in r] for r in every] == exact_ids
    assert _recall(core.knn(q, 10, generation="p", ef=5)[0], exact_ids) >= 0.9  # ef: not this type's
    odd = core.knn(q, 10, generation="p", item_filter=ItemFilter(labels=("odd",)))[0]
    assert all(h.item.label == "odd" for r in odd for h in r) and all(len(r) == 10 for r in odd)
    with pytest.raises(InvalidInput, match="probes"):
        core.knn(q, 10, generation="p", probes=-1)
    core.close()
