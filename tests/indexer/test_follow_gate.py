"""The rollout's parts without processes: figures against hand-worked values, the quality gate, partitions,
the evaluation set, and the indexer's record of decisions (servicer on a real gRPC server, restarts)."""

from __future__ import annotations

import math

import grpc
import pytest

from cbir.errors import InvalidInput
from cbir.processes import wait_for_health
from cbir.server import ServerOptions
from cbir.sharding import shard_of
from cbir.v1 import indexer_pb2, indexer_pb2_grpc, types_pb2
from indexer.client import IndexerClient
from indexer.core import IndexerConfig, IndexerCore
from indexer.reindex import Partition
from indexer.rollout import Evaluation, QualityGate, compare, figures, load_eval_set, recorded_figures
from indexer.server import serve
from trainer.synthetic import make_image

T, F = True, False


# --------------------------------------------------------------------------- figures


def test_figures_match_hand_worked_values():
    relevance = [
        (T, F, F, F, F, F, F, F, F, F),  # first hit relevant: AP@10 = 1
        (F, T, F, T, F, F, F, F, F, F),  # relevant at 2 and 4: AP = (1/2 + 2/4) / 2 = 0.5
        (F,) * 10,  # nothing relevant: AP = 0, no recall
        (F, F, F, F, F, F, T, F, F, F),  # relevant at 7 only: AP = 1/7; recall@10 only
    ]
    got = figures(relevance)
    assert got["recall@1"] == pytest.approx(1 / 4)
    assert got["recall@5"] == pytest.approx(2 / 4)
    assert got["recall@10"] == pytest.approx(3 / 4)
    assert got["map@10"] == pytest.approx((1 + 0.5 + 0 + 1 / 7) / 4)
    with pytest.raises(InvalidInput):
        figures([])


def test_compare_uses_the_queries_both_generations_answered():
    candidate = Evaluation("new", 2, {"a": (T,), "b": (F,), "c": (T,)})
    active = Evaluation("old", 1, {"a": (F,), "b": (F,), "d": (T,)})
    cand, act, n = compare(candidate, active)
    assert n == 2 and cand["recall@1"] == 0.5 and act["recall@1"] == 0.0
    cand, act, n = compare(candidate, None)
    assert n == 3 and act is None and cand["recall@1"] == pytest.approx(2 / 3)


# --------------------------------------------------------------------------- gate


def test_gate_passes_within_the_tolerance_and_fails_beyond_it():
    gate = QualityGate(tolerance=0.02)
    active = {"recall@1": 0.90, "map@10": 0.80}
    passed, reason = gate.judge({"recall@1": 0.885, "map@10": 0.95}, active)
    assert passed and "recall@1 0.8850 >= active 0.9000 - 0.0200" in reason
    passed, reason = gate.judge({"recall@1": 0.95, "map@10": 0.77}, active)
    assert not passed
    assert reason.startswith(
        "map@10 0.7700 is 0.0300 below the active generation's 0.8000 (tolerance 0.0200)"
    )


def test_gate_floors_apply_with_and_without_an_active_generation():
    gate = QualityGate(tolerance=0.5, min_recall_at_1=0.6, min_map_at_10=0.5)
    passed, reason = gate.judge({"recall@1": 0.55, "map@10": 0.9}, {"recall@1": 0.5, "map@10": 0.5})
    assert not passed and "recall@1 0.5500 is below the floor 0.6000" in reason
    passed, reason = gate.judge({"recall@1": 0.7, "map@10": 0.5}, None)
    assert passed and "floor" in reason and "active" not in reason
    assert not gate.judge({"recall@1": 0.7, "map@10": 0.49}, None)[0]


def test_recorded_figures_are_those_of_the_generations_latest_passed_rollout():
    def decision(generation, verdict, decided, **metrics):
        d = indexer_pb2.RolloutDecision(generation=generation, verdict=verdict, candidate_metrics=metrics)
        d.decided_at.FromSeconds(decided)
        return d

    passed, rejected = indexer_pb2.ROLLOUT_VERDICT_PASSED, indexer_pb2.ROLLOUT_VERDICT_REJECTED
    decisions = [
        decision("g2", passed, 10, **{"recall@1": 0.5, "map@10": 0.4, "recall@5": 0.9}),
        decision("g2", passed, 30, **{"recall@1": 0.8, "map@10": 0.7}),  # the same generation, later
        decision("g2", rejected, 40, **{"recall@1": 0.1, "map@10": 0.1}),
        decision("g3", passed, 50, **{"recall@1": 0.9, "map@10": 0.9}),
        decision("g4", passed, 60, **{"recall@1": 0.9}),  # an incomplete record is not a baseline
    ]
    assert recorded_figures(decisions, "g2") == pytest.approx({"recall@1": 0.8, "map@10": 0.7})
    assert recorded_figures(decisions, "g4") is None
    assert recorded_figures(decisions, "activated-by-hand") is None


