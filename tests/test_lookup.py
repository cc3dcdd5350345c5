"""What prebuild shares with the toolchain and the loader instead of restating it: the cap on parallel
nvccs by free memory (toolchain.memory_capped_jobs) and the read-only cache lookup (loader.lookup),
which must never quarantine or write, since prebuild dry runs use it. Fake compiler, no CUDA."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from flashinfer_jit import cache, loader, prebuild, toolchain
from flashinfer_jit.spec import MergeStateSpec

SPEC = MergeStateSpec(head_dim=64, dtype="fp16")
ARCHS = ("90a",)


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(toolchain.torch.cuda, "is_available", lambda: False)


def test_memory_capped_jobs(monkeypatch):
    monkeypatch.setattr(toolchain, "_available_memory", lambda: 5 * toolchain.NVCC_JOB_BYTES + 1)
    assert toolchain.memory_capped_jobs(64) == 5
    assert toolchain.memory_capped_jobs(3) == 3
    assert toolchain.memory_capped_jobs(0) == 1
    monkeypatch.setattr(toolchain, "_available_memory", lambda: 100)  # not even one fits: still one
    assert toolchain.memory_capped_jobs(8) == 1
    monkeypatch.setattr(toolchain, "_available_memory", lambda: None)  # unknown: no cap
    assert toolchain.memory_capped_jobs(40) == 40


def test_build_and_prebuild_share_the_memory_cap(monkeypatch):
    monkeypatch.delenv("MAX_JOBS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 32)
    calls = []

    def cap(jobs: int) -> int:
        calls.append(jobs)
        return 7

    monkeypatch.setattr(toolchain, "memory_capped_jobs", cap)
    assert toolchain.build_jobs(num_sources=20) == 7
    assert prebuild.default_jobs(100) == 7
    assert prebuild.default_jobs(100, requested=12) == 7
    assert prebuild.default_jobs(4) == 4  # never more than there is to build
    assert calls == [32, 32, 12, 32]  # the job budget is capped first, then limited to the sources / work


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _damage(library: Path) -> None:
    data = bytearray(library.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tmp = library.with_name(library.name + ".damaged")  # a new file: a mapped library is never changed in place
    tmp.write_bytes(bytes(data))
    os.replace(tmp, library)


def test_lookup_reads_only(fake_nvcc, cache_root, no_gpu, capsys):
    layer = cache.CacheLayer(cache_root, writable=True)
    info = loader.compute_key(SPEC, ARCHS)
    assert loader.lookup(SPEC, info, layer) is None  # miss: nothing created
    assert not cache_root.exists()

    entry, built = loader.ensure_built(SPEC, info, layer)
    assert built
    found = loader.lookup(SPEC, info, layer)
    assert found is not None and found.path == entry.path
    assert prebuild._lookup(SPEC, ARCHS, layer)[1].path == entry.path

    _damage(entry.library)
    before = _tree(cache_root)
    assert loader.lookup(SPEC, info, layer) is None
    assert prebuild._lookup(SPEC, ARCHS, layer)[1] is None
    code = prebuild.run([SPEC], [ARCHS], layer, dry_run=True).outcomes[0].status
    assert code == prebuild.PLANNED
    assert _tree(cache_root) == before, "a read-only lookup changed the cache"
    assert not (cache_root / "quarantine").exists()

    # The build path, unlike lookup, quarantines the damaged entry and builds it again.
    entry2, built2 = loader.ensure_built(SPEC, info, layer)
    assert built2 and entry2.path == entry.path
    assert len(list((cache_root / "quarantine").iterdir())) == 1
    assert loader.lookup(SPEC, info, layer) is not None
