"""Background prober that keeps the gateway's health in step with its dependencies.

SERVING only while: shard 0 names an active generation, every indexer shard answers Stats, and
Serving reports the generation's model version AVAILABLE. Otherwise NOT_SERVING, so Kubernetes stops
routing searches here until the dependencies come back (probed again every ``period`` seconds).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from cbir.errors import CbirError
from gateway import metrics
from gateway.search import Embedder, Indexer, SearchCore

log = logging.getLogger(__name__)


class DependencyProber:
    def __init__(
        self,
        core: SearchCore,
        embedder_for: Callable[[str], Embedder],
        indexer: Indexer,
        set_serving: Callable[[bool], None],
        *,
        period: float = 2.0,
        timeout: float = 2.0,
    ) -> None:
        self._core = core
        self._embedder_for = embedder_for
        self._indexer = indexer
        self._set_serving = set_serving
        self._period = period
        self._timeout = timeout
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dependency-prober", daemon=True)
        self.serving: bool | None = None
        self.problem: str = "not probed yet"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self._timeout + 1)

    def probe(self) -> str:
        """One round; returns "" when everything is reachable, else what is wrong."""
        problems = []
        try:
            stats = self._indexer.stats(timeout=self._timeout)
            for shard in range(self._indexer.shard_count):
                metrics.DEPENDENCY_UP.labels(f"indexer-{shard}").set(1)
            del stats
        except CbirError as exc:
            # The client names the unreachable shard; mark all down rather than guess which.
            for shard in range(self._indexer.shard_count):
                metrics.DEPENDENCY_UP.labels(f"indexer-{shard}").set(0)
            problems.append(f"indexer: {exc.message}")
        try:
            generation = self._core.active_generation(self._timeout)
        except CbirError as exc:
            problems.append(f"active generation: {exc.message}")
            generation = None
        if generation is not None:
            try:
                versions = self._embedder_for(generation.space.model_name).model_versions(
                    timeout=self._timeout
                )
                metrics.DEPENDENCY_UP.labels("serving").set(1)
                state = str(versions.get(generation.space.model_version, "missing"))
                if not state.upper().endswith("AVAILABLE"):
                    problems.append(
                        f"serving: model {generation.space.model_name!r} version "
                        f"{generation.space.model_version} (of generation {generation.name!r}) is {state}"
                    )
            except CbirError as exc:
                metrics.DEPENDENCY_UP.labels("serving").set(0)
                problems.append(f"serving: {exc.message}")
        return "; ".join(problems)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                problem = self.probe()
            except Exception as exc:  # noqa: BLE001 - a prober bug must not kill the thread silently
                log.exception("health probe failed")
                problem = f"probe error: {exc}"
            serving = not problem
            if serving != self.serving:
                self._set_serving(serving)
                metrics.SERVING.set(1 if serving else 0)
                if serving:
                    log.info("dependencies reachable: SERVING")
                else:
                    log.warning("dependency problem: NOT_SERVING", extra={"problem": problem})
            self.serving, self.problem = serving, problem
            self._stop.wait(self._period)
