"""Renders every overlay x component combination once per session (in parallel: kustomize is a subprocess)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.deploy import rendering


@pytest.fixture(scope="session")
def rendered() -> dict[tuple[str, tuple[str, ...]], tuple[dict, ...]]:
    try:
        rendering.kustomize_command()
    except rendering.RendererMissing as exc:
        pytest.fail(str(exc))
    combos = list(rendering.combinations())
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda combo: rendering.render(*combo), combos))
    return dict(zip(combos, results, strict=True))


@pytest.fixture(scope="session")
def stacks(rendered):
    """Renders of the long-running stack (not the Job kustomizations)."""
    return {key: objs for key, objs in rendered.items() if rendering.is_stack(key[0])}
