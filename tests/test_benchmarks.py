"""The benchmark scripts that only run on hardware this project's CI lacks keep running: their CPU dry runs."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def test_two_stage_gpu_script_dry_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`benchmarks/two_stage_gpu.py` on the CPU at its small size: every variant runs, the table and the
    three target lines print, and the JSON holds the ratios the GPU run will record."""
    out = tmp_path / "two_stage.json"
    argv = ["two_stage_gpu.py", "--device", "cpu", "--size", "small", "--steps", "1", "--loss-steps", "2",
            "--batches", "1", "--json", str(out)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(BENCHMARKS / "two_stage_gpu.py"), run_name="__main__")
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert len(result["rows"]) == 8, "lora/full x bf16/fp32 x checkpointing"
    assert all(r["active_cells"] and r["step_s"] > 0 for r in result["rows"])
    lora = [r for r in result["rows"] if r["variant"] == "lora"]
    full = [r for r in result["rows"] if r["variant"] == "full"]
    assert lora[0]["trainable_params"] < full[0]["trainable_params"] and lora[0]["adapter_bytes"] > 0
    assert result["loss_relative_difference"] < 0.05
    for start in ("LoRA steps/s at batch 1 in bf16", "LoRA/full step time", "loss after 2 steps"):
        assert start in printed
