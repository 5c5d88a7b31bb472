"""The item image route of a real gateway over real HTTPS: catalogue files under --catalogue-root only,
redirects for http(s) uris, 404 for everything else (traversal, symlinks out, other schemes); and the
HTTP port's TLS (the gRPC port's certificate) and FAILED_PRECONDITION mapping."""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import requests

from cbir.processes import wait_for_port_file
from cbir.tls_certs import make_certs, openssl_available
from cbir.v1 import indexer_pb2, search_pb2, types_pb2
from tests.gateway import stack as s
from trainer.synthetic import make_image

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not openssl_available(), reason="openssl CLI not installed (needed for test certificates)"
    ),
]


@pytest.fixture(scope="module")
def catalogue(e2e):
    """A gateway with TLS, --catalogue-root (given through a symlink) and --model-name other, over its
    own indexer holding items whose uris try every way out of the root."""
    from indexer.client import IndexerClient

    work = e2e.workdir / "catalogue-route"
    logs = work / "logs"
    logs.mkdir(parents=True)
    certs = make_certs(work / "certs")
    root = work / "root"
    (root / "sub").mkdir(parents=True)
    outside = work / "outside"
    outside.mkdir()
    files = {
        "plain": (root / "a.png", make_image(seed=1)),
        "nested": (root / "sub" / "b.jpg", make_image(seed=2, fmt="JPEG")),
        "secret": (outside / "secret.png", make_image(seed=3)),
    }
    for path, data in files.values():
        path.write_bytes(data)
    (root / "notes.csv").write_text("id,label\n")
    (root / "link-in.png").symlink_to(root / "a.png")
    (root / "link-out.png").symlink_to(outside / "secret.png")
    (root / "sub" / "up").symlink_to(outside, target_is_directory=True)
    root_link = work / "root-link"
    root_link.symlink_to(root, target_is_directory=True)
    uris = {
        "plain": str(root / "a.png"),
        "nested": str(root / "sub" / "b.jpg"),
        "via-root-link": str(root_link / "a.png"),
        "file-url": (root / "a.png").as_uri(),
        "link-in": str(root / "link-in.png"),
        "http": "https://images.example/catalogue/a.png?size=200",
        # Everything below must be 404.
        "dotdot": str(root / ".." / "outside" / "secret.png"),
        "outside": str(outside / "secret.png"),
        "link-out": str(root / "link-out.png"),
        "dir-link-out": str(root / "sub" / "up" / "secret.png"),
        "etc": "/etc/passwd",
        "file-url-out": "file:///etc/passwd",
        "file-url-host": f"file://evil.example{root / 'a.png'}",
        "relative": "../../etc/passwd",
        "not-an-image": str(root / "notes.csv"),
        "missing": str(root / "missing.png"),
        "directory": str(root / "sub"),
        "ftp": "ftp://images.example/a.png",
        "no-uri": "",
    }
    indexer_proc, indexer = s.start(
        "indexer",
        ["--data-dir", str(work / "index"), "--host", "127.0.0.1", "--metrics-port", "-1"],
        logs,
        "indexer",
    )
    gateway_proc = None
    try:
        with IndexerClient([indexer], timeout=30) as client:
            client.create_generation(
                "tiny-c",
                types_pb2.EmbeddingSpace(model_name=s.MODEL, model_version=1),
                types_pb2.METRIC_COSINE,
                s.DIM,
            )
            rng = np.random.default_rng(0)
            client.upsert(
                [
                    indexer_pb2.Record(
                        item=types_pb2.Item(id=item_id, uri=uri), vector=rng.normal(size=s.DIM).tolist()
                    )
                    for item_id, uri in uris.items()
                ],
                generation="tiny-c",
            )
            client.activate_generation("tiny-c")
        port_file = logs / "gateway.http-port"
        credentials = grpc.ssl_channel_credentials(certs.ca.read_bytes())
        gateway_proc, target = s.start(
            "gateway",
            [
                "--serving",
                e2e.serving,
                "--indexer",
                indexer,
                "--host",
                "127.0.0.1",
                "--metrics-port",
                "-1",
                "--http-port",
                "0",
                "--http-port-file",
                str(port_file),
                "--catalogue-root",
                str(root_link),
                "--model-name",
                "another-model",
                "--tls-cert",
                str(certs.server_cert),
                "--tls-key",
                str(certs.server_key),
                "--probe-period",
                "0.3",
            ],
            logs,
            "gateway",
            credentials=credentials,
        )
        gateway = s.Gateway(
            gateway_proc, target, -1, credentials, wait_for_port_file(port_file, gateway_proc, 30)
        )
        with requests.Session() as session:
            # The environment's REQUESTS_CA_BUNDLE would override session.verify.
            session.trust_env = False
            session.verify = str(certs.ca)
            yield gateway, session, files, certs
    finally:
        if gateway_proc is not None:
            gateway_proc.stop()
        indexer_proc.stop()


