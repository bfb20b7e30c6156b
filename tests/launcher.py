"""`fusemerge fuse` under torch.distributed.run with two processes on the CPU (gloo): the launcher
`accelerate launch --multi_gpu` uses, started directly, for the data-parallel tests of both pipelines."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def fuse_on_two_processes(recipe: Path, steps: str, **env: str) -> subprocess.CompletedProcess:
    """Run `fusemerge fuse RECIPE --steps STEPS -q` on two ranks; assert it exits 0."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), **env}
    with socket.socket() as probe:  # a free port for the process group's rendezvous
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
        + ["-m", "fusemerge.cli", "fuse", str(recipe), "--steps", steps, "-q"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done
