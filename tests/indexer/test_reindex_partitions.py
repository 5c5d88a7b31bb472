"""`python -m indexer reindex --partition i/n`: n worker processes build exactly the generation one process builds,
and a worker killed part-way is retried without duplicating anything; activation waits for every partition."""

from __future__ import annotations

import numpy as np
import pytest

from cbir.processes import ServiceProcess, running_service
from cbir.sharding import shard_of
from cbir.v1 import indexer_pb2
from embedder.client import EmbedderClient
from indexer.cli import main
from indexer.client import IndexerClient
from indexer.reindex import Partition
from tests.gateway import stack as s
from tests.indexer.test_follow import wait_for, write_catalogue
from tests.indexer.test_follow_recovery import SlowImage
from tests.support.tiny_model import export_tiny_model
from trainer.synthetic import make_image

pytestmark = pytest.mark.slow

N_ITEMS = 90
WORKERS = 3
# float32 vectors of unit norm: the same images in batches of another size may differ in the last bits.
ATOL = 100 * float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("partitions")
    repo = tmp / "models"
    export_tiny_model(repo, s.MODEL, version=1, dim=s.DIM, seed=0)
    catalogue = tmp / "catalogue"
    write_catalogue(catalogue, N_ITEMS, labels=3)
    shard_args = ("--host", "127.0.0.1", "--metrics-port", "-1", "--log-format", "text", "--shard-count", "2")
    with (
        running_service(
            "embedder",
            "serve",
            "--model_name",
            s.MODEL,
            "--model_base_path",
            str(repo / s.MODEL),
            "--host",
            "127.0.0.1",
            log_dir=tmp,
        ) as (_e, serving),
        running_service(
            "indexer", "serve", "--data-dir", str(tmp / "i0"), "--shard-id", "0", *shard_args, log_dir=tmp
        ) as (_i0, shard0),
        running_service(
            "indexer", "serve", "--data-dir", str(tmp / "i1"), "--shard-id", "1", *shard_args, log_dir=tmp
        ) as (_i1, shard1),
    ):
        yield tmp, catalogue, serving, f"{shard0},{shard1}"


def worker(tmp, catalogue, serving: str, indexer: str, partition: str, generation: str, *extra: str):
    index = partition.split("/")[0]
    return ServiceProcess(
        [
            "-m",
            "indexer",
            "reindex",
            str(catalogue),
            "--indexer",
            indexer,
            "--serving",
            serving,
            "--model",
            s.MODEL,
            "--model-version",
            "1",
            "--generation",
            generation,
            "--partition",
            partition,
            "--batch-size",
            "4",
            "--no-progress",
            *extra,
        ],
        tmp / f"{generation}-{index}-{len(list(tmp.glob(f'{generation}-{index}-*.log')))}.log",
    )


def finished(proc: ServiceProcess, timeout: float = 120) -> tuple[int, str]:
    code = proc.proc.wait(timeout)
    return code, proc.log_text()


def records(indexer: str, generation: str) -> dict[str, np.ndarray]:
    with IndexerClient(indexer.split(",")) as client:
        found: dict[str, np.ndarray] = {}
        for record in client.list_items(generation, include_vectors=True):
            assert record.item.id not in found, f"{record.item.id} twice"
            found[record.item.id] = np.asarray(record.vector, np.float32)
        return found


def shard_counts(indexer: str, generation: str) -> list[int]:
    with IndexerClient(indexer.split(",")) as client:
        return [client.get_generation(generation, shard=i).item_count for i in range(client.shard_count)]


