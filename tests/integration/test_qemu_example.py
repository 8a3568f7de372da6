"""units/qemu-monitor.yaml: QEMU serves QMP on a socket the supervisor bound (the seed's case)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None,
    reason="qemu-system-x86_64 is not installed (CI installs qemu-system-x86)",
)


async def query_version(path: Path) -> dict[str, object]:
    client = QMPClient("fdsupervisor-test")
    await asyncio.wait_for(client.connect(str(path)), 30)
    try:
        return dict(await client.execute("query-version"))
    finally:
        await client.disconnect()


@pytest.mark.timeout(120)
def test_qemu_answers_qmp_on_the_supervisors_socket(supervisor) -> None:
    sup = supervisor({"qemu-monitor": (ROOT / "units" / "qemu-monitor.yaml").read_text()})
    path = Path(sup.address("qmp").removeprefix("unix:"))
    first = sup.wait_for("worker_started")
    version = asyncio.run(query_version(path))
    assert version["qemu"]["major"] >= 2  # type: ignore[index]
    # QEMU crashes; the socket stays bound; the next QEMU answers on the same path
    mark = sup.mark()
    os.kill(first["pid"], signal.SIGKILL)
    second = sup.wait_for("worker_started", after=mark)
    assert second["pid"] != first["pid"]
    assert asyncio.run(query_version(path))["qemu"] == version["qemu"]
