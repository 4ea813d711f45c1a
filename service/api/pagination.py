"""Cursor (keyset) pagination for the adapter and job lists.

A cursor is the last item's sort key, `(created_at, id)`, as opaque URL-safe text: a page is
`WHERE key after cursor ORDER BY key LIMIT n`, so paging costs the same on page 1 and page 1000
and an item created or deleted meanwhile never shifts the others between pages. A cursor from
another list, or edited, is a 400.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

from fastapi import Query
from sqlalchemy import and_, or_
from sqlalchemy.orm import InstrumentedAttribute

from loradock.service.errors import BadRequest

T = TypeVar("T")
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000

Limit = Annotated[
    int,
    Query(ge=1, le=MAX_LIMIT, description=f"Items per page (default {DEFAULT_LIMIT})."),
]
CursorParam = Annotated[
    str | None,
    Query(
        max_length=512,
        description="`next_cursor` of the previous page; absent for the first page.",
    ),
]
View = Annotated[
    Literal["full", "summary"],
    Query(description="full: every field; summary: without histories and per-version detail."),
]


def encode(kind: str, created_at: datetime, item_id: str) -> str:
    raw = json.dumps([kind, created_at.isoformat(), item_id], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode(kind: str, cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        got, created, item_id = json.loads(raw)
        if got != kind or not isinstance(item_id, str):
            raise ValueError(kind)
        return datetime.fromisoformat(created), item_id
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError) as e:
        raise BadRequest(
            f"cursor {cursor[:40]!r} is not a cursor of this list: pass the next_cursor of "
            "the previous page unchanged, or no cursor for the first page"
        ) from e


def cut(kind: str, rows: Sequence[T], limit: int) -> tuple[list[T], str | None]:
    """A page from rows fetched with `LIMIT limit + 1`: at most `limit` of them, and the cursor
    of the next page (None when there is none)."""
    if len(rows) <= limit:
        return list(rows), None
    last: Any = rows[limit - 1]
    return list(rows[:limit]), encode(kind, last.created_at, last.id)


def after(
    created: InstrumentedAttribute[Any],
    ident: InstrumentedAttribute[Any],
    key: tuple[datetime, str],
    *,
    newest_first: bool,
) -> Any:
    """The WHERE clause of the rows after `key` in (created_at, id) order; created_at descends
    when `newest_first`, id always ascends."""
    at, item_id = key
    beyond = created < at if newest_first else created > at
    return or_(beyond, and_(created == at, ident > item_id))