def test_partitions_in_parallel_build_what_one_process_builds(world, capsys):
    tmp, catalogue, serving, indexer = world
    common = ["--indexer", indexer, "--serving", serving, "--model", s.MODEL, "--no-progress"]
    code = main(["reindex", str(catalogue), *common, "--generation", "single", "--no-activate"])
    assert code == 0, capsys.readouterr().err
    procs = [
        worker(tmp, catalogue, serving, indexer, f"{i}/{WORKERS}", "parallel", "--no-activate")
        for i in range(WORKERS)
    ]
    outputs = [finished(p) for p in procs]
    for code, text in outputs:
        assert code == 0, text
    # Each worker embedded its own partition only, and together they covered the catalogue once.
    embedded = [int(text.split(" embedded, ")[0].rsplit(", ", 1)[1]) for _, text in outputs]
    expected = [sum(1 for i in range(N_ITEMS) if Partition(w, WORKERS).owns(_id(i))) for w in range(WORKERS)]
    assert embedded == expected and sum(embedded) == N_ITEMS and min(embedded) > 0

    single, parallel = records(indexer, "single"), records(indexer, "parallel")
    assert sorted(single) == sorted(parallel) and len(single) == N_ITEMS
    for item_id, vector in single.items():
        np.testing.assert_allclose(parallel[item_id], vector, atol=ATOL, rtol=0)
    assert shard_counts(indexer, "single") == shard_counts(indexer, "parallel")
    with IndexerClient(indexer.split(",")) as client:
        assert [client.get_generation(g).space.model_version for g in ("single", "parallel")] == [1, 1]


def _id(i: int) -> str:
    return f"class{i % 3}/item-{i:04d}.png"


def test_a_killed_partition_is_retried_without_duplicates_and_activation_waits_for_all(world):
    tmp, catalogue, serving, indexer = world
    # Partition 1 of 3 holds an image that is a FIFO: its worker stops there until released.
    slow_id = next(
        f"class0/slow-{j}.png" for j in range(100) if shard_of(f"class0/slow-{j}.png", WORKERS) == 1
    )
    slow = SlowImage(tmp / "slow.png", make_image(seed=500, size=32, label=0))
    manifest = tmp / "catalogue.csv"
    rows = [f"{p.relative_to(catalogue)},{p},{p.parent.name}" for p in sorted(catalogue.rglob("*.png"))]
    manifest.write_text("\n".join(["id,path,label", *rows, f"{slow_id},{slow.path},class0"]) + "\n")
    total = N_ITEMS + 1
    try:
        stuck = worker(tmp, manifest, serving, indexer, "1/3", "retry")
        others = [worker(tmp, manifest, serving, indexer, f"{i}/3", "retry") for i in (0, 2)]
        for proc in others:
            code, text = finished(proc)
            assert code == 0 and "waiting for the other partitions, not activated" in text, text

        # The stuck worker wrote part of its partition; it is killed (an evicted pod) and retried.
        def partly_written() -> int:
            count = sum(shard_counts(indexer, "retry"))
            return count if count > total - _partition_size(manifest, 1) else 0

        wait_for(partly_written, "partition 1 part-way", proc=stuck)
        stuck.kill()
        with IndexerClient(indexer.split(",")) as client:
            # Not every partition is in: nobody activated it.
            assert client.get_generation("retry").state == indexer_pb2.GENERATION_STATE_BUILDING
        slow.release()
        code, text = finished(worker(tmp, manifest, serving, indexer, "1/3", "retry"))
        assert code == 0, text
        assert "resuming generation retry:" in text and "complete, activated" in text
        assert " 0 failed" in text
        found = records(indexer, "retry")
        assert len(found) == total and sum(shard_counts(indexer, "retry")) == total
        with IndexerClient(indexer.split(",")) as client, EmbedderClient(serving, s.MODEL) as embedder:
            active = client.active_generation()
            assert active.name == "retry" and active.pending_count == 0
            vector = embedder.embed([slow.data], version=1).vectors[0]
        np.testing.assert_allclose(found[slow_id], vector, atol=ATOL, rtol=0)
    finally:
        slow.close()


def _partition_size(manifest, index: int) -> int:
    ids = [line.split(",")[0] for line in manifest.read_text().splitlines()[1:]]
    return sum(1 for i in ids if Partition(index, 3).owns(i))
