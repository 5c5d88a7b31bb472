"""The rollout controller under failures, with real processes: kill -9 mid-reindex, Serving gone mid-reindex,
an indexer shard down mid-reindex, and an activation interrupted between two shards.

"Mid-reindex" is made deterministic by one catalogue image that is a FIFO: reading it blocks until the
test lets it through, so the build stops part-way at the same item every time.
"""

from __future__ import annotations

import errno
import os
import re
import threading
import time

import pytest

from cbir.errors import NotReady
from cbir.processes import ServiceProcess, free_port, wait_for_health, wait_for_port_file
from cbir.v1 import indexer_pb2, types_pb2
from indexer.client import IndexerClient
from tests.gateway import stack as s
from tests.indexer.test_follow import follow_args, metrics_text, settled, wait_for, write_catalogue
from tests.support.tiny_model import export_tiny_model
from trainer.synthetic import make_image

pytestmark = pytest.mark.slow

N_ITEMS = 120
SLOW_ID = "class1/item-slow.png"  # sorts into the middle of the catalogue


class SlowImage:
    """A catalogue image that is a FIFO: each read blocks until ``release()``, then gets the image."""

    def __init__(self, path, data: bytes):
        os.mkfifo(path)
        self.path, self.data = path, data
        self._open = threading.Event()
        self._stopped = threading.Event()
        threading.Thread(target=self._feed, daemon=True).start()

    def release(self) -> None:
        self._open.set()

    def hold(self) -> None:
        self._open.clear()

    def close(self) -> None:
        self._stopped.set()

    def _feed(self) -> None:
        while not self._stopped.is_set():
            if not self._open.wait(0.05):
                continue
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: nobody is reading yet
                    raise
                time.sleep(0.02)
                continue
            try:
                os.set_blocking(fd, True)
                os.write(fd, self.data)
            except BrokenPipeError:
                pass  # the reader went away (its process was killed): serve the next one
            finally:
                os.close(fd)
            # Let the reader see the end of the file and close it before the FIFO is opened again:
            # a reader still holding it would get the image twice.
            time.sleep(0.2)


class Restartable:
    """A service on a fixed (once free) port, so that it can be stopped and started again at the same address."""

    def __init__(self, module: str, args: list[str], log_dir, name: str):
        self.module, self.args, self.log_dir, self.name = module, args, log_dir, name
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.proc: ServiceProcess | None = None
        self.starts = 0

    def start(self, *, wait: bool = True) -> ServiceProcess:
        self.starts += 1
        port_file = self.log_dir / f"{self.name}-{self.starts}.port"
        self.proc = ServiceProcess(
            ["-m", self.module, *self.args, "--port", str(self.port), "--port-file", str(port_file)],
            self.log_dir / f"{self.name}-{self.starts}.log",
        )
        wait_for_port_file(port_file, self.proc, 120)
        if wait:
            wait_for_health(self.target, "", 120, self.proc)
        return self.proc

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


def vectors_in(indexer_targets: list[str], generation: str) -> int:
    try:
        with IndexerClient(indexer_targets, timeout=5) as client:
            return sum(
                client.get_generation(generation, shard=i).item_count for i in range(len(indexer_targets))
            )
    except Exception:  # noqa: BLE001 - not created yet, or a shard is down
        return 0


def retries(proc) -> float:
    """How often the controller retried a step because a dependency was unavailable."""
    found = re.search(r'cbir_rollout_retries_total\{reason="unavailable"\} ([0-9.]+)', metrics_text(proc))
    return float(found[1]) if found else 0.0


