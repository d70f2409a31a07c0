"""Start a test file's ``__main__`` as 2 ranks at once, the way torchrun would (Lightning then launches nothing)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_ranks(script: str | Path, out: Path, world: int = 2, timeout: float = 600, cwd: Path | None = None,
              env: dict[str, str] | None = None) -> float:
    """Run ``python script out`` as ``world`` ranks (gloo, one thread each); fail with the failing ranks' logs.

    Returns the wall time in seconds.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "WORLD_SIZE": str(world), "NODE_RANK": "0", **(env or {})}
    start = time.monotonic()
    procs = [subprocess.Popen([sys.executable, str(Path(script).resolve()), str(out)], cwd=cwd or REPO,
                              env={**base, "LOCAL_RANK": str(r), "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    elapsed = time.monotonic() - start
    failed = [r for r, p in enumerate(procs) if p.returncode != 0]
    assert not failed, f"ranks {failed} failed after {elapsed:.0f}s:\n" + "\n".join(
        f"--- rank {r}:\n{logs[r][-4000:]}" for r in failed)
    return elapsed
