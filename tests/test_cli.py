"""The `lora-sam3d` command as a user runs it (a real subprocess)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from lora_sam3d.data import HEART_CLASSES, discover_cases


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lora_sam3d.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_phantoms_command_writes_a_dataset(tmp_path: Path) -> None:
    result = run("phantoms", "--root", str(tmp_path / "d"), "--n-cases", "3", "--shape", "40", "40", "30")
    assert result.returncode == 0, result.stderr
    assert "wrote 3 heart phantoms" in result.stdout
    cases = discover_cases(tmp_path / "d", HEART_CLASSES)
    assert [c.split for c in cases] == ["train", "val", "test"]


def test_training_commands_say_they_are_not_built() -> None:
    result = run("fit", "--config", "configs/demo.yaml")
    assert result.returncode == 2 and "not available" in result.stderr
    assert run("--help").returncode == 0