def _image(catalogue, item_id: str) -> requests.Response:
    gateway, session, _files, _certs = catalogue
    return session.get(f"{gateway.http_url}/v1/items/{item_id}/image", allow_redirects=False, timeout=30)


@pytest.mark.parametrize(
    "item_id, file, content_type",
    [
        ("plain", "plain", "image/png"),
        ("nested", "nested", "image/jpeg"),
        ("via-root-link", "plain", "image/png"),
        ("file-url", "plain", "image/png"),
        ("link-in", "plain", "image/png"),
    ],
)
def test_files_under_the_root_are_served(catalogue, item_id, file, content_type):
    answer = _image(catalogue, item_id)
    assert answer.status_code == 200, answer.text
    assert answer.content == catalogue[2][file][1]
    assert answer.headers["Content-Type"] == content_type


def test_http_uris_are_redirects(catalogue):
    answer = _image(catalogue, "http")
    assert answer.status_code == 302
    assert answer.headers["Location"] == "https://images.example/catalogue/a.png?size=200"


@pytest.mark.parametrize(
    "item_id",
    [
        "dotdot",
        "outside",
        "link-out",
        "dir-link-out",
        "etc",
        "file-url-out",
        "file-url-host",
        "relative",
        "not-an-image",
        "missing",
        "directory",
        "ftp",
        "no-uri",
    ],
)
def test_everything_else_is_404_without_saying_why(catalogue, item_id):
    answer = _image(catalogue, item_id)
    assert answer.status_code == 404, answer.text
    assert answer.json() == {
        "code": 5,
        "message": f"item {item_id!r} has no catalogue image this gateway may serve",
        "status": "NOT_FOUND",
        "details": [],
    }


@pytest.mark.parametrize(
    "path",
    [
        "/v1/items/..%2F..%2F..%2Fetc%2Fpasswd/image",
        "/v1/items/%2Fetc%2Fpasswd/image",
        "/v1/items/a%00b/image",
        "/v1/items/" + "x" * 300 + "/image",
        "/v1/items/../../etc/passwd",
    ],
)
def test_ids_are_ids_not_paths(catalogue, path):
    gateway, session, _files, _certs = catalogue
    answer = session.get(gateway.http_url + path, allow_redirects=False, timeout=30)
    assert answer.status_code == 404
    assert "root:" not in answer.text


def test_https_uses_the_grpc_certificate_and_plain_http_is_refused(catalogue):
    gateway, session, _files, certs = catalogue
    assert gateway.http_url.startswith("https://")
    assert session.get(gateway.http_url + "/healthz", timeout=30).json() == {"status": "ok"}
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(
            gateway.http_url + "/healthz", context=ssl.create_default_context(), timeout=10
        )
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://127.0.0.1:{gateway.http_port}/healthz", timeout=10)
    with gateway.channel() as channel:
        response = gateway.stub(channel).Search(search_pb2.SearchRequest(item_id="plain", k=3), timeout=30)
    assert response.generation.name == "tiny-c" and len(response.hits) == 3


def test_failed_precondition_is_400(catalogue, e2e):
    gateway, session, _files, _certs = catalogue
    request = search_pb2.SearchRequest(image=e2e.catalogue.images["item-001"])
    with gateway.channel() as channel, pytest.raises(grpc.RpcError) as info:
        gateway.stub(channel).Search(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    answer = session.post(
        gateway.http_url + "/v1/search:upload",
        data=e2e.catalogue.images["item-001"],
        headers={"Content-Type": "image/png"},
    )
    assert answer.status_code == 400
    assert answer.json() == {
        "code": 9,
        "message": info.value.details(),
        "status": "FAILED_PRECONDITION",
        "details": [],
    }
