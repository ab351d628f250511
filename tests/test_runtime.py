"""runtime.keep_freed_memory: big freed buffers are reused instead of being page-faulted in again."""

from __future__ import annotations

import resource
import sys

import pytest
import torch

from lowres_birds.runtime import keep_freed_memory

BUFFER_BYTES = 64 << 20  # the size of a large activation
PAGES = BUFFER_BYTES // 4096


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_a_freed_64mb_buffer_is_reused_without_page_faults():
    keep_freed_memory()

    def steps() -> int:
        """Page faults of five allocate-write-free cycles, as activations go at every training step."""
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            torch.ones(BUFFER_BYTES, dtype=torch.uint8)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    steps()  # the first step grows the heap
    assert steps() < PAGES // 2  # glibc's default maps and unmaps each buffer: 5 x 16,384 faults per step
