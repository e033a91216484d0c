"""Deterministic corpus extraction from Debian's dict-gcide package.

Source: /usr/share/dictd/gcide.dict.dz + gcide.index (Debian package
dict-gcide, GCIDE 0.48 -- GNU Collaborative International Dictionary of
English, GPL-2-or-later as stated in /usr/share/doc/dict-gcide/copyright).

Extraction: every entry listed in gcide.index whose headword does not start
with "00-" (the dictd database header/licence pseudo-entries) is located by its
(offset, length); duplicate spans are dropped; the spans are sorted by offset
and their raw bytes concatenated, each followed by one extra b"\\n" (so
entries are separated by a blank line, as in the .dict file).  The
last 2% of the entries (by count) form the validation split; the rest is the
training split.  tests/fixtures/heldout.txt is the first 128*255 bytes of the
validation split.
"""

from __future__ import annotations

import gzip
import hashlib
import os

DICT = "/usr/share/dictd/gcide.dict.dz"
INDEX = "/usr/share/dictd/gcide.index"
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
VAL_FRACTION = 0.02
HELDOUT_CHUNK = 255
HELDOUT_CHUNKS = 128


def _b64(s: str) -> int:
    n = 0
    for c in s:
        n = n * 64 + B64.index(c)
    return n


def load_entries() -> list[bytes]:
    with gzip.open(DICT, "rb") as f:  # dictzip is gzip-compatible
        raw = f.read()
    spans = set()
    with open(INDEX, "r", encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3 or parts[0].startswith("00-"):
                continue
            spans.add((_b64(parts[1]), _b64(parts[2])))
    out = []
    for off, ln in sorted(spans):
        out.append(raw[off : off + ln] + b"\n")  # blank line between entries
    return out


def splits() -> tuple[bytes, bytes]:
    entries = load_entries()
    n_val = int(len(entries) * VAL_FRACTION)
    train = b"".join(entries[: len(entries) - n_val])
    val = b"".join(entries[len(entries) - n_val :])
    return train, val


def heldout_from_val(val: bytes) -> bytes:
    return val[: HELDOUT_CHUNK * HELDOUT_CHUNKS]


if __name__ == "__main__":
    import sys

    tr, va = splits()
    print("train bytes", len(tr), hashlib.sha256(tr).hexdigest()[:16])
    print("val bytes", len(va), hashlib.sha256(va).hexdigest()[:16])
    ho = heldout_from_val(va)
    print("heldout bytes", len(ho), hashlib.sha256(ho).hexdigest()[:16])
    if len(sys.argv) > 1:  # python corpus.py tests/fixtures/heldout.txt
        with open(sys.argv[1], "wb") as f:
            f.write(ho)
        print("wrote", sys.argv[1])
    else:
        print(ho[:400].decode("utf-8", "replace"))
