"""The rollout controller end to end: real model server, indexer, gateway and `python -m indexer follow` processes.

Version 1 (a weak model) is rolled out onto an empty index (floors only); version 2 (a better one) is
reindexed, evaluated against version 1 and activated while searches run (none fails, none mixes two
embedding spaces); version 3 (a broken model) is rejected with its figures and version 2 keeps
serving; a restarted controller (without --catalogue) redoes no decision, then rolls out version 4 and
drops old generations.
"""

from __future__ import annotations

import math
import random
import re
import threading
import time
import urllib.request

import grpc
import pytest

from cbir.processes import running_service
from cbir.v1 import indexer_pb2, search_pb2
from indexer.cli import main
from indexer.client import IndexerClient
from tests.gateway import stack as s
from tests.support.tiny_model import export_tiny_model
from trainer.synthetic import make_image

pytestmark = pytest.mark.slow

N_ITEMS = 48


def write_catalogue(root, n: int, labels: int = s.LABELS) -> dict[str, bytes]:
    """A folder-per-class catalogue; returns id -> image bytes (ids as cbir.catalogue names them)."""
    images = {}
    for i in range(n):
        label = i % labels
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        data = make_image(seed=i, size=32, label=label)
        (folder / f"item-{i:04d}.png").write_bytes(data)
        images[f"class{label}/item-{i:04d}.png"] = data
    return images


def follow_args(indexer: str, serving: str, catalogue, *extra: str) -> list[str]:
    return [
        "follow",
        "--indexer",
        indexer,
        "--serving",
        serving,
        "--model",
        s.MODEL,
        "--catalogue",
        str(catalogue),
        "--eval",
        str(catalogue),
        "--poll-seconds",
        "0.2",
        "--backoff-initial",
        "0.2",
        "--backoff-max",
        "1",
        "--host",
        "127.0.0.1",
        "--metrics-port",
        "0",
        "--log-format",
        "json",
        *extra,
    ]


def decisions(indexer: str) -> dict[int, indexer_pb2.RolloutDecision]:
    with IndexerClient([indexer]) as client:
        return {d.model_version: d for d in client.list_rollouts(s.MODEL)}


def settled(indexer: str, version: int) -> indexer_pb2.RolloutDecision | None:
    """The decision about ``version`` once final: rejected, or passed and activated."""
    d = decisions(indexer).get(version)
    if d is not None and (d.verdict == indexer_pb2.ROLLOUT_VERDICT_REJECTED or d.HasField("activated_at")):
        return d
    return None


