"""The HTTP examples of gateway/README.md (curl, Python requests, browser fetch) run against a real gateway."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from cbir.processes import REPO
from cbir.v1 import search_pb2
from tests.gateway.stack import AUTH, SEARCH_KEY
from tests.support.browser import chromium

pytestmark = pytest.mark.slow

README = (REPO / "gateway" / "README.md").read_text()
QUERY, ITEM = "item-005", "item-030"


def block(language: str, containing: str) -> str:
    blocks = [b for b in re.findall(rf"```{language}\n(.*?)```", README, re.S) if containing in b]
    assert len(blocks) == 1, f"one ```{language} block with {containing!r} in gateway/README.md"
    return blocks[0]


def substituted(code: str, e2e) -> str:
    host = e2e.gateway.http_url.removeprefix("http://")
    return (
        code.replace("localhost:8080", host)
        .replace("MY-KEY", SEARCH_KEY)
        .replace("query.jpg", str(e2e.catalogue.folder / f"{QUERY}.png"))
        .replace("bags/0001.jpg", ITEM)
        .replace('"dress"', repr(e2e.catalogue.items[QUERY].label))
    )


def json_values(text: str) -> list:
    decoder, values, at = json.JSONDecoder(), [], 0
    while at < len(text):
        if text[at].isspace():
            at += 1
            continue
        value, at = decoder.raw_decode(text, at)
        values.append(value)
    return values


@pytest.fixture(scope="module")
def more_like_item(e2e):
    with e2e.gateway.channel() as channel:
        response = e2e.gateway.stub(channel).Search(
            search_pb2.SearchRequest(item_id=ITEM, k=5), metadata=AUTH, timeout=30
        )
    return [h.id for h in response.hits]


@pytest.fixture(scope="module")
def live(e2e):
    """The generation answering now (an earlier test may have hot-swapped the model)."""
    with e2e.gateway.channel() as channel:
        return (
            e2e.gateway.stub(channel)
            .GetServingInfo(search_pb2.GetServingInfoRequest(), metadata=AUTH, timeout=30)
            .generation
        )


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_examples(e2e, more_like_item, live):
    code = substituted(block("sh", "curl -s"), e2e)
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", code], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    upload, by_id, info = json_values(done.stdout)
    assert upload["hits"][0]["id"] == QUERY and len(upload["hits"]) == 5
    assert [h["id"] for h in by_id["hits"]] == more_like_item
    assert info["generation"]["name"] == live.name and info["itemCount"] == "40"


def test_python_requests_example(e2e, live):
    code = substituted(block("python", "import requests"), e2e)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    label = e2e.catalogue.items[QUERY].label
    assert lines[0] == f"{QUERY} 1.0 {label}"
    assert (
        all(line.endswith(label) for line in lines[:-1])
        and lines[-1] == f"model version {live.space.model_version}"
    )


def test_browser_fetch_example(e2e, more_like_item):
    code = substituted(block("js", "await fetch("), e2e)
    script = (
        "const done = arguments[arguments.length - 1]; const lines = [];"
        "console.log = (...parts) => lines.push(parts.join(' '));"
        f"(async () => {{ {code} }})().then(() => done({{lines}}), (e) => done({{error: String(e)}}));"
    )
    with chromium() as driver:
        driver.set_script_timeout(60)
        driver.get(e2e.gateway.http_url + "/")
        answer = driver.execute_async_script(script)
    assert "error" not in answer, answer
    printed = answer["lines"][0].splitlines()
    assert [line.split()[0] for line in printed] == more_like_item
