"""The persistent data disk both backends attach as the first virtio disk (`/dev/vda`): a sparse
raw file `<stateDir>/disk.raw` of `diskSize` bytes. The guest formats it on first boot and grows
its filesystem when the file grew; the host never shrinks or wipes it."""

from __future__ import annotations

import logging
import os

from virby.workers.backends.base import BackendError

log = logging.getLogger(__name__)

DISK_ALIGN = 1 << 20  # Virtualization.framework wants whole sectors; keep whole MiB


def ensure_disk(path: str, size: int) -> int:
    """Create the sparse data disk, or grow it to `size`. Returns its size. Raises BackendError
    when `size` is smaller than the disk: shrinking would cut off the guest's filesystem."""
    size = -(-size // DISK_ALIGN) * DISK_ALIGN
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        current = os.stat(path).st_size
        if current < size:
            os.truncate(path, size)
            log.info("grew %s from %d to %d bytes; the guest grows its filesystem at boot",
                     path, current, size)
            return size
        if current > size:
            raise BackendError(
                f"diskSize is {size} bytes but the data disk {path} already has {current}: disks "
                "are never shrunk (set diskSize back, or delete the file to start over empty)"
            ) from None
        return current
    try:
        os.ftruncate(fd, size)  # sparse: no blocks until the guest writes
    finally:
        os.close(fd)
    log.info("created data disk %s (%d bytes, sparse)", path, size)
    return size