@pytest.mark.parametrize("field", ["tolerance", "min_recall_at_1", "min_map_at_10"])
@pytest.mark.parametrize("value", [-0.1, 1.5, math.nan])
def test_gate_settings_out_of_range_are_refused(field, value):
    with pytest.raises(InvalidInput, match=field.replace("_", "-")):
        QualityGate(**{field: value})


# --------------------------------------------------------------------------- partitions


@pytest.mark.parametrize("text", ["3/3", "1/0", "a/b", "-1/2", "1", "", "0/3/1"])
def test_bad_partitions_are_refused(text):
    with pytest.raises(InvalidInput, match="partition"):
        Partition.parse(text)


def test_partitions_cover_every_id_exactly_once_and_follow_the_stable_hash():
    assert Partition.parse(" 2 / 5 ") == Partition(2, 5) and str(Partition(2, 5)) == "2/5"
    ids = [f"item-{i}" for i in range(1000)]
    for n in (1, 2, 3, 7):
        owners = [[p for p in range(n) if Partition(p, n).owns(i)] for i in ids]
        assert all(len(o) == 1 for o in owners)
        assert [o[0] for o in owners] == [shard_of(i, n) for i in ids]
        sizes = [sum(1 for o in owners if o[0] == p) for p in range(n)]
        assert min(sizes) > 0.7 * len(ids) / n  # roughly even


# --------------------------------------------------------------------------- evaluation set


def test_eval_set_spreads_a_cap_evenly_and_reports_unreadable_files(tmp_path):
    rows = ["id,path,label"]
    for i in range(20):
        (tmp_path / f"{i}.png").write_bytes(make_image(i, label=i % 2))
        rows.append(f"q{i:02d},{i}.png,c{i % 2}")
    rows.append("unlabelled,0.png,")
    rows.append("q99,missing.png,c1")
    (tmp_path / "eval.csv").write_text("\n".join(rows) + "\n")
    full = load_eval_set(str(tmp_path / "eval.csv"))
    assert len(full) == 20 and [q for q, _ in full.unreadable] == ["q99"]
    assert all(q.label for q in full.queries) and full.images[3] == (tmp_path / "3.png").read_bytes()
    capped = load_eval_set(str(tmp_path / "eval.csv"), max_queries=5)
    again = load_eval_set(str(tmp_path / "eval.csv"), max_queries=5)
    assert [q.id for q in capped.queries] == [q.id for q in again.queries]
    # 21 labelled rows (q99's file is missing): 5 evenly spread picks, q99 among them.
    assert [q.id for q in capped.queries] == ["q00", "q05", "q10", "q15"]
    assert [q for q, _ in capped.unreadable] == ["q99"]
    (tmp_path / "none.csv").write_text("id,path,label\nx,0.png,\n")
    with pytest.raises(InvalidInput, match="no labelled images"):
        load_eval_set(str(tmp_path / "none.csv"))


# --------------------------------------------------------------------------- the indexer's record


def _decision(generation: str, version: int, verdict: int, **extra) -> indexer_pb2.RolloutDecision:
    return indexer_pb2.RolloutDecision(
        model_name="m",
        model_version=version,
        generation=generation,
        verdict=verdict,
        reason="because",
        candidate_metrics={"recall@1": 0.5, "map@10": 0.25},
        **extra,
    )


@pytest.fixture
def indexer(tmp_path):
    """An IndexerCore on a real gRPC server; ``restart()`` closes it and serves the same folder again."""
    state = {}

    def start():
        core = IndexerCore(IndexerConfig(tmp_path / "index"))
        running = serve(
            ServerOptions(service_name="indexer-test", host="127.0.0.1", port=0, metrics_port=-1), core
        )
        target = f"127.0.0.1:{running.port}"
        wait_for_health(target, "", timeout=30)
        state.update(running=running, client=IndexerClient([target], timeout=10))
        return state["client"]

    def restart():
        state["client"].close()
        state["running"].stop(0)
        return start()

    client = start()
    yield client, restart
    state["client"].close()
    state["running"].stop(0)


def _space(version: int) -> types_pb2.EmbeddingSpace:
    return types_pb2.EmbeddingSpace(model_name="m", model_version=version)