def wait_for(condition, what: str, timeout: float = 120.0, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and not proc.alive():
            raise AssertionError(
                f"the controller exited while waiting for {what}:\n{proc.log_text()[-4000:]}"
            )
        time.sleep(0.2)
    tail = proc.log_text()[-4000:] if proc is not None else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def metrics_text(proc) -> str:
    port = int(re.search(r'"metrics_port": (\d+)', proc.log_text())[1])
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        return answer.read().decode()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("follow")
    repo = tmp / "models"
    # Version 1 is a weaker model than version 2 will be (3 dimensions: some classes overlap).
    export_tiny_model(repo, s.MODEL, version=1, dim=3, seed=0)
    config = tmp / "models.config"
    config.write_text(s.model_config(repo))
    catalogue = tmp / "catalogue"
    images = write_catalogue(catalogue, N_ITEMS)
    with (
        running_service(
            "embedder",
            "serve",
            "--model_config_file",
            str(config),
            "--file_system_poll_wait_seconds",
            "0.3",
            "--host",
            "127.0.0.1",
            "--log-format",
            "text",
            log_dir=tmp,
        ) as (_e, serving),
        running_service(
            "indexer",
            "serve",
            "--data-dir",
            str(tmp / "index"),
            "--host",
            "127.0.0.1",
            "--metrics-port",
            "-1",
            "--log-format",
            "text",
            log_dir=tmp,
        ) as (_i, indexer),
    ):
        yield tmp, repo, catalogue, images, serving, indexer


def test_follow_activates_a_better_version_and_rejects_a_broken_one(world, capsys):
    tmp, repo, catalogue, images, serving, indexer = world
    args = follow_args(indexer, serving, catalogue, "--keep-generations", "1", "--min-recall-at-1", "0.5")
    with running_service("indexer", *args, log_dir=tmp, timeout=120) as (controller, _target):
        # Version 1 onto an empty index: no generation to compare with, so the floors decide.
        first = wait_for(lambda: settled(indexer, 1), "version 1's decision", proc=controller)
        assert first.verdict == indexer_pb2.ROLLOUT_VERDICT_PASSED and first.active_generation == ""
        assert "floors only" in first.reason and first.candidate_metrics["recall@1"] >= 0.5
        assert first.evaluation_queries == N_ITEMS

        gateway = s.start_gateway(tmp, "gateway", serving, [indexer], "--generation-ttl", "0.2")
        stop = threading.Event()
        answers: list[tuple[str, int, str, float]] = []  # generation, version, query id, its own score
        failures: list[str] = []
        ids = sorted(images)

        def searcher(seed: int) -> None:
            rng = random.Random(seed)
            with gateway.channel() as channel:
                stub = gateway.stub(channel)
                while not stop.is_set():
                    item_id = rng.choice(ids)
                    try:
                        response = stub.Search(
                            search_pb2.SearchRequest(image=images[item_id], k=3), timeout=30
                        )
                    except grpc.RpcError as exc:
                        failures.append(f"{exc.code().name}: {exc.details()}")
                        continue
                    own = [h.score for h in response.hits if h.id == item_id]
                    generation = response.generation
                    answers.append(
                        (generation.name, generation.space.model_version, item_id, own[0] if own else 0.0)
                    )

        threads = [threading.Thread(target=searcher, args=(i,)) for i in range(3)]
        try:
            for thread in threads:
                thread.start()
            wait_for(lambda: len(answers) > 5, "searches on version 1")
            export_tiny_model(repo, s.MODEL, version=2, dim=s.DIM, seed=1)
            second = wait_for(lambda: settled(indexer, 2), "version 2's decision", proc=controller)
            activated_at = len(answers)
            export_tiny_model(repo, s.MODEL, version=3, dim=s.DIM, seed=3, broken=True)
            third = wait_for(lambda: settled(indexer, 3), "version 3's decision", proc=controller)
            wait_for(lambda: len(answers) > activated_at + 20, "searches after the rejection")
        finally:
            stop.set()
            for thread in threads:
                thread.join(60)
            gateway.proc.stop()

        # Version 2 was compared with version 1 on the same queries and activated.
        assert second.verdict == indexer_pb2.ROLLOUT_VERDICT_PASSED, second.reason
        assert second.active_generation == "tiny-v1" and second.active_model_version == 1
        assert second.candidate_metrics["map@10"] > second.active_metrics["map@10"]  # better
        assert set(second.active_metrics) == set(second.candidate_metrics) >= {"recall@1", "map@10"}
        assert second.evaluation_queries == N_ITEMS and second.reindex_seconds > 0
        assert second.evaluation_seconds > 0 and second.activation_seconds > 0
        # Version 3 was rejected with both generations' figures and the reason; version 2 serves on.
        assert third.verdict == indexer_pb2.ROLLOUT_VERDICT_REJECTED
        assert third.active_generation == "tiny-v2" and not third.HasField("activated_at")
        assert third.candidate_metrics["recall@1"] < third.active_metrics["recall@1"] - 0.02
        assert "below the active generation's" in third.reason
        with IndexerClient([indexer]) as client:
            assert client.active_generation().name == "tiny-v2"
            states = {g.name: g.state for g in client.list_generations()}
        assert states["tiny-v3"] == indexer_pb2.GENERATION_STATE_REJECTED
        # --keep-generations 1: version 1's generation was kept after version 2's activation.
        assert states["tiny-v1"] == indexer_pb2.GENERATION_STATE_RETIRED

        # Searches: none failed, each answer came from one space, and that space embedded the query.
        assert failures == []
        versions = {"tiny-v1": 1, "tiny-v2": 2}
        assert {generation for generation, *_ in answers} == set(versions)
        for generation, version, query_id, own_score in answers:
            assert version == versions[generation]
            # Embedded in another space, a catalogue image would not find itself at score 1.
            assert math.isclose(own_score, 1.0, abs_tol=1e-4), (generation, query_id)
        assert answers[-1][0] == "tiny-v2"

        # Structured log events and Prometheus metrics of every decision.
        log = controller.log_text()
        assert log.count('"msg": "rollout decision"') == 3
        assert log.count('"msg": "rollout activated"') == 2
        text = metrics_text(controller)
        assert 'cbir_rollout_decisions_total{model="tiny",verdict="passed"} 2.0' in text
        assert 'cbir_rollout_decisions_total{model="tiny",verdict="rejected"} 1.0' in text
        assert 'cbir_rollout_active_model_version{model="tiny"} 2.0' in text
        assert re.search(r'cbir_rollout_phase_seconds_count\{phase="evaluation"\} 3\.0', text)

    # A restarted controller finds every version decided and decides nothing again. This one has no
    # --catalogue: the active generation's items are what it reindexes.
    before = decisions(indexer)
    at = args.index("--catalogue")
    no_catalogue = args[:at] + args[at + 2 :]
    with running_service("indexer", *no_catalogue, log_dir=tmp, timeout=60) as (again, _target):
        wait_for(lambda: 'cbir_rollout_state{state="idle"} 1.0' in metrics_text(again), "an idle controller")
        time.sleep(1.0)  # a few more polls
        assert '"msg": "rollout decision"' not in again.log_text()
        assert '"msg": "rolling out a new model version"' not in again.log_text()
        assert decisions(indexer) == before

        export_tiny_model(repo, s.MODEL, version=4, dim=s.DIM, seed=4)
        fourth = wait_for(lambda: settled(indexer, 4), "version 4's decision", proc=again)
        assert fourth.verdict == indexer_pb2.ROLLOUT_VERDICT_PASSED and fourth.active_generation == "tiny-v2"
        assert fourth.evaluation_queries == N_ITEMS
        # Judged against version 2 even when Serving already unloaded it (two versions loaded: 3, 4):
        # then against the figures recorded at version 2's rollout, never by the floors alone.
        assert "floors only" not in fourth.reason and set(fourth.active_metrics) >= {"recall@1", "map@10"}
        if "no longer served" in fourth.reason:
            assert "figures recorded at the rollout of tiny-v2" in fourth.reason
            assert (
                dict(fourth.active_metrics).items()
                >= {k: second.candidate_metrics[k] for k in ("recall@1", "map@10")}.items()
            )
        with IndexerClient([indexer]) as client:
            states = {g.name: g.state for g in client.list_generations()}
            assert client.get_generation("tiny-v4").item_count == N_ITEMS
        # --keep-generations 1: the newest retired one (the rollback target) stays; v1 and the
        # rejected v3 were dropped, their decisions were not.
        assert states == {
            "tiny-v4": indexer_pb2.GENERATION_STATE_ACTIVE,
            "tiny-v2": indexer_pb2.GENERATION_STATE_RETIRED,
        }
        assert sorted(decisions(indexer)) == [1, 2, 3, 4]

    # `generations list` shows every decision with the figures of both generations.
    code = main(["generations", "list", "--indexer", indexer])
    out = capsys.readouterr().out
    assert code == 0
    assert "tiny-v4\tactive\ttiny:4" in out and "tiny-v2\tretired\ttiny:2" in out
    assert re.search(r"rollout passed, activated .*\(vs tiny-v2, version 2\)", out)
    dropped = out.split("rollout decisions about dropped generations:")[1]
    assert re.search(
        r"tiny-v3\ttiny:3\trejected, decided .*recall@1 0\.\d+ vs [01]\.\d+, .*\(vs tiny-v2", dropped
    )
    assert "tiny-v1\ttiny:1\tpassed, activated" in dropped and "floors only" in dropped
