"""The GPU benchmark script (benchmarks/gpu.py) runs end to end: checked here on the CPU, small,
so that a session lent a GPU spends its minutes measuring, not debugging."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_both_tables(gpu_bench, tmp_path):
    out = tmp_path / "gpu.md"
    gpu_bench.main(["--device", "cpu", "--quick", "--output", str(out)])
    text = out.read_text()
    assert "## Training" in text and "## Prediction" in text
    record = json.loads(out.with_suffix(".json").read_text())
    rows = record["rows"]
    train = [r for r in rows if r["kind"] == "train"]
    predict = [r for r in rows if r["kind"] == "predict"]
    assert {r["ndim"] for r in train} == {2, 3} and {r["ndim"] for r in predict} == {2, 3}
    for r in train:
        assert len(r["times"]) == 2 and r["step_s"] > 0 and r["peak_allocated_mb"] is None  # CPU: no CUDA stats
    # the table rows name the batch and crop of every training case
    assert "| 2 × 64×64 |" in text and "| 1 × 16×48×48 |" in text
    by_dim = {r["ndim"]: r for r in predict if r["precision"] == "float32"}
    # the shipped 2D model finds the nuclei of the dense sample (53 in its mask)
    assert 35 <= by_dim[2]["objects"] <= 70
    assert by_dim[2]["shape"] == [256, 256] and by_dim[2]["voxels_per_s"] > 0
    # without --model-3d the 3D network is random and the table says so
    assert by_dim[3]["shape"] == [51, 120, 122] and "random weights" in by_dim[3]["weights"]
    assert by_dim[3]["network_s"] > 0


def test_tiled_volume_mirrors_at_the_seams(gpu_bench):
    volume = gpu_bench.test_volume(3, (2, 1, 3))
    s = gpu_bench.sample("qcanet-3d").image
    assert volume.shape == (2 * s.shape[0], s.shape[1], 3 * s.shape[2])
    assert (volume[: s.shape[0], :, : s.shape[2]] == s).all()
    # the second copy along Z is the mirror image: continuous across the seam
    assert (volume[s.shape[0], :, : s.shape[2]] == s[-1]).all()
