"""What a client did wrong, typed: the HTTP layer answers these with their status and
message, and anything else as an internal error (500), so a bug never reads as the client's
fault. They are ValueErrors, so library callers that catch ValueError keep working."""
from __future__ import annotations


class InvalidRequest(ValueError):
    """Bad input (HTTP 400); the message says what to fix."""
    status = 400


class NotFound(InvalidRequest):
    """A named thing (a document id) does not exist, or not for this caller (HTTP 404)."""
    status = 404


class Conflict(InvalidRequest):
    """The request clashes with one in flight (a reused rid: HTTP 409)."""
    status = 409