def test_decisions_are_recorded_listed_kept_across_restarts_and_drops(indexer):
    client, restart = indexer
    for version in (1, 2, 3):
        client.create_generation(f"m-v{version}", _space(version), types_pb2.METRIC_COSINE, 4)
    client.activate_generation("m-v1", allow_pending=True)
    client.record_rollout(_decision("m-v2", 2, indexer_pb2.ROLLOUT_VERDICT_PASSED))
    rejected = _decision("m-v3", 3, indexer_pb2.ROLLOUT_VERDICT_REJECTED, active_generation="m-v1")
    rejected.active_metrics["recall@1"] = 0.9
    rejected.decided_at.FromSeconds(1_800_000_000)
    assert client.record_rollout(rejected) == rejected

    client = restart()
    gen = client.get_generation("m-v3")
    assert gen.state == indexer_pb2.GENERATION_STATE_REJECTED and gen.rollout == rejected
    assert client.get_generation("m-v2").rollout.verdict == indexer_pb2.ROLLOUT_VERDICT_PASSED
    assert not client.get_generation("m-v1").HasField("rollout")
    assert [d.model_version for d in client.list_rollouts("m")] == [3, 2]
    assert client.list_rollouts("other") == []

    # The same version again replaces its decision (the controller records the activation so).
    passed = _decision("m-v2", 2, indexer_pb2.ROLLOUT_VERDICT_PASSED)
    passed.activated_at.FromSeconds(1_800_000_100)
    client.record_rollout(passed)
    client.activate_generation("m-v2", allow_pending=True)
    assert client.get_generation("m-v2").rollout.HasField("activated_at")
    # A person may still activate a rejected generation (an override); its decision stays.
    client.activate_generation("m-v3", allow_pending=True)
    assert client.get_generation("m-v3").state == indexer_pb2.GENERATION_STATE_ACTIVE
    client.activate_generation("m-v2")
    client.drop_generation("m-v3")
    assert [d.generation for d in client.list_rollouts()] == ["m-v3", "m-v2"]


@pytest.mark.parametrize(
    ("change", "code", "words"),
    [
        ({"model_name": ""}, grpc.StatusCode.INVALID_ARGUMENT, "model_name is required"),
        ({"model_version": 0}, grpc.StatusCode.INVALID_ARGUMENT, "model_version must be >= 1"),
        ({"verdict": 0}, grpc.StatusCode.INVALID_ARGUMENT, "verdict must be"),
        ({"generation": ""}, grpc.StatusCode.INVALID_ARGUMENT, "generation is required"),
        ({"generation": "nope"}, grpc.StatusCode.NOT_FOUND, "does not exist"),
        ({"candidate_metrics": {"recall@1": math.nan}}, grpc.StatusCode.INVALID_ARGUMENT, "finite"),
        ({"generation": "m-v1", "verdict": 2}, grpc.StatusCode.FAILED_PRECONDITION, "is active"),
    ],
)
def test_bad_decisions_get_a_clear_status(indexer, change, code, words):
    client, _restart = indexer
    client.create_generation("m-v1", _space(1), types_pb2.METRIC_COSINE, 4)
    client.activate_generation("m-v1", allow_pending=True)
    client.create_generation("m-v2", _space(2), types_pb2.METRIC_COSINE, 4)
    fields = {
        "model_name": "m",
        "model_version": 2,
        "generation": "m-v2",
        "verdict": indexer_pb2.ROLLOUT_VERDICT_PASSED,
        **change,
    }
    request = indexer_pb2.RecordRolloutRequest(decision=indexer_pb2.RolloutDecision(**fields))
    with grpc.insecure_channel(client.targets[0]) as channel, pytest.raises(grpc.RpcError) as info:
        indexer_pb2_grpc.IndexerServiceStub(channel).RecordRollout(request, timeout=10)
    assert info.value.code() == code and words in info.value.details()
    assert client.list_rollouts() == []
    assert client.get_generation("m-v1").state == indexer_pb2.GENERATION_STATE_ACTIVE


# --------------------------------------------------------------------------- command line


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--eval", "EVAL"], "--model is required"),
        (["--model", "m"], "--eval is required"),
        (["--model", "m", "--eval", "MISSING"], "does not exist"),
        (["--model", "m", "--eval", "EVAL", "--tolerance", "2"], "tolerance must be in [0, 1]"),
        (["--model", "m", "--eval", "EVAL", "--keep-generations", "-1"], "--keep-generations must be >= 0"),
        (["--model", "m", "--eval", "EVAL", "--reindex-job", "t"], "not running in a pod"),
    ],
)
def test_follow_mistakes_are_messages_not_tracebacks(tmp_path, capsys, monkeypatch, flags, words):
    from indexer.cli import main

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.png").write_bytes(make_image(1, label=1))
    flags = [
        str(tmp_path) if f == "EVAL" else str(tmp_path / "missing") if f == "MISSING" else f for f in flags
    ]
    assert main(["follow", "--indexer", "127.0.0.1:1", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and "Traceback" not in err
