"""The GPU check runs its CPU-sized version here, so it cannot rot before a GPU is lent (benchmarks/gpu_check.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import gpu_check


def test_gpu_check_cpu_sized_runs_every_step_and_records_them(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--cpu-sized", "--out", str(out), "--scratch", str(tmp_path / "work")]) == 0
    record = json.loads(out.read_text())
    assert record["device"] == "cpu" and record["cpu_sized"] and record["failed"] == []
    held = record["segmenters"]["segmenters"]
    assert len(held) == 1 and held[0]["device"] == "cpu" and held[0]["gpu_ids"] == []
    assert record["precision"]["agreement"] >= gpu_check.MIN_AGREEMENT and record["precision"]["pixels"] > 0
    methods = [row["method"] for row in record["throughput"]["rows"]]
    assert methods == ["model-only limit", "segpipe", "segpipe null model", "I/O floor"]
    for row in record["throughput"]["rows"][1:3]:
        assert row["overhead"]["infer_s"] >= row["overhead"]["compute_s"] > 0
    assert record["training"]["steps"] == 2 and record["training"]["train_loss"] > 0
    assert all(check["ok"] for check in record["checks"])


def test_gpu_check_without_a_gpu_refuses_the_full_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the full check would run")
    assert gpu_check.main(["--out", str(tmp_path / "gpu.json")]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "gpu.json").exists()
