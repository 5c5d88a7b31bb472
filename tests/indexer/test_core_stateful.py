"""IndexerCore against a plain reference model (a dict and brute-force search), driven by hypothesis.

Random interleavings of upserts, re-upserts, deletes, filtered k-NN, snapshots, compactions taken step
by step (so writes and snapshots land between a compaction's build and its swap), capacity growth,
generations, graceful restarts, kill -9 (no snapshot on the way out) and torn snapshots. After every step
the store, the catalogue and every graph must hold exactly what the reference holds, and every answer
must equal the reference's.

Budget: CBIR_STATEFUL_EXAMPLES (default 25 in `make test`; `make test-stateful` runs many more).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from cbir.errors import NotFound
from indexer import partitions
from indexer.catalogue import ItemFilter
from indexer.core import IndexerConfig, IndexerCore
from indexer.maintenance import Compaction
from indexer.queries import KnnQuery, search
from indexer.store import HNSW, PARTITIONS, ItemRow

DIM = 4
L2, COSINE = 2, 1
IDS = [f"i{j}" for j in range(48)]
LABELS = ["a", "b", "c", ""]
COLOURS = ["red", "blue"]
EXAMPLES = int(os.environ.get("CBIR_STATEFUL_EXAMPLES", "25"))
EPS = float(np.finfo(np.float32).eps)


def _distance(metric: int, q: np.ndarray, v: np.ndarray) -> float:
    """The reference distances, written out (float64)."""
    q, v = q.astype(np.float64), v.astype(np.float64)
    if metric == COSINE:
        return 1.0 - float(q @ v) / (np.linalg.norm(q) * np.linalg.norm(v))
    return float(((q - v) ** 2).sum())


def _tolerance(values) -> float:
    # float32 arithmetic inside hnswlib and numpy, on values of this size.
    return 64 * EPS * (1.0 + max((abs(x) for x in values), default=0.0))


records = st.lists(
    st.tuples(
        st.sampled_from(IDS),
        st.sampled_from(LABELS),
        st.sampled_from([None, *COLOURS]),
        st.integers(0, 2**32 - 1),
    ),
    min_size=1,
    max_size=24,
)
filters = st.one_of(
    st.just(ItemFilter()),
    st.builds(
        lambda ls: ItemFilter(labels=tuple(ls)), st.lists(st.sampled_from(LABELS), min_size=1, max_size=2)
    ),
    st.builds(lambda c: ItemFilter(attributes=(("colour", (c,)),)), st.sampled_from(COLOURS)),
    st.builds(
        lambda ls, c: ItemFilter(labels=tuple(ls), attributes=(("colour", tuple(c)),)),
        st.lists(st.sampled_from(LABELS), min_size=1, max_size=2),
        st.lists(st.sampled_from(COLOURS), min_size=1, max_size=2),
    ),
)


class IndexerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="cbir-stateful-"))
        self.config = IndexerConfig(
            self.dir,
            exact_threshold=10**9,  # exact answers, comparable with the reference's
            exact_below=10**9,
            compact_fraction=1.0,  # compactions only when a rule says so (step by step)
            compact_min_slots=1,
            initial_capacity=16,  # grows many times
            train_in_background=False,  # partition training inline: the steps stay deterministic
        )
        # Partition generations train (and retrain) at the sizes this test reaches.
        self.train_min = partitions.TRAIN_MIN
        partitions.TRAIN_MIN = 8
        self.core = self._open()
        self.items: dict[str, ItemRow] = {}  # the reference: id -> content
        self.vectors: dict[str, dict[str, np.ndarray]] = {}  # generation -> id -> vector
        self.metrics: dict[str, int] = {}
        self.active: str | None = None
        self.compaction: Compaction | None = None
        self.compaction_step = 0
        self.created = 0

    def _open(self) -> IndexerCore:
        core = IndexerCore(self.config)
        core.load()
        return core

    def teardown(self) -> None:
        self._abandon_compaction()
        self.core.close(snapshot=False)
        shutil.rmtree(self.dir, ignore_errors=True)
        partitions.TRAIN_MIN = self.train_min

    # ------------------------------------------------------------------ generations

    @initialize(metric=st.sampled_from([L2, COSINE]), index_type=st.sampled_from([HNSW, PARTITIONS]))
    def first_generation(self, metric, index_type):
        self._create(metric, index_type)
        self.core.activate_generation("g0")
        self.active = "g0"

    def _create(self, metric: int, index_type: int) -> str:
        name = f"g{self.created}"
        self.created += 1
        self.core.create_generation(name, "m", self.created, metric, DIM, index_type=index_type)
        self.vectors[name] = {}
        self.metrics[name] = metric
        return name

    @precondition(lambda self: len(self.vectors) < 3)
    @rule(metric=st.sampled_from([L2, COSINE]), index_type=st.sampled_from([HNSW, PARTITIONS]))
    def create_generation(self, metric, index_type):
        self._create(metric, index_type)

    @rule(data=st.data())
    def activate(self, data):
        name = data.draw(st.sampled_from(sorted(self.vectors)))
        self.core.activate_generation(name, allow_pending=True)
        self.active = name

    @precondition(lambda self: len(self.vectors) > 1)
    @rule(data=st.data())
    def drop(self, data):
        name = data.draw(st.sampled_from(sorted(n for n in self.vectors if n != self.active)))
        if self.compaction is not None and self.compaction.gen.name == name:
            self._abandon_compaction()
        self.core.drop_generation(name)
        del self.vectors[name], self.metrics[name]

    # ------------------------------------------------------------------ writes

    @rule(data=st.data(), batch=records)
    def upsert(self, data, batch):
        name = data.draw(st.sampled_from(sorted(self.vectors)))
        rows = []
        for item_id, label, colour, seed in batch:
            attributes = {"colour": colour} if colour else {}
            vector = np.random.default_rng(seed).normal(size=DIM).astype(np.float32)
            rows.append((ItemRow(item_id, f"file:///{item_id}/{seed}", label, attributes), vector))
        self.core.upsert(name, rows)
        for row, vector in rows:
            self.items[row.id] = row
            self.vectors[name][row.id] = vector

    @rule(
        ids=st.lists(st.sampled_from(IDS), min_size=1, max_size=30, unique=True), allow_missing=st.booleans()
    )
    def delete(self, ids, allow_missing):
        missing = [i for i in ids if i not in self.items]
        if missing and not allow_missing:
            try:
                self.core.delete(ids)
            except NotFound:
                return  # nothing deleted: the invariants check it
            raise AssertionError("delete of missing ids did not raise NotFound")
        deleted, not_found = self.core.delete(ids, allow_missing=allow_missing)
        assert deleted == len(ids) - len(missing) and sorted(not_found) == sorted(missing)
        for i in ids:
            self.items.pop(i, None)
            for vectors in self.vectors.values():
                vectors.pop(i, None)

    # ------------------------------------------------------------------ background work, step by step

    @rule()
    def snapshot(self):
        self.core.snapshot_all()

    @precondition(lambda self: self.compaction is None)
    @rule(data=st.data())
    def compaction_start(self, data):
        name = data.draw(st.sampled_from(sorted(self.vectors)))
        gen = self.core._generations[name]
        gen.compacting = True
        self.compaction = Compaction(self.core, gen)
        self.compaction.start()
        self.compaction.build()
        self.compaction_step = 1

    @precondition(lambda self: self.compaction is not None and self.compaction_step == 1)
    @rule()
    def compaction_catch_up(self):
        self.compaction.catch_up()
        self.compaction_step = 2

    @precondition(lambda self: self.compaction is not None)
    @rule()
    def compaction_finish(self):
        if self.compaction_step == 1:
            self.compaction.catch_up()
        assert self.compaction.finish()  # swapped in (the invariants check what it holds)
        self.compaction.gen.compacting = False
        self.compaction = None

    @precondition(lambda self: self.compaction is None)
    @rule(data=st.data())
    def compaction_overlapping_writes_and_snapshots(self, data):
        """A whole compaction with writes, deletes and snapshots landing between its steps."""
        self.compaction_start(data)
        for step in (self.compaction_catch_up, self.compaction_finish):
            for work in data.draw(st.lists(st.sampled_from(["upsert", "delete", "snapshot"]), max_size=3)):
                if work == "upsert":
                    self.upsert(data, data.draw(records))
                elif work == "delete":
                    self.delete(
                        data.draw(st.lists(st.sampled_from(IDS), min_size=1, max_size=10, unique=True)), True
                    )
                else:
                    self.snapshot()
            step()

    def _abandon_compaction(self) -> None:
        if self.compaction is not None:
            self.compaction.release()
            self.compaction = None

    # ------------------------------------------------------------------ restarts

    @rule()
    def restart(self):
        self._abandon_compaction()
        self.core.close()
        self.core = self._open()

    @rule()
    def kill_9(self):
        """Dies without a snapshot: only what the store committed survives."""
        self._abandon_compaction()
        self.core.store.close()
        self.core = self._open()

    @rule(data=st.data())
    def torn_snapshot_then_kill_9(self, data):
        """Dies while a snapshot's files were being replaced: the graph file no longer matches its
        manifest, so the graph is rebuilt from the store."""
        name = data.draw(st.sampled_from(sorted(self.vectors)))
        self.core.snapshot_all()
        graph_file = self.dir / "generations" / name / "hnsw.bin"
        if graph_file.exists():
            graph_file.write_bytes(graph_file.read_bytes()[:-7] + b"garbage")
        self.kill_9()

    # ------------------------------------------------------------------ queries

    def _reference(self, name, q, k, flt, exclude):
        metric = self.metrics[name]
        scored = sorted(
            (_distance(metric, q, v), i)
            for i, v in self.vectors[name].items()
            if i not in exclude and flt.matches(self.items[i])
        )
        return scored[:k]

    def _check_answer(self, name, q, k, flt, exclude, hits):
        expected = self._reference(name, q, k, flt, exclude)
        assert len(hits) == len(expected), (len(hits), len(expected))
        metric = self.metrics[name]
        got = [_distance(metric, q, self.vectors[name][h.item.id]) for h in hits]
        want = [d for d, _ in expected]
        tol = _tolerance(want)
        # Equal up to ties: the same distances in the same order, every hit live, matching, not excluded,
        # with its current metadata and the distance it really has.
        assert np.allclose(got, want, rtol=0, atol=tol), (got, want)
        assert np.allclose([h.distance for h in hits], got, rtol=0, atol=tol)
        for h in hits:
            assert _content(h.item) == _content(self.items[h.item.id])
            assert flt.matches(h.item) and h.item.id not in exclude

    @rule(
        data=st.data(),
        seed=st.integers(0, 2**32 - 1),
        k=st.integers(1, 12),
        flt=filters,
        exclude=st.lists(st.sampled_from(IDS), max_size=3),
    )
    def knn(self, data, seed, k, flt, exclude):
        name = data.draw(st.sampled_from(sorted(self.vectors)))
        q = np.random.default_rng(seed).normal(size=(1, DIM)).astype(np.float32)
        hits, row = self.core.knn(q, k, generation=name, item_filter=flt, exclude_ids=exclude)
        assert row.name == name
        self._check_answer(name, q[0], k, flt, set(exclude), hits[0])

    @rule(seed=st.integers(0, 2**32 - 1), k=st.integers(1, 12), flt=filters)
    def knn_through_hnsw(self, seed, k, flt):
        """The index itself answers (no exact shortcut): wide ef makes HNSW exact on a graph this small,
        and probing every list makes a partition index exact."""
        name = self.active
        gen = self.core._generations[name]
        q = np.random.default_rng(seed).normal(size=(1, DIM)).astype(np.float32)
        query = KnnQuery(q, k, flt, 500, None, frozenset(), probes=partitions.LISTS_MAX)
        hits = search(gen.graph, gen.metric, query, self.core.catalogue, 0, 0)[0]
        self._check_answer(name, q[0], k, flt, set(), hits)

    # ------------------------------------------------------------------ store == catalogue == graph

    @invariant()
    def store_catalogue_and_graphs_agree_with_the_reference(self):
        core = self.core
        want_items = {i: _content(r) for i, r in self.items.items()}
        assert {r.id: _content(r) for r in core.store.all_items()} == want_items
        assert {i: _content(r) for i, r in core.catalogue.items.items()} == want_items
        for label in LABELS:
            want = {i for i, r in self.items.items() if r.label == label}
            assert core.catalogue.candidates(ItemFilter(labels=(label,))) == want
        assert {g.row.name for g in core.list_generations()} == set(self.vectors)
        assert (core.active_name() or None) == self.active
        last = core.store.last_sequence()
        for name, vectors in self.vectors.items():
            stored = core.list_items(name, page_size=10_000, include_vectors=True)[0]
            assert {r.id: v.tolist() for r, v in stored} == {i: v.tolist() for i, v in vectors.items()}
            graph = core._generations[name].graph
            assert set(graph.label_of) == set(vectors)
            assert graph.applied_seq == last
            for item_id, vector in vectors.items():
                # The very object of the catalogue, so hits and filters see what the store holds.
                assert graph.row_of(item_id) is core.catalogue.get(item_id)
                held = graph.vectors_of([item_id])[0]
                if self.metrics[name] == COSINE:  # hnswlib keeps cosine vectors normalised
                    vector = vector / np.linalg.norm(vector)
                np.testing.assert_allclose(held, vector, rtol=0, atol=4 * EPS)


def _content(row: ItemRow | None):
    """What a caller sees of an item (revisions are the store's business)."""
    return None if row is None else (row.id, row.uri, row.label, row.attributes)


IndexerMachine.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
test_indexer_core_matches_the_reference_model = IndexerMachine.TestCase
