"""The real `python -m indexer serve` process: statuses, kill -9 durability, shards answering like one."""

from __future__ import annotations

import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest

from cbir import errors
from cbir.processes import (
    ServiceProcess,
    free_port,
    running_service,
    wait_for_health,
    wait_for_port_file,
)
from cbir.sharding import shard_of
from cbir.v1 import indexer_pb2, indexer_pb2_grpc, types_pb2
from indexer.client import IndexerClient

pytestmark = pytest.mark.slow
SPACE = types_pb2.EmbeddingSpace(model_name="m", model_version=1)


def _serve(data_dir, *extra, log_dir=None, metrics_port=-1):
    return running_service(
        "indexer",
        "serve",
        "--data-dir",
        str(data_dir),
        "--metrics-port",
        str(metrics_port),
        "--log-format",
        "text",
        *extra,
        log_dir=log_dir,
    )


def _records(ids, vectors, label=""):
    return [
        indexer_pb2.Record(item=types_pb2.Item(id=i, label=label, uri=f"file:{i}"), vector=v)
        for i, v in zip(ids, vectors, strict=True)
    ]


def test_statuses_over_grpc_and_metrics(tmp_path):
    metrics_port = free_port()
    with (
        _serve(tmp_path / "data", log_dir=tmp_path, metrics_port=metrics_port) as (_proc, target),
        grpc.insecure_channel(target) as channel,
    ):
        stub = indexer_pb2_grpc.IndexerServiceStub(channel)

        def code(call, request):
            with pytest.raises(grpc.RpcError) as info:
                call(request, timeout=10)
            return info.value.code(), info.value.details()

        assert (
            code(stub.Knn, indexer_pb2.KnnRequest(queries=[indexer_pb2.Vector(values=[1, 2])], k=1))[0]
            == grpc.StatusCode.FAILED_PRECONDITION
        )
        stub.CreateGeneration(
            indexer_pb2.CreateGenerationRequest(name="g", space=SPACE, metric=1, dimension=2)
        )
        assert (
            code(
                stub.CreateGeneration,
                indexer_pb2.CreateGenerationRequest(name="g", space=SPACE, metric=1, dimension=2),
            )[0]
            == grpc.StatusCode.ALREADY_EXISTS
        )
        ok = indexer_pb2.UpsertRequest(generation="g", records=_records(["a", "b"], [[1, 0], [0, 1]]))
        bad = indexer_pb2.UpsertRequest(generation="g", records=_records(["c"], [[1, 2, 3]]))
        with pytest.raises(grpc.RpcError) as info:
            stub.Upsert(iter([ok, bad]), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (
            "dimension 2" in info.value.details() and "2 records of earlier messages" in info.value.details()
        )
        got = stub.Get(indexer_pb2.GetRequest(ids=["a", "b"], generation="g", include_vectors=True))
        assert [list(r.vector) for r in got.records] == [[1, 0], [0, 1]] and got.generation.name == "g"
        nan = indexer_pb2.KnnRequest(
            queries=[indexer_pb2.Vector(values=[float("nan"), 1])], k=1, generation="g"
        )
        assert code(stub.Knn, nan)[0] == grpc.StatusCode.INVALID_ARGUMENT
        assert (
            code(
                stub.Knn,
                indexer_pb2.KnnRequest(queries=[indexer_pb2.Vector(values=[1, 1])], k=0, generation="g"),
            )[0]
            == grpc.StatusCode.INVALID_ARGUMENT
        )
        assert (
            code(
                stub.Knn,
                indexer_pb2.KnnRequest(queries=[indexer_pb2.Vector(values=[1, 1])], k=1, generation="x"),
            )[0]
            == grpc.StatusCode.NOT_FOUND
        )
        assert code(stub.Get, indexer_pb2.GetRequest(ids=["zz"]))[0] == grpc.StatusCode.NOT_FOUND
        assert (
            code(
                stub.Knn,
                indexer_pb2.KnnRequest(
                    queries=[indexer_pb2.Vector(values=[1, 1])], k=1, generation="g", require_active=True
                ),
            )[0]
            == grpc.StatusCode.ABORTED
        )
        stub.ActivateGeneration(indexer_pb2.ActivateGenerationRequest(name="g"))
        answer = stub.Knn(
            indexer_pb2.KnnRequest(
                queries=[indexer_pb2.Vector(values=[1, 0.1])], k=5, generation="g", require_active=True
            )
        )
        assert [h.id for h in answer.results[0].hits] == ["a", "b"]
        assert (
            answer.generation.space.model_version == 1 and answer.generation.metric == types_pb2.METRIC_COSINE
        )
        stats = stub.Stats(indexer_pb2.StatsRequest())
        assert stats.item_count == 2 and stats.active_generation == "g" and stats.process_rss_bytes > 0
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert 'cbir_indexer_generation_vectors{generation="g",state="active"} 2.0' in text
        assert "cbir_indexer_items 2.0" in text
        assert 'cbir_grpc_requests_total{code="INVALID_ARGUMENT",method="Knn",service="indexer"}' in text


def _start(data_dir, log_dir, name):
    port_file = log_dir / f"{name}.port"
    proc = ServiceProcess(
        [
            "-m",
            "indexer",
            "serve",
            "--data-dir",
            str(data_dir),
            "--metrics-port",
            "-1",
            "--log-format",
            "text",
            "--port",
            "0",
            "--port-file",
            str(port_file),
        ],
        log_dir / f"{name}.log",
    )
    target = f"127.0.0.1:{wait_for_port_file(port_file, proc, 60)}"
    wait_for_health(target, timeout=60, proc=proc)
    return proc, target


def test_kill_9_loses_no_acknowledged_write_and_resurrects_no_delete(tmp_path):
    data = tmp_path / "data"
    proc, target = _start(data, tmp_path, "first")
    acked_upserts: dict[str, list[float]] = {}
    acked_deletes: set[str] = set()
    attempted_deletes: set[str] = set()
    stop = threading.Event()
    try:
        with IndexerClient([target], timeout=5) as client:
            client.create_generation("g", SPACE, types_pb2.METRIC_L2, 4)
            client.activate_generation("g")

            def writer():
                rng = np.random.default_rng(0)
                n = 0
                while not stop.is_set():
                    ids = [f"k{n + j}" for j in range(50)]
                    vectors = rng.normal(size=(50, 4)).astype(np.float32)
                    try:
                        client.upsert(_records(ids, vectors), batch_size=10)
                    except errors.CbirError:
                        return  # the server died mid-stream: this batch was not acknowledged
                    acked_upserts.update({i: v.tolist() for i, v in zip(ids, vectors, strict=True)})
                    victims = ids[::5]
                    attempted_deletes.update(victims)  # unacknowledged: may or may not have happened
                    try:
                        client.delete(victims)
                    except errors.CbirError:
                        return
                    acked_deletes.update(victims)
                    n += 50

            thread = threading.Thread(target=writer)
            thread.start()
            time.sleep(2.0)
            proc.kill()  # SIGKILL while writes are streaming
            stop.set()
            thread.join(30)
    finally:
        proc.stop()
    assert len(acked_upserts) >= 50 and acked_deletes
    proc, target = _start(data, tmp_path, "second")
    try:
        with IndexerClient([target]) as client:
            alive = [i for i in acked_upserts if i not in attempted_deletes]
            # In messages within the server's --max-batch (4096): a fast machine acknowledges more.
            records = [
                r
                for s in range(0, len(alive), 1000)
                for r in client.get(alive[s : s + 1000], include_vectors=True)
            ]
            for record in records:
                np.testing.assert_allclose(record.vector, acked_upserts[record.item.id], rtol=1e-6)
            stored = {r.item.id for r in client.list_items("g")}
            assert set(alive) <= stored
            assert not acked_deletes & stored  # no acknowledged delete came back
            with pytest.raises(errors.NotFound):
                client.get(sorted(acked_deletes)[:1])
            # And the graph answers from the replayed store: every live item finds itself.
            sample = alive[:: max(1, len(alive) // 50)]
            answer = client.knn(np.array([acked_upserts[i] for i in sample], np.float32), 1, generation="g")
            assert [r.hits[0].id for r in answer.results] == sample
            for victim in list(acked_deletes)[:50]:
                assert all(h.id != victim for r in answer.results for h in r.hits)
    finally:
        proc.stop()


def test_two_shards_answer_like_one(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 6)).astype(np.float32)
    ids = [f"s{j}" for j in range(400)]
    labels = [f"l{j % 4}" for j in range(400)]
    records = [
        indexer_pb2.Record(item=types_pb2.Item(id=i, label=lab), vector=v)
        for i, lab, v in zip(ids, labels, x, strict=True)
    ]
    q = rng.normal(size=(10, 6)).astype(np.float32)
    flt = types_pb2.Filter(labels=["l1", "l2"])
    with (
        _serve(tmp_path / "one", log_dir=tmp_path) as (_p1, one),
        _serve(tmp_path / "s0", "--shard-id", "0", "--shard-count", "2", log_dir=tmp_path) as (_p2, s0),
        _serve(tmp_path / "s1", "--shard-id", "1", "--shard-count", "2", log_dir=tmp_path) as (_p3, s1),
    ):
        answers = []
        for targets in ([one], [s0, s1]):
            with IndexerClient(targets) as client:
                client.create_generation("g", SPACE, types_pb2.METRIC_COSINE, 6)
                assert client.upsert(records, generation="g", batch_size=64) == 400
                client.activate_generation("g")
                active = client.active_generation()
                answers.append(
                    [[h.id for h in r.hits] for r in client.knn(q, 10, generation=active.name).results]
                )
                answers.append(
                    [[h.id for h in r.hits] for r in client.knn(q, 10, generation="g", filter=flt).results]
                )
                assert sum(s.item_count for s in client.stats()) == 400
                assert [r.item.id for r in client.get(ids[:20])] == ids[:20]
                assert client.delete(ids[:10]) == 10
                assert sum(1 for _ in client.list_items("g")) == 390
        assert answers[0] == answers[2] and answers[1] == answers[3]
        with IndexerClient([s0, s1]) as client:  # the shards really split the items
            counts = [s.item_count for s in client.stats()]
            assert counts == [sum(1 for i in ids[10:] if shard_of(i, 2) == k) for k in (0, 1)]
            with pytest.raises(errors.NotFound, match="shard"):
                client.knn(q, 1, generation="nope")


def _partition_answers(client, q):
    answer = client.knn(q, 10, generation="p")
    return [[h.id for h in r.hits] for r in answer.results]


def test_partition_generation_trains_survives_restart_and_kill_9(tmp_path):
    """A partition generation through the real server: created, filled past the training size,
    answered like exact search with every list probed, and the same after a clean restart (snapshot)
    and after kill -9 (snapshot + replay of the change log)."""
    from indexer.graph import ExactIndex
    from indexer.partitions import TRAIN_MIN

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(30, 8)) * 3
    x = (centres[rng.integers(0, 30, TRAIN_MIN + 500)] + rng.normal(size=(TRAIN_MIN + 500, 8))).astype(
        np.float32
    )
    ids = [f"p{j}" for j in range(len(x))]
    q = x[:20] + 0.01
    data = tmp_path / "data"
    proc, target = _start(data, tmp_path, "first")
    try:
        with IndexerClient([target], timeout=30) as client:
            with pytest.raises(errors.InvalidInput, match="INDEX_TYPE_PARTITIONS"):
                client.create_generation(
                    "h", SPACE, types_pb2.METRIC_L2, 8, partition_params=indexer_pb2.PartitionParams(lists=8)
                )
            created = client.create_generation(
                "p",
                SPACE,
                types_pb2.METRIC_L2,
                8,
                index_type=indexer_pb2.INDEX_TYPE_PARTITIONS,
                partition_params=indexer_pb2.PartitionParams(probes=8),
            )
            assert created.index_type == indexer_pb2.INDEX_TYPE_PARTITIONS and created.partition_lists == 1
            client.upsert(_records(ids, x), generation="p", batch_size=500)
            client.activate_generation("p")
            deadline = time.monotonic() + 120  # training runs in the background; a slow machine waits
            while client.get_generation("p").partition_lists <= 1 and time.monotonic() < deadline:
                time.sleep(0.1)
            lists = client.get_generation("p").partition_lists
            assert lists > 1
            exact, _ = ExactIndex(types_pb2.METRIC_L2, ids, x).search(q, 10)
            everything = client.knn(q, 10, generation="p", probes=lists)
            assert [[h.id for h in r.hits] for r in everything.results] == exact
            before = _partition_answers(client, q)
            with pytest.raises(errors.InvalidInput, match="probes"):
                client.knn(q, 10, generation="p", probes=-1)
    finally:
        proc.stop()
    proc, target = _start(data, tmp_path, "second")
    try:
        with IndexerClient([target], timeout=30) as client:
            gen = client.get_generation("p")
            assert gen.partition_lists == lists and gen.partition_params.probes == 8
            assert _partition_answers(client, q) == before
            client.delete(ids[:5])
            client.upsert(_records(["late"], x[5:6] + 0.001), generation="p")
            proc.kill()
    finally:
        proc.stop()
    proc, target = _start(data, tmp_path, "third")
    try:
        with IndexerClient([target], timeout=30) as client:
            assert client.get_generation("p").item_count == len(ids) - 5 + 1
            found = _partition_answers(client, q[:6])
            assert all(i not in row for row in found for i in ids[:5])
            assert found[5][0] == "late"
    finally:
        proc.stop()
