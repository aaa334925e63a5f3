"""The real pretrained all-MiniLM-L6-v2 (shipped by a PyPI package) on real SST-2 rows."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from conftest import SST2

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(SST2), reason="needs ../shared/data/sst2 beside the repository")
def test_lora_on_minilm_sst2_learns():
    from sst2_minilm import run

    result = run(train_rows=512, dev_rows=200, batch_size=16, lr=5e-3, data=Path(SST2))
    # an untrained head is at chance; a short LoRA run on real data must clearly beat it
    assert result["dev_accuracy_before"] < 0.65
    assert result["dev_accuracy_after"] >= 0.70, result
