"""A fast smoke run of the digits demo (1 epoch per run) through its command line."""
import json

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from dylora_kernels.__main__ import main  # noqa: E402


@pytest.mark.parametrize("argv", [["demo"], []], ids=["python-m", "dylora-demo"])
def test_demo_smoke(argv, tmp_path, capsys):
    main([*argv, "--epochs", "1", "--pretrain-epochs", "2", "--out", str(tmp_path), "--no-progress",
          "--device", "cpu", "--seed", "3"])
    printed = capsys.readouterr().out
    assert "rank | DyLoRA (1 run) | LoRA (1 run per rank) | LoRA r_max truncated" in printed
    assert "training wall time: DyLoRA" in printed and "for 8 runs" in printed
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["seed"] == 3 and results["device"] == "cpu"
    for key in ("dylora", "lora", "lora_truncated"):
        assert list(results[key]) == [str(b) for b in range(1, 9)]
        assert all(0 <= acc <= 1 for acc in results[key].values())
    assert results["lora"]["8"] == results["lora_truncated"]["8"]  # the same rank-8 adapter
    assert results["frozen_base"]["upright"] > 0.5  # pretraining did learn the upright digits
    assert (tmp_path / "accuracy_vs_rank.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
