"""IndexerClient's translation of a shard's status into a domain error."""

from __future__ import annotations

import grpc

from cbir import errors
from indexer.client import IndexerClient


class StatusWithoutDetails(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.NOT_FOUND

    def details(self) -> None:  # a status sent without details
        return None


def test_a_status_without_details_still_has_a_message():
    with IndexerClient(["127.0.0.1:1"]) as client:
        error = client._error(0, StatusWithoutDetails())
    assert isinstance(error, errors.NotFound) and error.message == "NOT_FOUND without details"
