"""Two TLS indexer shards and a TLS model server behind a TLS gateway with client certificates and a keys
file: same answers as one shard, transport security, and health that follows the dependencies."""

from __future__ import annotations

import os
import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cbir.tls import ClientTLS
from cbir.tls_certs import make_certs, openssl_available
from cbir.v1 import search_pb2, types_pb2
from tests.gateway import stack as s

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not openssl_available(), reason="openssl CLI not installed"),
]

KEY = "shard-stack-key-0001"


@pytest.fixture(scope="module")
def sharded(e2e):
    from indexer.client import IndexerClient

    workdir = e2e.workdir / "sharded"
    logs = workdir / "logs"
    logs.mkdir(parents=True)
    certs = make_certs(workdir / "certs")
    server_tls = ["--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key)]
    ca_only = grpc.ssl_channel_credentials(certs.ca.read_bytes())
    with IndexerClient([e2e.indexer]) as single:
        active = single.active_generation()
    shards: list[list] = []  # [process, target] of indexer shard i
    servings: list = []
    try:
        for shard in range(2):
            proc, target = s.start(
                "indexer",
                [
                    "--data-dir",
                    str(workdir / f"shard{shard}"),
                    "--shard-id",
                    str(shard),
                    "--shard-count",
                    "2",
                    "--host",
                    "127.0.0.1",
                    "--metrics-port",
                    "-1",
                    *server_tls,
                ],
                logs,
                f"indexer{shard}",
                credentials=ca_only,
            )
            shards.append([proc, target])
        targets = [t for _, t in shards]
        indexer_tls = ClientTLS(ca_file=str(certs.ca), server_name="localhost")
        s.build_generation(
            e2e.serving,
            targets,
            e2e.catalogue,
            active.space.model_version,
            active.name,
            indexer_tls=indexer_tls,
        )
        # Its own model server, over TLS, on the same model repository (exercises --serving-tls-*).
        serving_proc, serving = s.start(
            "embedder",
            ["--model_config_file", str(e2e.workdir / "models.config"), "--host", "127.0.0.1", *server_tls],
            logs,
            "embedder-tls",
            credentials=ca_only,
        )
        servings.append(serving_proc)
        (workdir / "keys").write_text(f"# gateway keys\n{KEY}:search+info\n")
        client_creds = grpc.ssl_channel_credentials(
            certs.ca.read_bytes(), certs.client_key.read_bytes(), certs.client_cert.read_bytes()
        )
        gateway = s.start_gateway(
            logs,
            "gateway-sharded",
            serving,
            targets,
            *server_tls,
            "--tls-client-ca",
            str(certs.ca),
            "--serving-tls-ca",
            str(certs.ca),
            "--serving-tls-server-name",
            "localhost",
            "--indexer-tls-ca",
            str(certs.ca),
            "--indexer-tls-server-name",
            "localhost",
            "--api-keys-file",
            str(workdir / "keys"),
            credentials=client_creds,
        )
        yield gateway, shards, certs, active, logs, serving_proc
        gateway.proc.stop()
    finally:
        for proc in [*servings, *(p for p, _ in shards)]:
            proc.stop()


AUTH = (("authorization", f"Bearer {KEY}"),)


def test_items_really_are_split_over_both_shards(e2e, sharded):
    split = s.split_by_shard(sorted(e2e.catalogue.items), 2)
    assert len(split[0]) >= 5 and len(split[1]) >= 5


def test_two_shards_answer_exactly_like_one(e2e, sharded):
    gateway, _, _, active, _, _ = sharded
    flt = types_pb2.Filter(attributes=[types_pb2.AttributeFilter(key="colour", values=["green"])])
    requests = [
        search_pb2.SearchRequest(image=e2e.catalogue.images[i], k=10)
        for i in ("item-000", "item-017", "item-033")
    ]
    requests += [
        search_pb2.SearchRequest(item_id="item-008", k=15),
        search_pb2.SearchRequest(image=e2e.catalogue.images["item-021"], k=40, filter=flt),
        search_pb2.SearchRequest(image=e2e.catalogue.images["item-005"], k=40, min_score=0.3),
    ]
    with e2e.gateway.channel() as one_channel, gateway.channel() as two_channel:
        one, two = e2e.gateway.stub(one_channel), gateway.stub(two_channel)
        for request in requests:
            a = one.Search(request, metadata=s.AUTH, timeout=30)
            b = two.Search(request, metadata=AUTH, timeout=30)
            assert a.generation.space == b.generation.space == active.space
            assert [h.id for h in a.hits] == [h.id for h in b.hits]
            assert [round(h.score, 5) for h in a.hits] == [round(h.score, 5) for h in b.hits]
            assert [dict(h.attributes) for h in a.hits] == [dict(h.attributes) for h in b.hits]
        info = two.GetServingInfo(search_pb2.GetServingInfoRequest(), metadata=AUTH, timeout=30)
        assert info.shard_count == 2 and info.item_count == len(e2e.catalogue.items)


def test_tls_with_client_certificates_is_enforced(e2e, sharded):
    gateway, _, certs, _, _, _ = sharded
    request = search_pb2.SearchRequest(image=e2e.catalogue.images["item-001"], k=1)
    no_cert = grpc.ssl_channel_credentials(certs.ca.read_bytes())
    with grpc.secure_channel(
        gateway.target, no_cert, options=[("grpc.ssl_target_name_override", "localhost")]
    ) as ch:
        with pytest.raises(grpc.RpcError) as info:
            gateway.stub(ch).Search(request, metadata=AUTH, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(gateway.target) as ch:
        with pytest.raises(grpc.RpcError) as info:
            gateway.stub(ch).Search(request, metadata=AUTH, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    with gateway.channel() as ch:
        assert gateway.stub(ch).Search(request, metadata=AUTH, timeout=10).hits[0].id == "item-001"
        with pytest.raises(grpc.RpcError) as info:
            gateway.stub(ch).Search(request, metadata=s.AUTH, timeout=10)  # a key of the other gateway
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _health(gateway) -> int:
    with gateway.channel() as ch:
        return (
            health_pb2_grpc.HealthStub(ch)
            .Check(health_pb2.HealthCheckRequest(service="cbir.v1.SearchService"), timeout=5)
            .status
        )


def _wait_health(gateway, expected, timeout=20.0) -> int:
    deadline = time.monotonic() + timeout
    status = _health(gateway)
    while status != expected and time.monotonic() < deadline:
        time.sleep(0.1)
        status = _health(gateway)
    return status


def test_a_hung_shard_gives_deadline_exceeded_not_a_hang(e2e, sharded):
    gateway, shards, _, _, _, _ = sharded
    SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert _wait_health(gateway, SERVING) == SERVING
    proc = shards[1][0]
    os.kill(proc.pid, signal.SIGSTOP)  # accepts connections (kernel), answers nothing
    try:
        request = search_pb2.SearchRequest(image=e2e.catalogue.images["item-004"], k=3)
        with gateway.channel() as ch:
            # The caller's own deadline bounds the call; what matters is the code it gets.
            with pytest.raises(grpc.RpcError) as info:
                gateway.stub(ch).Search(request, metadata=AUTH, timeout=1.5)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert _wait_health(gateway, NOT_SERVING) == NOT_SERVING
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert _wait_health(gateway, SERVING) == SERVING


def test_a_hung_model_server_gives_deadline_exceeded_and_flips_health(e2e, sharded):
    gateway, serving_proc = sharded[0], sharded[-1]
    SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert _wait_health(gateway, SERVING) == SERVING
    os.kill(serving_proc.pid, signal.SIGSTOP)
    try:
        request = search_pb2.SearchRequest(image=e2e.catalogue.images["item-009"], k=3)
        with gateway.channel() as ch:
            # The caller's own deadline bounds the call; what matters is the code it gets.
            with pytest.raises(grpc.RpcError) as info:
                gateway.stub(ch).Search(request, metadata=AUTH, timeout=1.5)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert _wait_health(gateway, NOT_SERVING) == NOT_SERVING
    finally:
        os.kill(serving_proc.pid, signal.SIGCONT)
    assert _wait_health(gateway, SERVING) == SERVING
    with gateway.channel() as ch:
        assert gateway.stub(ch).Search(request, metadata=AUTH, timeout=20).hits[0].id == "item-009"


def test_health_follows_a_shard_going_down_and_coming_back(e2e, sharded):
    gateway, shards, certs, _, logs, _ = sharded
    SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert _wait_health(gateway, SERVING) == SERVING
    proc, target = shards[1]
    proc.stop()
    assert _wait_health(gateway, NOT_SERVING) == NOT_SERVING
    request = search_pb2.SearchRequest(image=e2e.catalogue.images["item-002"], k=3)
    with gateway.channel() as ch:
        with pytest.raises(grpc.RpcError) as info:
            gateway.stub(ch).Search(request, metadata=AUTH, timeout=20)
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        # The gateway answered itself (within its dependency timeout), not the caller's deadline.
        assert info.value.details() != "Deadline Exceeded", "a dead shard must not hang searches"
    port = target.rsplit(":", 1)[1]
    restarted, _ = s.start(
        "indexer",
        [
            "--data-dir",
            str(e2e.workdir / "sharded" / "shard1"),
            "--shard-id",
            "1",
            "--shard-count",
            "2",
            "--host",
            "127.0.0.1",
            "--metrics-port",
            "-1",
            "--tls-cert",
            str(certs.server_cert),
            "--tls-key",
            str(certs.server_key),
        ],
        logs,
        "indexer1-restarted",
        port=int(port),
        credentials=grpc.ssl_channel_credentials(certs.ca.read_bytes()),
    )
    shards[1][0] = restarted
    assert _wait_health(gateway, SERVING) == SERVING
    with gateway.channel() as ch:
        assert gateway.stub(ch).Search(request, metadata=AUTH, timeout=20).hits[0].id == "item-002"
