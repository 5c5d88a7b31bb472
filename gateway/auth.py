"""Optional API-key / bearer-token authentication of SearchService calls, as a server interceptor.

Keys come from a file (``--api-keys-file``) and/or the environment (``CBIR_GATEWAY_API_KEYS``). One
entry per line in the file, comma-separated in the environment; each entry is ``KEY`` (every scope) or
``KEY:scope1+scope2`` with scopes from :data:`SCOPES`. Lines starting with ``#`` are comments.

A call presents its key as ``authorization: Bearer <key>`` or ``x-api-key: <key>``. Keys are kept
only as SHA-256 digests and compared with ``hmac.compare_digest`` against every known key (no early
exit), so neither timing nor logs reveal them. Health and reflection are never intercepted.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from cbir.errors import InvalidInput, PermissionDenied, Unauthenticated

log = logging.getLogger(__name__)

# What each scope allows; a key without explicit scopes has all of them.
SCOPES = ("search", "info")
# Method (last path component) -> scope it needs.
METHOD_SCOPES: Mapping[str, str] = {"Search": "search", "BatchSearch": "search", "GetServingInfo": "info"}
PROTECTED_SERVICE = "/cbir.v1.SearchService/"


@dataclass(frozen=True)
class _Key:
    digest: bytes
    scopes: frozenset[str]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class ApiKeys:
    """The set of accepted keys with their scopes."""

    def __init__(self, entries: Iterable[str], *, source: str = "keys"):
        keys: list[_Key] = []
        for number, raw in enumerate(entries, 1):
            entry = raw.strip()
            if not entry or entry.startswith("#"):
                continue
            secret, _, scope_text = entry.partition(":")
            secret = secret.strip()
            if len(secret) < 8:
                # Say where, never what: the entry itself is a secret.
                raise InvalidInput(f"{source}: entry {number} is shorter than 8 characters; use longer keys")
            scopes = frozenset(s.strip() for s in scope_text.split("+") if s.strip()) or frozenset(SCOPES)
            unknown = scopes - set(SCOPES)
            if unknown:
                raise InvalidInput(
                    f"{source}: entry {number} has unknown scope(s) {sorted(unknown)}; known: {list(SCOPES)}"
                )
            keys.append(_Key(_digest(secret), scopes))
        self._keys = tuple(keys)

    def __len__(self) -> int:
        return len(self._keys)

    @classmethod
    def load(cls, file: str | None, env_value: str | None) -> ApiKeys | None:
        """Keys from the file and the environment value; None when neither gives any (auth off)."""
        entries: list[str] = []
        if file:
            try:
                entries += Path(file).read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise InvalidInput(f"cannot read --api-keys-file {file!r}: {exc.strerror or exc}") from None
        if env_value:
            entries += env_value.split(",")
        if not entries:
            return None
        keys = cls(entries, source=file or "CBIR_GATEWAY_API_KEYS")
        if not keys:
            raise InvalidInput("API keys were configured but none is usable (only comments/blank lines)")
        return keys

    def scopes_of(self, presented: str) -> frozenset[str] | None:
        """Scopes of ``presented``, or None if it is not a known key. Constant time in the key."""
        wanted = _digest(presented)
        found: frozenset[str] | None = None
        for key in self._keys:
            if hmac.compare_digest(key.digest, wanted):
                found = key.scopes
        return found


def presented_key(metadata: Iterable[tuple[str, object]] | None) -> str | None:
    """The key sent with a call (``authorization: Bearer K`` or ``x-api-key: K``), if any."""
    for name, value in metadata or ():
        if not isinstance(value, str):
            continue
        if name == "x-api-key":
            return value.strip()
        if name == "authorization":
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def check(keys: ApiKeys, method: str, metadata: Iterable[tuple[str, object]] | None) -> None:
    """Raises Unauthenticated / PermissionDenied unless the call may run ``method``."""
    presented = presented_key(metadata)
    if presented is None:
        raise Unauthenticated(
            "this gateway requires an API key: send metadata 'authorization: Bearer <key>' or 'x-api-key: <key>'"
        )
    scopes = keys.scopes_of(presented)
    if scopes is None:
        raise Unauthenticated("the API key is not valid")
    needed = METHOD_SCOPES.get(method.rsplit("/", 1)[-1], "search")
    if needed not in scopes:
        raise PermissionDenied(f"the API key does not have the {needed!r} scope needed by {method}")


class ApiKeyInterceptor(grpc.ServerInterceptor):
    """Rejects SearchService calls without a valid key; other services (health, reflection) pass."""

    def __init__(self, keys: ApiKeys):
        self.keys = keys

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(PROTECTED_SERVICE) or not handler.unary_unary:
            return handler
        metadata = handler_call_details.invocation_metadata
        behavior = handler.unary_unary

        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            # Raised inside the RPC so the shared interceptor (outermost) maps, counts and logs it.
            check(self.keys, method, metadata)
            return behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(
            guarded, handler.request_deserializer, handler.response_serializer
        )
