from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support import NotifySocket


@pytest.fixture
async def notify(tmp_path: Path) -> AsyncIterator[NotifySocket]:
    """A bound systemd notify socket, closed however the test ends (a socket left open by
    a failed test would fail the next one with a ResourceWarning)."""
    sock = NotifySocket(tmp_path)
    with sock.sock:
        await sock.bind()
        yield sock
