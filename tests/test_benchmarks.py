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


def test_views_step_script_dry_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`benchmarks/views_step.py` at batch 2: one and three views timed on the same samples, the ratio
    printed and in the JSON."""
    out = tmp_path / "views.json"
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # it reuses coarse_to_fine.py's timed step
    monkeypatch.setattr(sys, "argv", ["views_step.py", "--repeats", "1", "--batch", "2", "--json", str(out)])
    runpy.run_path(str(BENCHMARKS / "views_step.py"), run_name="__main__")
    rows = json.loads(out.read_text())["rows"]
    assert [r["views"] for r in rows] == [1, 3] and rows[0]["step_x_one_view"] == 1.0
    assert all(r["step_s_per_sample"] > 0 and r["data_s_per_sample"] > 0 for r in rows)
    assert "3 views: training step" in capsys.readouterr().out


def test_context_step_script_dry_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`benchmarks/context_step.py` at batch 2: today's step and the context + conditioning step on the
    same samples, a one-slice and a 16-slice request, the ratios printed and in the JSON."""
    out = tmp_path / "context.json"
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setattr(
        sys, "argv", ["context_step.py", "--repeats", "1", "--batch", "2", "--cases", "3", "--json", str(out)]
    )
    runpy.run_path(str(BENCHMARKS / "context_step.py"), run_name="__main__")
    result = json.loads(out.read_text())
    assert [r["step_x_today"] > 0 for r in result["training"]] == [True, True]
    assert [r["slices"] for r in result["requests"]] == [1, 16] and result["requests"][0][
        "x_one_slice"
    ] == 1.0
    assert "request from 16 slices" in capsys.readouterr().out


def test_cache_build_script_dry_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`benchmarks/cache_build.py` on small phantoms: both builds, the sizes against the previous
    format, the loader rates and the extrapolation."""
    out = tmp_path / "cache.json"
    argv = [
        "cache_build.py",
        "--shape",
        "64",
        "64",
        "40",
        "--data",
        str(tmp_path / "data"),
        "--json",
        str(out),
    ]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(BENCHMARKS / "cache_build.py"), run_name="__main__")
    result = json.loads(out.read_text())
    assert [r["workers"] for r in result["build"]] == [1, 2]
    assert 0 < result["entry"]["case_bytes"] < result["entry"]["previous_format_bytes"]
    assert set(result["loader"]) == {"0", "2"} and all(v > 0 for v in result["loader"].values())
    assert "extrapolated to TotalSegmentator" in capsys.readouterr().out
