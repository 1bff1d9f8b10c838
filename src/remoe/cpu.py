"""glibc malloc settings for CPU runs, applied by the entry scripts (train, evaluate, bench).

glibc returns every freed buffer above 32 MB to the OS (mmap), so each new activation-sized tensor
page-faults in afresh: on the 2-core CI machines a fresh 134 MB copy took 33 ms instead of 20, an
index_select 30 ms instead of 8, a bf16 cast 23 ms instead of 10. Raising the mmap/trim thresholds keeps
freed memory for reuse, as jemalloc/tcmalloc (PyTorch's CPU tuning guide) do; the cost is that the
process keeps its peak memory. glibc reads these only at start-up, so the script re-executes itself
once with them set. Values already in the environment win; REMOE_MALLOC=default turns this off.
Imports nothing heavy: it runs before torch is loaded.
"""

from __future__ import annotations

import os
import platform
import sys

MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(4 << 30),  # no mmap (fresh, zeroed pages) for buffers under 4 GiB
    "MALLOC_TRIM_THRESHOLD_": str(16 << 30),  # keep freed heap memory for the next step
    "MALLOC_TOP_PAD_": str(1 << 30),  # grow the heap in 1 GiB steps
}


def malloc_settings() -> dict[str, str | None]:
    """What this process runs with (recorded in run summaries and benchmark JSON)."""
    return {k: os.environ.get(k) for k in MALLOC_ENV}


def reexec_with_malloc_settings() -> None:
    if (sys.platform != "linux" or platform.libc_ver()[0] != "glibc" or os.environ.get("REMOE_MALLOC") == "default"
            or all(k in os.environ for k in MALLOC_ENV)):
        return
    env = {**MALLOC_ENV, **os.environ}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
