"""The source identity of each video: what extraction read, to notice a video that changed.

A video's identity is its uri plus what the storage says about the file's content::

    {"uri": "/data/v1.mp4", "size": 123456, "mtime_ns": 1712345678901234567}   local file
    {"uri": "s3://b/raw/v1.mp4", "size": 123456, "etag": "\\"9b2cf5...\\""}      S3 object

It is taken by the driver before any decoding (a file replaced afterwards therefore differs on the
next run) and committed with the video's features (``sources`` of the Part meta). A committed
video whose uri or file no longer matches is extracted again; one whose file cannot be read now
(deleted after extraction, say) keeps its features: there is nothing to re-extract from.

S3 objects are described by one LIST per 1,000 keys of a prefix holding many of the videos,
else one HEAD per object; local files by one ``stat`` each.
"""

from __future__ import annotations

import os
import posixpath
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

LIST_MIN_OBJECTS = 8  # videos under one S3 prefix from which one LIST beats a HEAD per object


def source_identities(uris: Sequence[str], endpoint_url: str | None = None,
                      region: str | None = None) -> list[dict[str, Any]]:
    """The identity of each uri (``size`` absent when the file cannot be read now)."""
    out: list[dict[str, Any]] = [{"uri": u} for u in uris]
    s3: dict[str, list[int]] = defaultdict(list)  # parent prefix -> indices of its uris
    for i, uri in enumerate(uris):
        if uri.startswith("s3://"):
            s3[posixpath.dirname(uri[len("s3://"):])].append(i)
        elif "://" not in uri or uri.startswith("file://"):
            try:
                st = os.stat(uri.removeprefix("file://"))
            except OSError:
                continue
            out[i].update(size=st.st_size, mtime_ns=st.st_mtime_ns)
    if s3:
        from feature_store.store import open_filesystem

        fs, _ = open_filesystem("s3://", endpoint_url, region)
        for prefix, idx in s3.items():
            listed: dict[str, dict[str, Any]] = {}
            if len(idx) >= LIST_MIN_OBJECTS:
                try:
                    listed = {e["name"]: e for e in fs.ls(prefix, detail=True)}
                except OSError:
                    listed = {}
            for i in idx:
                key = uris[i][len("s3://"):]
                info = listed.get(key)
                if info is None and not listed:
                    try:
                        info = fs.info(key)
                    except OSError:
                        continue
                if info is not None and info.get("type") == "file":
                    out[i].update(size=int(info["size"]), etag=info.get("ETag"))
    return out


def source_change(stored: dict[str, Any] | None, current: dict[str, Any]) -> str | None:
    """Why the video behind ``current`` is not the one whose features were committed, or None.

    None also when nothing can be told: no identity was committed (features written by an older
    version or another tool), or the file cannot be read now.
    """
    if stored is None:
        return None
    if stored.get("uri") != current["uri"]:
        return f"uri changed: {stored.get('uri')} -> {current['uri']}"
    if "size" not in current:
        return None
    diffs = [f"{k} {stored.get(k)} -> {current.get(k)}" for k in ("size", "mtime_ns", "etag")
             if (k in stored or k in current) and stored.get(k) != current.get(k)]
    return f"file changed: {', '.join(diffs)}" if diffs else None
