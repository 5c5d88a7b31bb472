"""The model server's core in-process: availability-preserving swaps, failed loads, labels, removal."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from cbir.errors import FailedPrecondition, InvalidInput, NotFound
from embedder.model_config import ModelEntry, VersionPolicy
from embedder.model_manager import ModelManager, ModelRef, State
from embedder.servable import Servable
from tests.support.tiny_model import reference_embedding
from trainer.synthetic import make_image

IMAGES = np.array([make_image(i) for i in range(3)], dtype=object)


@pytest.fixture
def base(tiny_repo, tmp_path):
    path = tmp_path / "tiny"
    path.mkdir()
    shutil.copytree(tiny_repo / "tiny" / "1", path / "1")
    return path


def add_version(tiny_repo, base, version, source=2):
    shutil.copytree(tiny_repo / "tiny" / str(source), base / str(version))


def states(manager, name="tiny"):
    return {s.version: s.state for s in manager.status(name)}


def test_predicts_like_the_saved_model(base):
    manager = ModelManager([ModelEntry("tiny", str(base))])
    manager.poll_once()
    result = manager.predict(ModelRef("tiny"), "", {"image_bytes": IMAGES})
    assert (result.model_name, result.version, result.signature_name) == ("tiny", 1, "serving_default")
    np.testing.assert_allclose(
        result.outputs["embedding"], reference_embedding(base / "1", list(IMAGES)), atol=1e-6
    )
    manager.close()


def test_new_version_loads_before_the_old_one_unloads(tiny_repo, base):
    seen_during_load = []

    def load(name, version, path):
        if version == 2:
            # While version 2 loads, version 1 still answers.
            seen_during_load.append(manager.resolve(ModelRef("tiny")).version)
        return Servable(name, version, path)

    manager = ModelManager([ModelEntry("tiny", str(base))], load=load)
    manager.poll_once()
    add_version(tiny_repo, base, 2)
    manager.poll_once()
    assert seen_during_load == [1]
    assert states(manager) == {1: State.END, 2: State.AVAILABLE}
    assert manager.resolve(ModelRef("tiny")).version == 2
    with pytest.raises(NotFound, match=r"Servable not found for request: Specific\(tiny, 1\)"):
        manager.resolve(ModelRef("tiny", 1))
    manager.close()


def test_a_failed_load_keeps_the_serving_version_and_is_not_retried_until_it_changes(tiny_repo, base):
    attempts = []

    def load(name, version, path):
        attempts.append(version)
        if version == 2 and not (path / "fixed").exists():
            raise InvalidInput("broken export")
        return Servable(name, version, path)

    manager = ModelManager([ModelEntry("tiny", str(base))], load=load)
    manager.poll_once()
    add_version(tiny_repo, base, 2)
    manager.poll_once()
    manager.poll_once()
    status = {s.version: s for s in manager.status("tiny")}
    assert status[2].state == State.END and status[2].error_message == "broken export"
    assert status[2].error_code.name == "INVALID_ARGUMENT"
    assert status[1].state == State.AVAILABLE and manager.all_available()
    assert attempts == [1, 2]
    # Republishing the version (its files change) makes it eligible again.
    (base / "2" / "fixed").write_text("")
    os.utime(base / "2" / "saved_model.pb", ns=(1, 1))
    manager.poll_once()
    assert attempts == [1, 2, 2]
    assert states(manager) == {1: State.END, 2: State.AVAILABLE}
    manager.close()


def test_labels_must_point_to_available_versions(tiny_repo, base):
    add_version(tiny_repo, base, 2)
    entry = ModelEntry("tiny", str(base), VersionPolicy("latest", 2))
    manager = ModelManager([entry])
    manager.poll_once()
    manager.apply_config([ModelEntry("tiny", str(base), VersionPolicy("latest", 2), {"stable": 1})])
    assert manager.resolve(ModelRef("tiny", label="stable")).version == 1
    with pytest.raises(FailedPrecondition, match="version 5 of model tiny, which is not currently available"):
        manager.apply_config([ModelEntry("tiny", str(base), VersionPolicy("latest", 2), {"stable": 5})])
    assert manager.resolve(ModelRef("tiny", label="stable")).version == 1  # previous labels kept
    with pytest.raises(NotFound, match="Unrecognized servable version label: canary"):
        manager.resolve(ModelRef("tiny", label="canary"))
    allowing = ModelManager([entry], allow_labels_for_unavailable=True)
    allowing.apply_config([ModelEntry("tiny", str(base), VersionPolicy("latest", 2), {"next": 5})])
    with pytest.raises(NotFound, match=r"Specific\(tiny, 5\)"):
        allowing.resolve(ModelRef("tiny", label="next"))
    manager.close()
    allowing.close()


def test_removing_a_model_from_the_config_unloads_it(base):
    availability = []
    manager = ModelManager([ModelEntry("tiny", str(base))], on_availability=availability.append)
    manager.poll_once()
    manager.apply_config([ModelEntry("other", str(base.parent / "missing"))])
    with pytest.raises(NotFound, match=r"Latest\(tiny\)"):
        manager.resolve(ModelRef("tiny"))
    assert states(manager) == {1: State.END}
    with pytest.raises(NotFound, match="Could not find any versions of model other"):
        manager.status("other")
    assert availability == [True, False]  # "other" has no version: not ready
    manager.close()


def test_batched_manager_gives_the_same_answers(base):
    from embedder.model_config import BatchingParameters

    manager = ModelManager(
        [ModelEntry("tiny", str(base))], batching=BatchingParameters(max_batch_size=8, num_batch_threads=1)
    )
    manager.poll_once()
    result = manager.predict(ModelRef("tiny"), "", {"image_bytes": IMAGES})
    np.testing.assert_allclose(
        result.outputs["embedding"], reference_embedding(base / "1", list(IMAGES)), atol=1e-6
    )
    with pytest.raises(InvalidInput, match="Task size 9 is larger than maximum input batch size 8"):
        manager.predict(ModelRef("tiny"), "", {"image_bytes": np.array([IMAGES[0]] * 9, dtype=object)})
    manager.close()