def test_controller_survives_kill_serving_outage_and_a_shard_down(tmp_path):
    repo = tmp_path / "models"
    export_tiny_model(repo, s.MODEL, version=1, dim=s.DIM, seed=0)
    config = tmp_path / "models.config"
    config.write_text(s.model_config(repo))
    # The evaluation set is the catalogue's regular files; the catalogue (a manifest) adds the FIFO.
    images = tmp_path / "images"
    write_catalogue(images, N_ITEMS)
    slow = SlowImage(tmp_path / "slow.png", make_image(seed=999, size=32, label=1))
    catalogue = tmp_path / "catalogue.csv"
    rows = (
        ["id,path,label"]
        + [f"{p.relative_to(images)},{p},{p.parent.name}" for p in sorted(images.rglob("*.png"))]
        + [f"{SLOW_ID},{slow.path},class1"]
    )
    catalogue.write_text("\n".join(rows) + "\n")
    serving = Restartable(
        "embedder",
        [
            "serve",
            "--model_config_file",
            str(config),
            "--file_system_poll_wait_seconds",
            "0.3",
            "--host",
            "127.0.0.1",
        ],
        tmp_path,
        "embedder",
    )
    shards = [
        Restartable(
            "indexer",
            [
                "serve",
                "--data-dir",
                str(tmp_path / f"index{i}"),
                "--shard-id",
                str(i),
                "--shard-count",
                "2",
                "--host",
                "127.0.0.1",
                "--metrics-port",
                "-1",
            ],
            tmp_path,
            f"indexer{i}",
        )
        for i in range(2)
    ]
    targets = [shard.target for shard in shards]
    args = follow_args(
        ",".join(targets),
        serving.target,
        catalogue,
        "--batch-size",
        "8",
        "--eval-max-queries",
        "40",
        "--tolerance",
        "0.5",
    )
    args[args.index("--eval") + 1] = str(images)
    total = N_ITEMS + 1
    controllers: list[ServiceProcess] = []

    def controller() -> ServiceProcess:
        proc = ServiceProcess(
            ["-m", "indexer", *args, "--port", "0"], tmp_path / f"follow-{len(controllers)}.log"
        )
        controllers.append(proc)
        return proc

    try:
        serving.start()
        for shard in shards:
            shard.start()

        def stalled(generation: str) -> int:
            """Vectors in ``generation`` once its build waits on the FIFO (the same count every time)."""
            count = vectors_in(targets, generation)
            time.sleep(0.3)
            return count if 0 < count == vectors_in(targets, generation) < total else 0

        # kill -9 in the middle of version 1's reindex; the next controller resumes the same generation.
        first = controller()
        done_before = wait_for(lambda: stalled("tiny-v1"), "a partly built tiny-v1", proc=first)
        first.kill()
        second = controller()
        wait_for(lambda: "resuming generation tiny-v1" in second.log_text(), "the resumption", proc=second)
        slow.release()
        decision = wait_for(lambda: settled(targets[0], 1), "version 1's decision", proc=second)
        assert decision.verdict == indexer_pb2.ROLLOUT_VERDICT_PASSED and decision.HasField("activated_at")
        resumed = re.search(
            r"resuming generation tiny-v1: (\d+) items already current, (\d+) to embed", second.log_text()
        )
        assert int(resumed[1]) == done_before and int(resumed[1]) + int(resumed[2]) == total
        with IndexerClient(targets) as client:
            # One generation for the version, complete.
            assert [g.name for g in client.list_generations()] == ["tiny-v1"]
            assert sum(client.get_generation("tiny-v1", shard=i).item_count for i in range(2)) == total

        # Serving goes away while version 2 is being reindexed, and comes back at the same address.
        slow.hold()
        export_tiny_model(repo, s.MODEL, version=2, dim=s.DIM, seed=1)
        wait_for(lambda: stalled("tiny-v2"), "a partly built tiny-v2", proc=second)
        serving.proc.kill()
        slow.release()
        wait_for(lambda: retries(second) > 0, "a retry of the step", proc=second)
        assert settled(targets[0], 2) is None
        serving.start()
        decision = wait_for(lambda: settled(targets[0], 2), "version 2's decision", timeout=180, proc=second)
        assert decision.verdict == indexer_pb2.ROLLOUT_VERDICT_PASSED, decision.reason

        # An indexer shard goes down during version 3's reindex and comes back with its data.
        slow.hold()
        export_tiny_model(repo, s.MODEL, version=3, dim=s.DIM, seed=2)
        wait_for(lambda: stalled("tiny-v3"), "a partly built tiny-v3", proc=second)
        shards[1].proc.kill()
        before = retries(second)
        slow.release()
        wait_for(lambda: retries(second) > before, "a retry of the step", proc=second)
        assert settled(targets[0], 3) is None
        shards[1].start()
        decision = wait_for(lambda: settled(targets[0], 3), "version 3's decision", timeout=180, proc=second)
        assert decision.verdict == indexer_pb2.ROLLOUT_VERDICT_PASSED, decision.reason
        with IndexerClient(targets) as client:
            assert [client.get_generation("", shard=i).name for i in range(2)] == ["tiny-v3", "tiny-v3"]
            counts = [client.get_generation("tiny-v3", shard=i).item_count for i in range(2)]
            assert sum(counts) == total
            assert sorted(d.model_version for d in client.list_rollouts(s.MODEL)) == [1, 2, 3]
        log = second.log_text()
        assert log.count('"msg": "rollout decision"') == 3  # version 1 once, after the restart

        # An activation cut between the shards (shard 0 down after shard 1 switched) is finished by
        # repeating it, and no shard is left on another generation.
        second.stop()
        with IndexerClient(targets, timeout=5) as client:
            client.create_generation(
                "manual",
                types_pb2.EmbeddingSpace(model_name="other", model_version=1),
                types_pb2.METRIC_COSINE,
                4,
            )
            client.activate_generation("manual", allow_pending=True, expected_active="tiny-v3")
            assert client.get_generation("", shard=1).name == "manual"
            shards[0].proc.kill()
            with pytest.raises(NotReady):
                client.activate_generation("tiny-v3", expected_active="manual")
            assert client.get_generation("", shard=1).name == "tiny-v3"  # shard 1 switched, shard 0 did not
        shards[0].start()
        with IndexerClient(targets, timeout=5) as client:
            assert client.get_generation("", shard=0).name == "manual"
            client.activate_generation("tiny-v3", expected_active="manual")
            assert [client.get_generation("", shard=i).name for i in range(2)] == ["tiny-v3", "tiny-v3"]
    finally:
        slow.close()
        for proc in controllers:
            proc.stop()
        for service in (*shards, serving):
            service.stop()
