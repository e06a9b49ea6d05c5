"""Framing: packets of a 4-byte big-endian length (letter plus payload), the letter, the payload.

``frame`` builds one packet; ``FrameBuffer`` reassembles packets from a byte
stream fed in arbitrary pieces, within a size limit.
"""

from __future__ import annotations

import struct

from txmilt.errors import FrameSizeError, LocalProtocolError

#: Default largest payload accepted in one frame (Postfix sends headers up to 100 KiB).
DEFAULT_FRAME_LIMIT = 1024 * 1024
#: libmilter's own limit, for a libmilter-exact mode.
LIBMILTER_FRAME_LIMIT = 65535
#: No frame can be longer than this, whatever the limit says (signed 32-bit length).
ABSOLUTE_FRAME_LIMIT = 0x7FFFFFFE

_U32 = struct.Struct("!I")
_HEADER_SIZE = 5


def frame(letter: str, payload: bytes = b"") -> bytes:
    """One packet: length (letter + payload), letter, payload."""
    return _U32.pack(len(payload) + 1) + letter.encode("ascii") + payload


class FrameBuffer:
    """Reassembles frames from a byte stream fed in arbitrary pieces.

    The pieces are kept as they were fed, not appended to one buffer: a payload
    inside one piece is sliced out of it, and one that spans pieces is joined
    from them, so each payload byte is copied once, however big the frame.
    """

    __slots__ = ("_data", "_later", "_offset", "limit", "pending")

    def __init__(self, limit: int = DEFAULT_FRAME_LIMIT) -> None:
        if not 0 < limit <= ABSOLUTE_FRAME_LIMIT:
            raise LocalProtocolError(f"frame limit {limit} must be between 1 and {ABSOLUTE_FRAME_LIMIT}")
        self._data: bytes = b""  # the piece being read, from _offset on
        self._offset = 0
        self._later: list[bytes] = []  # pieces fed after it, in order (rarely more than one)
        #: Bytes received that do not yet form a whole frame (not yet handed out, in all pieces).
        self.pending = 0
        self.limit = limit

    def feed(self, data: bytes) -> None:
        """Append received bytes (kept as they are: the caller must not change them afterwards)."""
        if not data:
            return
        if self.pending:
            self._later.append(bytes(data))
        else:
            self._data, self._offset = bytes(data), 0
        self.pending += len(data)

    def next_frame(self) -> tuple[str, bytes] | None:
        """The next whole frame as (letter, payload), or None until more bytes arrive.

        A length of 0 counts as 1 (the fifth byte is still the letter), as in libmilter.
        """
        data, offset = self._data, self._offset
        size = len(data)
        if size - offset >= _HEADER_SIZE:
            (length,) = _U32.unpack_from(data, offset)
            end = offset + 4 + (length or 1)
            if end <= size and length <= self.limit + 1:  # the frame is in this piece: slice it out
                self.pending -= end - offset
                if end != size:
                    self._offset = end
                elif self._later:
                    self._data, self._offset = self._later.pop(0), 0
                else:
                    self._data, self._offset = b"", 0
                return chr(data[offset + 4]), data[offset + _HEADER_SIZE:end]
        elif self.pending < _HEADER_SIZE:
            return None
        else:
            length = _U32.unpack(self._peek(4))[0]
        if length > self.limit + 1:
            error = FrameSizeError(length - 1, self.limit)
            error.args = (f"{chr(self._peek(5)[4])!r} {error}",)
            raise error
        size = length or 1
        if self.pending < 4 + size:
            return None
        letter = chr(self._take(_HEADER_SIZE)[4])
        return letter, self._take(size - 1)

    def _peek(self, count: int) -> bytes:
        """The first ``count`` bytes (there are that many), left in place."""
        head = self._data[self._offset:self._offset + count]
        for piece in self._later:
            if len(head) >= count:
                break
            head += piece[:count - len(head)]
        return head

    def _take(self, count: int) -> bytes:
        """Remove and return the first ``count`` bytes (there are that many), joined in one copy."""
        if not count:
            return b""
        self.pending -= count
        views: list[memoryview] = []
        while count:
            data, offset = self._data, self._offset
            available = len(data) - offset
            if count < available:
                views.append(memoryview(data)[offset:offset + count])
                self._offset = offset + count
                break
            views.append(memoryview(data)[offset:])
            count -= available
            self._next_piece()
        if len(views) == 1:
            return bytes(views[0])
        return b"".join(views)

    def _next_piece(self) -> None:
        """The current piece is used up: go on to the next one, or hold nothing."""
        self._data, self._offset = self._later.pop(0) if self._later else b"", 0
