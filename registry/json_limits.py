"""Limits on the JSON documents the registry stores or searches with (metadata, containment).

The API checks every document against them before it reaches the store, so that none can break
a read: a response nests a document inside its own body, and serializers stop at a few hundred
levels (pydantic's at 256: every read of the device and its platform's list answered 500).
Merged metadata is checked again as stored (registry/registration.py). Migration 0023 brought
documents stored before these limits within MAX_DEPTH.
"""

import json
import math
from typing import Final, TypeVar

MAX_BYTES: Final = 64 * 1024
MAX_DEPTH: Final = 32  # objects and arrays inside each other, the outermost counting one
MAX_KEYS: Final = 1024  # object members in the whole document
MAX_KEY_CHARS: Final = 256
MAX_STRING_CHARS: Final = 8192

T = TypeVar("T")


class TooLarge(ValueError):
    """A document beyond one of the limits; the message names it."""


def storable_text(value: str) -> str:
    """PostgreSQL text holds UTF-8 without NUL: refuse what it would refuse, as a 422."""
    if "\x00" in value:
        raise ValueError("text must not contain NUL characters")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (no lone surrogates)") from None
    return value


def check_document(document: T, what: str) -> T:
    """Returns `document` if it is within every limit and storable as text; raises TooLarge
    (or ValueError for text PostgreSQL refuses) naming the limit otherwise."""
    keys = 0
    # Depth first with an explicit stack: a document nested past any limit costs no recursion.
    stack: list[tuple[object, int]] = [(document, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if len(value) > MAX_STRING_CHARS:
                raise TooLarge(
                    f"{what} has a string longer than {MAX_STRING_CHARS} characters "
                    "(max_string_chars)"
                )
            storable_text(value)
            continue
        if isinstance(value, float) and not math.isfinite(value):
            # Python's json reads NaN and Infinity; JSON (and jsonb) has neither.
            raise ValueError(f"{what} holds {value}, which JSON cannot")
        if not isinstance(value, dict | list):
            continue
        if depth > MAX_DEPTH:
            raise TooLarge(
                f"{what} nests objects and arrays deeper than {MAX_DEPTH} levels (max_depth)"
            )
        if isinstance(value, dict):
            keys += len(value)
            if keys > MAX_KEYS:
                raise TooLarge(f"{what} has more than {MAX_KEYS} keys (max_keys)")
            for key in value:
                if len(key) > MAX_KEY_CHARS:
                    raise TooLarge(
                        f"{what} has a key longer than {MAX_KEY_CHARS} characters (max_key_chars)"
                    )
                storable_text(key)
            stack.extend((item, depth + 1) for item in value.values())
        else:
            stack.extend((item, depth + 1) for item in value)
    # json, not orjson: documents may hold integers beyond 64 bits, and jsonb keeps them.
    if len(json.dumps(document)) > MAX_BYTES:
        raise TooLarge(f"{what} is larger than {MAX_BYTES} bytes as JSON (max_bytes)")
    return document
