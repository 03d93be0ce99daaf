"""Tests of flashnet.bench.gpu.inputs: the shards' eviction from the page cache before a cold read."""

from __future__ import annotations

from flashnet.bench.gpu.inputs import drop_page_cache


def test_without_drop_caches_each_shard_is_evicted_by_fadvise_and_the_result_says_so(tmp_path):
    shard = tmp_path / "train-000000.tar"
    shard.write_bytes(b"x" * 65536)
    assert drop_page_cache((str(shard),), use_drop_caches=False) == (
        "asked (posix_fadvise DONTNEED per shard; drop_caches not used)")
    assert shard.read_bytes() == b"x" * 65536  # eviction never changes the file
