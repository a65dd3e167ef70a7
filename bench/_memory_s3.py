"""An S3 stand-in that answers from memory at once: the requests the pipeline makes, and no more.

moto renders every answer through its full model of S3 (~3–4 ms of CPU a request on the bench's machine), so on
2 cores it took half the machine from the run it served and became the bound of figure 9. This one takes
0.3–0.6 ms a request, uvicorn included (0.5–1.0 s of CPU for a run's ~1 650), so the figure measures the run's own
requests. What it speaks, path-style, as botocore
sends it: create a bucket; PUT an object (`If-None-Match: *` honoured, aws-chunked bodies decoded); GET and HEAD
one; ListObjectsV2 by prefix, in pages; DELETE one; DeleteObjects. Anything else is a 501, so a new kind of
request shows up as an error rather than as a figure. The tests stay on moto: the protocol's check is there.
"""

from __future__ import annotations

import email.utils
import hashlib
import time
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple
from xml.sax.saxutils import escape

NS = "http://s3.amazonaws.com/doc/2006-03-01/"
Answer = tuple[int, dict[str, str], bytes]


class StoredObject(NamedTuple):
    data: bytes
    etag: str
    content_type: str
    modified: float


class MemoryS3:
    """An ASGI app: buckets of objects in a dict, answered on the event loop."""

    def __init__(self) -> None:
        self.buckets: dict[str, dict[str, StoredObject]] = {}

    async def __call__(
        self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict]], send: Callable[[dict], Awaitable[None]]
    ) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        method, path, query = scope["method"], scope["path"], scope["query_string"].decode()
        headers = {name.decode().lower(): value.decode() for name, value in scope["headers"]}
        status, extra, payload = self.answer(method, path, urllib.parse.parse_qs(query, True), headers, body)
        extra.setdefault("content-length", str(len(payload)))
        await send({"type": "http.response.start", "status": status, "headers": _encoded(extra)})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else payload})

    def answer(
        self, method: str, path: str, query: dict[str, list[str]], headers: dict[str, str], body: bytes
    ) -> Answer:
        bucket, _, key = path.lstrip("/").partition("/")
        if not key and method == "PUT":
            self.buckets.setdefault(bucket, {})
            return 200, {}, b""
        objects = self.buckets.get(bucket)
        if objects is None:
            return _error(404, "NoSuchBucket", "The specified bucket does not exist", method)
        if not key:
            if method == "HEAD":
                return 200, {}, b""
            if method == "GET" and query.get("list-type") == ["2"]:
                return _listing(objects, query)
            if method == "POST" and "delete" in query:
                return _deleted(objects, body)
        elif method == "PUT":
            return _put(objects, key, headers, body)
        elif method in ("GET", "HEAD"):
            found = objects.get(key)
            if found is None:
                return _error(404, "NoSuchKey", "The specified key does not exist.", method)
            return 200, _object_headers(found), found.data
        elif method == "DELETE":
            objects.pop(key, None)
            return 204, {}, b""
        return _error(501, "NotImplemented", f"the bench's S3 stand-in has no {method} {path}?{query}", method)


def _put(objects: dict[str, StoredObject], key: str, headers: dict[str, str], body: bytes) -> Answer:
    if headers.get("if-none-match") == "*" and key in objects:
        return _error(412, "PreconditionFailed", "At least one of the pre-conditions you specified did not hold", "PUT")
    if "aws-chunked" in headers.get("content-encoding", "") or headers.get("x-amz-content-sha256", "").startswith(
        "STREAMING"
    ):
        body = _dechunked(body)
    stored = StoredObject(body, hashlib.md5(body).hexdigest(), headers.get("content-type", ""), time.time())  # noqa: S324
    objects[key] = stored
    return 200, {"etag": f'"{stored.etag}"'}, b""


def _dechunked(body: bytes) -> bytes:
    """An aws-chunked body (`<hex size>[;signature]\\r\\n<data>\\r\\n` ... `0\\r\\n<trailers>`) as its data."""
    data, at = bytearray(), 0
    while True:
        end = body.index(b"\r\n", at)
        size = int(body[at:end].split(b";")[0], 16)
        if size == 0:
            return bytes(data)
        data += body[end + 2 : end + 2 + size]
        at = end + 2 + size + 2


def _object_headers(found: StoredObject) -> dict[str, str]:
    return {
        "etag": f'"{found.etag}"',
        "last-modified": email.utils.formatdate(found.modified, usegmt=True),
        "content-type": found.content_type or "binary/octet-stream",
        "content-length": str(len(found.data)),
    }


def _listing(objects: dict[str, StoredObject], query: dict[str, list[str]]) -> Answer:
    """One page of ListObjectsV2; the continuation token is the last key of the page before."""
    prefix = query.get("prefix", [""])[0]
    after = query.get("continuation-token", query.get("start-after", [""]))[0]
    most = int(query.get("max-keys", ["1000"])[0])
    keys = sorted(key for key in objects if key.startswith(prefix) and key > after)
    page, truncated = keys[:most], len(keys) > most
    contents = "".join(
        f"<Contents><Key>{escape(key)}</Key><LastModified>{_iso(objects[key].modified)}</LastModified>"
        f'<ETag>"{objects[key].etag}"</ETag><Size>{len(objects[key].data)}</Size>'
        "<StorageClass>STANDARD</StorageClass></Contents>"
        for key in page
    )
    token = f"<NextContinuationToken>{escape(page[-1])}</NextContinuationToken>" if truncated else ""
    xml = (
        f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="{NS}"><Prefix>{escape(prefix)}</Prefix>'
        f"<KeyCount>{len(page)}</KeyCount><MaxKeys>{most}</MaxKeys><IsTruncated>{str(truncated).lower()}"
        f"</IsTruncated>{contents}{token}</ListBucketResult>"
    )
    return 200, {"content-type": "application/xml"}, xml.encode()


def _deleted(objects: dict[str, StoredObject], body: bytes) -> Answer:
    """DeleteObjects: every key is deleted (a missing one too, as S3 counts it); quiet or not, as asked."""
    root = ET.fromstring(body)
    keys = [element.text or "" for element in root.iter() if element.tag.rpartition("}")[2] == "Key"]
    quiet = any(element.tag.rpartition("}")[2] == "Quiet" and element.text == "true" for element in root.iter())
    for key in keys:
        objects.pop(key, None)
    deleted = "" if quiet else "".join(f"<Deleted><Key>{escape(key)}</Key></Deleted>" for key in keys)
    xml = f'<?xml version="1.0" encoding="UTF-8"?><DeleteResult xmlns="{NS}">{deleted}</DeleteResult>'
    return 200, {"content-type": "application/xml"}, xml.encode()


def _error(status: int, code: str, message: str, method: str) -> Answer:
    """S3's error document (none for a HEAD: botocore then names the error by its status)."""
    xml = (
        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{escape(message)}</Message></Error>'
    )
    return status, {"content-type": "application/xml"}, b"" if method == "HEAD" else xml.encode()


def _iso(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(at))


def _encoded(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.encode(), value.encode()) for name, value in headers.items()]
