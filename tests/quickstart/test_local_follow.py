"""`python -m quickstart up --follow` (`make up FOLLOW=1`): the local stack with the rollout controller."""

from __future__ import annotations

import time

import pytest

from cbir.processes import free_port, health_of
from tests.quickstart.conftest import generated_catalogue, processes_mentioning
from tests.quickstart.test_local_stack import quickstart
from tests.support.tiny_model import export_tiny_model

pytestmark = pytest.mark.slow


def test_up_follow_rolls_out_a_new_version_and_down_stops_the_controller(tmp_path):
    from indexer.client import IndexerClient

    root = tmp_path / "stack"
    models = tmp_path / "models"
    export_tiny_model(models, name="demo", version=1)
    data = generated_catalogue(tmp_path / "catalogue", classes=3, train=4, test=2)
    # Every port the stack binds, metrics and HTTP included, is a free one: the defaults may be taken.
    names = ("serving", "indexer", "indexer-metrics", "gateway", "gateway-metrics", "gateway-http", "rollout")
    ports = {f"--{name}-port": free_port() for name in names}
    flags = ["--root", str(root), "--models", str(models), "--catalogue", str(data / "train"), "--follow"]
    flags += [str(x) for pair in ports.items() for x in pair]
    try:
        missing = quickstart("up", *flags, "--eval", str(tmp_path / "nowhere"))
        assert missing.returncode == 1 and "error:" in missing.stderr and "nowhere" in missing.stderr
        assert not (root / "run").exists() or not list((root / "run").glob("*.json"))  # nothing started
        up = quickstart("up", *flags, "--eval", str(data / "test"))
        assert up.returncode == 0, up.stdout + up.stderr
        assert "rollout  started: pid" in up.stdout and "generations list" in up.stdout
        assert health_of(f"127.0.0.1:{ports['--rollout-port']}") == "SERVING"

        # A new version in the model repository goes live without anything else being run.
        export_tiny_model(models, name="demo", version=2, seed=1)
        indexer = f"127.0.0.1:{ports['--indexer-port']}"
        deadline = time.monotonic() + 180
        with IndexerClient([indexer]) as client:
            while client.active_generation().space.model_version != 2:
                assert time.monotonic() < deadline, (root / "logs" / "rollout.log").read_text()[-3000:]
                time.sleep(0.5)
            (decision,) = [d for d in client.list_rollouts("demo") if d.model_version == 2]
        assert decision.active_generation.startswith("demo-v1") and decision.evaluation_queries == 6

        down = quickstart("down", "--root", str(root))
        assert down.returncode == 0 and "stopped: rollout, gateway, indexer, serving" in down.stdout
        assert processes_mentioning(str(root)) == []
    finally:
        quickstart("down", "--root", str(root))
