"""What decoding a reply's JSON text can cost the parent, bounded before it is decoded.

Why: JSON is linear to parse but not small to hold. ``[{},{},...]`` turns 3 bytes into a
dict and a list slot (24x), ``[[[]],...]`` reaches 30x and nested one-key dicts ~37x
(measured with tracemalloc, Python 3.11). So the parent refuses a reply whose decoded
form could exceed ``DECODE_MULTIPLE`` x its frame limit *before* running the parser, and
a worker checks the same bound before it sends (one function, both sides: an honest
tool gets a clear error and a usable worker; a lying one is caught by the parent).

:func:`decode_cost` is a sum of charges counted over the whole text with ``bytes.count``
(C speed, linear, no parser state a hostile text could confuse): every ``"`` may open or
close a str (its header), every ``[``/``{`` may open a list/dict, every ``,``/``:``/``[``
may introduce a value (a number object and a list slot, or a dict entry and its key's
memo entry), every byte may be a character of a 4-byte-wide str, and the text itself is
decoded once to a str. Bytes inside strings are counted as if they were structure, so
the estimate only ever overcounts; it is an upper bound of what ``json.loads`` holds at
its peak (tests check it against tracemalloc for the worst shapes, with pymalloc's
16-byte rounding included in the charges). Typical data is charged 2-5x what it really
costs (a list of small records about 30x its JSON size against a real ~7x; ASCII text
and blobs about 2x), so the limit bites hostile shapes long before honest ones.
"""

from __future__ import annotations

# Decoded replies may hold at most this multiple of the frame limit (output_bytes plus the
# envelope); see RELIABILITY.md for the measured parent RSS figures.
DECODE_MULTIPLE = 16

# Charges in bytes. A str header is <= 80 bytes (+ rounding); a list is 56 bytes plus a
# separate item array; a dict with its first key ~184 and each further key <= 38, plus
# the parser's memo of keys (<= 38 per new key); a number object 32; a list slot <= 9.
_QUOTE = 48  # per '"': half of a str header
_VALUE = 48  # per ',': a list slot and a number object
_ENTRY = 112  # per ':': a dict entry, a memo entry, a number object
_LIST = 176  # per '[': the list, its first item array, a slot and a number object
_DICT = 248  # per '{': the dict with its first key table, a slot
_FIXED = 4096  # the parse itself (scanner, memo dict, top-level objects)
# Below this size nothing needs counting: even 256 bytes of charge per byte of text
# stays far under the smallest budget (DECODE_MULTIPLE x the envelope alone).
SMALL = 4096


def decode_cost(buf: bytes | bytearray, end: int | None = None) -> int:
    """An upper bound, in bytes, of the memory ``json.loads`` needs for the UTF-8 JSON text
    ``buf[:end]``, including the decoded copy of the text itself."""
    n = len(buf) if end is None else end
    if n <= SMALL:
        return n * 256 + _FIXED
    # Bytes per character of the widest str the text can decode to: 1 for ASCII without
    # escapes, else 4 (a text followed by blobs is not checked: 4).
    wide = end is not None or not buf.isascii() or buf.find(b"\\u") >= 0
    return ((8 if wide else 2) * n + _FIXED
            + _QUOTE * buf.count(b'"', 0, n)
            + _VALUE * buf.count(b",", 0, n)
            + _ENTRY * buf.count(b":", 0, n)
            + _LIST * buf.count(b"[", 0, n)
            + _DICT * buf.count(b"{", 0, n))


def decode_budget(frame_limit: int) -> int:
    """The most decoded memory a reply of at most ``frame_limit`` bytes may cost."""
    return DECODE_MULTIPLE * frame_limit
