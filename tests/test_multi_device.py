"""Device handling: launches go to the tensors' device, one cache entry serves every device of an arch,
and the tensor-parallel example. Tests that need two GPUs skip with a reason on one."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flashinfer_jit import ops

REPO = Path(__file__).resolve().parents[1]
needs_two_gpus = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="needs 2 CUDA devices (this machine has %d)" % (torch.cuda.device_count() if torch.cuda.is_available() else 0),
)


def test_device_guard_switches_and_restores(monkeypatch):
    current = {"index": 0}
    calls = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["index"])

    def set_device(index):
        calls.append(index)
        current["index"] = index

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    with ops.device_guard(torch.device("cuda", 1)):
        assert current["index"] == 1
    assert current["index"] == 0 and calls == [1, 0]
    calls.clear()
    with ops.device_guard(torch.device("cuda", 0)):  # already current: no device switch at all
        pass
    assert calls == []


def test_cache_key_does_not_depend_on_the_device(monkeypatch):
    """One entry serves all devices of an arch: nothing device-specific (index, name, UUID) is hashed."""
    from flashinfer_jit import loader, spec, toolchain

    monkeypatch.setattr(toolchain, "target_archs", lambda: ("90a",))
    s = spec.MergeStateSpec(head_dim=128, dtype="bf16")
    first = loader.compute_key(s).key
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert loader.compute_key(s).key == first


@needs_two_gpus
def test_same_wrapper_code_on_two_devices():
    import flashinfer_jit as fij

    results = []
    for index in (0, 1):
        device = torch.device("cuda", index)
        g = torch.Generator().manual_seed(0)
        qo = torch.tensor([0, 37, 300], dtype=torch.int32)
        q = torch.randn(300, 8, 128, generator=g).to(device, torch.bfloat16)
        k = torch.randn(300, 2, 128, generator=g).to(device, torch.bfloat16)
        v = torch.randn(300, 2, 128, generator=g).to(device, torch.bfloat16)
        w = fij.BatchPrefillWithRaggedKVCacheWrapper(torch.empty(8 << 20, dtype=torch.uint8, device=device))
        w.plan(qo, qo, 8, 2, 128, causal=True, q_data_type=torch.bfloat16)
        with torch.cuda.device(0):  # the current device is not the tensors' device for index 1
            results.append(w.run(q, k, v).cpu())
    assert torch.equal(results[0], results[1])


@pytest.mark.gpu
def test_tensor_parallel_example_matches_single_gpu(tmp_path):
    if shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists():
        pytest.skip("torchrun is not installed")
    world = min(2, torch.cuda.device_count())
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", "--master-port=29517",
           str(REPO / "examples" / "tensor_parallel.py"), "--check"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "tensor-parallel vs single GPU" in proc.stdout
