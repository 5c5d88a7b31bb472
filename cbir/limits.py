"""Request limits and the validators that enforce them, shared by every service that checks them.

Each check raises :class:`cbir.errors.InvalidInput` with a message naming the field (``where``) and
the limit, so the same mistake reads the same whichever service caught it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from cbir.errors import InvalidInput

MAX_ID_BYTES = 256
MAX_URI_BYTES = 2048
MAX_LABEL_BYTES = 256
MAX_ATTRIBUTES = 64
MAX_KEY_BYTES = 128
MAX_VALUE_BYTES = 1024
MAX_DIMENSION = 4096
MAX_EF = 100_000
# Lists of a partition index, and lists probed by a query, at most.
MAX_LISTS = 65_536
MAX_FILTER_LABELS = 1024
MAX_FILTER_ATTRIBUTES = 64
MAX_FILTER_VALUES = 1024


def check_id(item_id: str, where: str) -> None:
    """1..MAX_ID_BYTES bytes of UTF-8 without control characters; ``where`` names the field."""
    size = len(item_id.encode("utf-8"))
    if not 1 <= size <= MAX_ID_BYTES:
        raise InvalidInput(f"{where} must be 1..{MAX_ID_BYTES} bytes of UTF-8, got {size} bytes")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in item_id):
        raise InvalidInput(f"{where} {item_id[:64]!r} contains control characters")


def check_text(text: str, limit: int, where: str) -> None:
    size = len(text.encode("utf-8"))
    if size > limit:
        raise InvalidInput(f"{where} is {size} bytes, at most {limit} allowed")


def check_item_fields(item_id: str, uri: str, label: str, attributes: Mapping[str, str], where: str) -> None:
    """The fields of one catalogue item."""
    check_id(item_id, f"{where}: id")
    check_text(uri, MAX_URI_BYTES, f"{where}: uri")
    check_text(label, MAX_LABEL_BYTES, f"{where}: label")
    if len(attributes) > MAX_ATTRIBUTES:
        raise InvalidInput(f"{where}: at most {MAX_ATTRIBUTES} attributes, got {len(attributes)}")
    for key, value in attributes.items():
        if not key:
            raise InvalidInput(f"{where}: attribute keys must not be empty")
        check_text(key, MAX_KEY_BYTES, f"{where}: attribute key {key[:40]!r}")
        check_text(value, MAX_VALUE_BYTES, f"{where}: attribute {key[:40]!r} value")


def check_filter(labels: Sequence[str], attributes: Iterable[tuple[str, Sequence[str]]]) -> None:
    """A filter: labels (any of) and attribute conditions (each: a key and the values it may have)."""
    if len(labels) > MAX_FILTER_LABELS:
        raise InvalidInput(f"filter has {len(labels)} labels, more than {MAX_FILTER_LABELS}")
    conditions = list(attributes)
    if len(conditions) > MAX_FILTER_ATTRIBUTES:
        raise InvalidInput(
            f"filter has {len(conditions)} attribute conditions, more than {MAX_FILTER_ATTRIBUTES}"
        )
    for j, (key, values) in enumerate(conditions):
        if not key:
            raise InvalidInput(f"filter.attributes[{j}] has an empty key")
        if not values:
            raise InvalidInput(
                f"filter.attributes[{j}] (key {key!r}) has no values; give at least one accepted value"
            )
        if len(values) > MAX_FILTER_VALUES:
            raise InvalidInput(f"filter.attributes[{j}] has more than {MAX_FILTER_VALUES} values")


def check_k(k: int, max_k: int, *, default: int | None = None) -> int:
    """The k to search with: ``k`` in 1..max_k, or ``default`` (the gateway's) when one is given and k is 0."""
    if k == 0 and default is not None:
        return min(default, max_k)
    if not 1 <= k <= max_k:
        zero = "" if default is None else f" (0 means {default})"
        raise InvalidInput(f"k must be between 1 and {max_k}{zero}, got {k}")
    return k


def check_ef(ef: int) -> None:
    if not 0 <= ef <= MAX_EF:
        raise InvalidInput(f"ef must be between 0 (the generation's default) and {MAX_EF}, got {ef}")


def check_probes(probes: int) -> None:
    if not 0 <= probes <= MAX_LISTS:
        raise InvalidInput(
            f"probes must be between 0 (the generation's default) and {MAX_LISTS}, got {probes}"
        )


def check_min_score(min_score: float | None) -> None:
    if min_score is not None and not math.isfinite(min_score):
        raise InvalidInput(f"min_score must be a finite number, got {min_score}")


def check_batch(n: int, limit: int, what: str) -> None:
    if n > limit:
        raise InvalidInput(f"at most {limit} {what} per message (--max-batch), got {n}")
