import mmap
import os
import time
from pathlib import Path

import pytest

from distributed_pt.dist import remove_stale_shm_buffers


def test_stale_shm_buffers_are_removed_and_mapped_or_new_ones_kept():
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    names = ("stale", "live", "new")  # crashed run; running run; a run starting beside us, not mapped yet
    stale, live, new = (shm / f"deepspeed_allreduce_buffer_{os.getuid()}_test-{n}_{os.getpid()}_0" for n in names)
    for f in (stale, live, new):
        f.write_bytes(b"\0" * 4096)
    old = time.time() - 600
    for f in (stale, live):
        os.utime(f, (old, old))
    try:
        with live.open("r+b") as fh, mmap.mmap(fh.fileno(), 4096):  # a running job maps its buffer
            removed = remove_stale_shm_buffers()
            assert stale in removed and not stale.exists()
            assert live not in removed and live.exists()
            assert new not in removed and new.exists()
    finally:
        for f in (stale, live, new):
            f.unlink(missing_ok=True)
