"""A message body kept in memory up to a threshold, then in a temporary file, up to a size cap."""

from __future__ import annotations

import io
import tempfile
from collections.abc import Iterator
from typing import IO

#: Default largest body kept for a filter; above it the filter gets its fallback.
DEFAULT_MAX_BODY_SIZE = 64 * 1024 * 1024
#: Default bytes of a kept body held in memory before it is spooled to a temporary file.
DEFAULT_BODY_SPOOL_THRESHOLD = 1024 * 1024


class BodySpool:
    """Collects body chunks; ``trouble`` says why it gave up (too large, disk error), else None.

    ``max_size`` 0 means no cap; ``threshold`` 0 writes to disk from the first byte.
    """

    __slots__ = ("_file", "max_size", "size", "threshold", "trouble")

    def __init__(self, threshold: int = DEFAULT_BODY_SPOOL_THRESHOLD, max_size: int = DEFAULT_MAX_BODY_SIZE) -> None:
        self.threshold = threshold
        self.max_size = max_size
        self.size = 0
        self.trouble: str | None = None
        self._file: tempfile.SpooledTemporaryFile[bytes] | None = None

    def write(self, data: bytes) -> bool:
        """Keep ``data``; False (and ``trouble`` set, the body dropped) once the body cannot be kept."""
        if self.trouble is not None:
            return False
        size = self.size + len(data)
        if self.max_size and size > self.max_size:
            return self._give_up(f"the body is over max_body_size ({self.max_size} bytes)")
        try:
            if self._file is None:
                self._file = tempfile.SpooledTemporaryFile(max_size=self.threshold)  # noqa: SIM115
                if not self.threshold:
                    self._file.rollover()
            self._file.write(data)
        except OSError as e:
            return self._give_up(f"the body cannot be spooled ({e})")
        self.size = size
        return True

    def file(self) -> IO[bytes]:
        """The body so far as a binary file positioned at its start (valid until the next write or close)."""
        body: IO[bytes] = self._file if self._file is not None else io.BytesIO()
        body.seek(0)
        return body

    def chunks(self, size: int) -> Iterator[bytes]:
        """The body in pieces of at most ``size`` bytes, read from the start."""
        body = self.file()
        while chunk := body.read(size):
            yield chunk

    def close(self) -> None:
        """Forget the body (a temporary file is deleted)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self.size = 0

    def _give_up(self, trouble: str) -> bool:
        self.close()
        self.trouble = trouble
        return False
