import mmap
import os
from pathlib import Path

import pytest

from distributed_pt.dist import remove_stale_shm_buffers


def test_stale_shm_buffers_are_removed_and_mapped_ones_kept():
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    stale = shm / f"deepspeed_allreduce_buffer_{os.getuid()}_test-stale_{os.getpid()}_0"
    live = shm / f"deepspeed_allreduce_buffer_{os.getuid()}_test-live_{os.getpid()}_0"
    for f in (stale, live):
        f.write_bytes(b"\0" * 4096)
    try:
        with live.open("r+b") as fh, mmap.mmap(fh.fileno(), 4096):  # a running job maps its buffer
            removed = remove_stale_shm_buffers()
            assert stale in removed and not stale.exists()
            assert live not in removed and live.exists()
    finally:
        stale.unlink(missing_ok=True)
        live.unlink(missing_ok=True)
