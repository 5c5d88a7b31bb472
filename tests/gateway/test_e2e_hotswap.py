"""Contract 3 under load: a new model version is exported and a new generation built and activated while
searches run. Zero searches may fail, and every answer must come from one embedding space."""

from __future__ import annotations

import math
import random
import threading
import time

import grpc
import pytest

from cbir.v1 import search_pb2
from tests.gateway import stack as s
from tests.support.tiny_model import export_tiny_model

pytestmark = pytest.mark.slow


def test_hot_swap_under_concurrent_searches(e2e):
    with e2e.gateway.channel() as channel:
        info = e2e.gateway.stub(channel).GetServingInfo(
            search_pb2.GetServingInfoRequest(), metadata=s.AUTH, timeout=30
        )
    old_version = info.generation.space.model_version
    new_version = old_version + 1
    new_generation = f"tiny-v{new_version}"
    versions_of = {info.generation.name: old_version, new_generation: new_version}

    stop = threading.Event()
    answers: list[tuple[str, int, str, str, float]] = []  # generation, version, query id, top id, top score
    failures: list[str] = []
    ids = sorted(e2e.catalogue.images)

    def searcher(seed: int) -> None:
        rng = random.Random(seed)
        with e2e.gateway.channel() as ch:
            stub = e2e.gateway.stub(ch)
            while not stop.is_set():
                item_id = rng.choice(ids)
                by_id = rng.random() < 0.25
                request = (
                    search_pb2.SearchRequest(item_id=item_id, k=3)
                    if by_id
                    else search_pb2.SearchRequest(image=e2e.catalogue.images[item_id], k=3)
                )
                try:
                    response = stub.Search(request, metadata=s.AUTH, timeout=30)
                except grpc.RpcError as exc:
                    failures.append(f"{exc.code().name}: {exc.details()}")
                    continue
                top = response.hits[0]
                answers.append(
                    (
                        response.generation.name,
                        response.generation.space.model_version,
                        item_id if not by_id else "",
                        top.id,
                        top.score,
                    )
                )

    threads = [threading.Thread(target=searcher, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()

    def wait_until(condition, what: str) -> None:
        # Phases are ordered by answers received, not by sleeping: a busy machine only makes it slower.
        deadline = time.monotonic() + 120
        while not condition():
            assert time.monotonic() < deadline and not failures, f"waiting for {what}: {failures[:3]}"
            stop.wait(0.05)

    try:
        wait_until(lambda: len(answers) >= 8, "searches before the swap")
        export_tiny_model(e2e.model_repo, s.MODEL, version=new_version, dim=s.DIM, seed=new_version)
        s.wait_for_model_version(e2e.serving, new_version)
        swapped_at = len(answers)
        s.build_generation(
            e2e.serving,
            [e2e.indexer],
            e2e.catalogue,
            new_version,
            new_generation,
            before_activation=lambda: wait_until(
                lambda: len(answers) >= swapped_at + 8, "searches while the new generation is inactive"
            ),
        )
        activated_at = len(answers)
        wait_until(
            lambda: sum(a[0] == new_generation for a in answers[activated_at:]) >= 8,
            "searches in the new generation",
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)

    assert failures == []
    assert activated_at > swapped_at > 0, "searches must run while the new generation is built"
    seen = {generation for generation, *_ in answers}
    assert seen == set(versions_of), seen
    for generation, version, query_id, top_id, top_score in answers:
        # The answer's space is its generation's space...
        assert version == versions_of[generation]
        # ...and the query was embedded in that same space: a catalogue image finds itself at score 1.
        if query_id:
            assert top_id == query_id and math.isclose(top_score, 1.0, abs_tol=1e-4), (
                generation,
                query_id,
                top_id,
            )
    assert answers[-1][0] == new_generation
