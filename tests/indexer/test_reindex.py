"""`python -m indexer reindex` end to end against the real local model server and a real indexer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cbir.processes import running_service
from cbir.v1 import indexer_pb2, types_pb2
from embedder.client import EmbedderClient
from indexer.cli import main
from indexer.client import IndexerClient
from tests.support.tiny_model import export_tiny_model
from trainer.synthetic import make_image

pytestmark = pytest.mark.slow


def _catalogue(root, n, start=0):
    """A folder-per-class catalogue: <root>/<class>/<image>.png."""
    for j in range(start, start + n):
        folder = root / f"class{j % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img{j:03d}.png").write_bytes(make_image(j, label=j % 3))
    return root


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reindex")
    repo = tmp / "models"
    export_tiny_model(repo, "tiny", version=1, dim=8, seed=0)
    with (
        running_service(
            "embedder",
            "serve",
            "--model_name",
            "tiny",
            "--model_base_path",
            str(repo / "tiny"),
            "--file_system_poll_wait_seconds",
            "0.2",
            "--log-format",
            "text",
            log_dir=tmp,
        ) as (_e, serving),
        running_service(
            "indexer",
            "serve",
            "--data-dir",
            str(tmp / "index"),
            "--metrics-port",
            "-1",
            "--log-format",
            "text",
            log_dir=tmp,
        ) as (_i, indexer),
    ):
        yield tmp, repo, serving, indexer


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_reindex_builds_checks_activates_resumes_and_exports(stack, capsys):
    tmp, repo, serving, indexer = stack
    images = _catalogue(tmp / "catalogue", 24)
    common = [
        "--indexer",
        indexer,
        "--serving",
        serving,
        "--model",
        "tiny",
        "--no-progress",
        "--batch-size",
        "5",
    ]

    code, out, _ = _run(capsys, "reindex", str(images), "--dry-run", "--indexer", indexer)
    assert code == 0 and "24 items, 3 labels, 0 missing" in out and "nothing written" in out
    with IndexerClient([indexer]) as client:
        assert client.stats()[0].item_count == 0  # the dry run wrote nothing

    # An interrupted build: only part of the catalogue made it into generation "first".
    partial = tmp / "partial.csv"
    rows = ["id,path,label"] + [
        f"{p.relative_to(images)},{p},{p.parent.name}" for p in sorted(images.rglob("*.png"))[:10]
    ]
    partial.write_text("\n".join(rows) + "\n")
    code, out, err = _run(capsys, "reindex", str(partial), *common, "--generation", "first", "--no-activate")
    assert code == 0, err
    with IndexerClient([indexer]) as client:
        assert client.get_generation("first").state == indexer_pb2.GENERATION_STATE_BUILDING
    # Same generation again with the whole catalogue: resumes, embeds only what is missing.
    # (the manifest names the same ids, paths and labels as the folder layout does.)
    code, out, err = _run(capsys, "reindex", str(images), *common, "--generation", "first")
    assert code == 0, err
    assert "resuming generation first: 10 items already current, 14 to embed" in out
    assert "activated" in out

    with IndexerClient([indexer]) as client, EmbedderClient(serving, "tiny") as embedder:
        gen = client.active_generation()
        assert gen.name == "first" and gen.space.model_version == 1 and gen.item_count == 24
        assert gen.dimension == 8 and gen.pending_count == 0
        path = sorted(images.rglob("*.png"))[7]
        vector = embedder.embed([path.read_bytes()]).vectors
        hit = client.knn(vector, 1, generation=gen.name).results[0].hits[0]
        assert hit.id == str(path.relative_to(images)) and hit.label == path.parent.name
        assert hit.uri == str(path)

        # A write to the active generation while the next model version is being indexed.
        extra = tmp / "extra.png"
        extra.write_bytes(make_image(999, label=1))
        client.upsert(
            [
                indexer_pb2.Record(
                    item=types_pb2.Item(id="extra", uri=str(extra), label="class1"),
                    vector=embedder.embed([extra.read_bytes()]).vectors[0],
                )
            ]
        )

    export_tiny_model(repo, "tiny", version=2, dim=8, seed=1)
    import time

    deadline = time.monotonic() + 60
    with EmbedderClient(serving, "tiny") as embedder:
        while 2 not in {v for v, s in embedder.model_versions().items() if s == "AVAILABLE"}:
            assert time.monotonic() < deadline, "model version 2 never became available"
            time.sleep(0.2)
    code, out, err = _run(capsys, "reindex", str(images), *common, "--generation", "second")
    assert code == 0, err
    assert "1 pending embedded" in out and "(model tiny version 2" in out
    with IndexerClient([indexer]) as client:
        gen = client.active_generation()
        assert gen.name == "second" and gen.space.model_version == 2 and gen.item_count == 25
        assert client.get_generation("first").state == indexer_pb2.GENERATION_STATE_RETIRED

    export_file = tmp / "export.npz"
    code, out, err = _run(capsys, "export", "--indexer", indexer, "--output", str(export_file))
    assert code == 0, err
    data = np.load(export_file)
    assert data["vectors"].shape == (25, 8) and str(data["generation"]) == "second"
    assert int(data["model_version"]) == 2 and "extra" in set(data["ids"])
    np.testing.assert_allclose(np.linalg.norm(data["vectors"], axis=1), 1.0, rtol=1e-4)

    code, out, _ = _run(capsys, "generations", "list", "--indexer", indexer)
    assert code == 0 and "second\tactive\ttiny:2" in out and "first\tretired\ttiny:1" in out
    code, out, _ = _run(capsys, "generations", "drop", "first", "--indexer", indexer)
    assert code == 0
    code, _, err = _run(capsys, "generations", "drop", "second", "--indexer", indexer)
    assert code == 2 and "active" in err
    code, out, _ = _run(capsys, "stats", "--indexer", indexer)
    assert code == 0 and json.loads(out)[0]["itemCount"] == "25"
    code, out, _ = _run(capsys, "delete", "extra", "--indexer", indexer)
    assert code == 0 and "deleted 1" in out


def test_reindex_user_mistakes_are_messages_not_tracebacks(stack, capsys, tmp_path):
    _tmp, _repo, serving, indexer = stack
    common = ["--indexer", indexer, "--serving", serving, "--no-progress"]
    code, _, err = _run(capsys, "reindex", str(tmp_path / "nothing"), *common, "--model", "tiny")
    assert code == 2 and "error:" in err and "Traceback" not in err
    images = _catalogue(tmp_path / "cat", 3)
    code, _, err = _run(capsys, "reindex", str(images), *common, "--model", "no-such-model")
    assert code == 2 and "error:" in err and "no-such-model" in err
    code, _, err = _run(capsys, "reindex", str(images), *common, "--model", "tiny", "--model-version", "9")
    assert code == 2 and "9" in err
    (images / "class0" / "broken.png").write_bytes(b"not an image")
    code, out, err = _run(
        capsys, "reindex", str(images), *common, "--model", "tiny", "--generation", "broken"
    )
    assert code == 1 and "1 failed" in out and "broken.png" in err and "not activating" in err
