"""docs/training.md's snippets run as written: every ```python block, in order, in one namespace."""

from __future__ import annotations

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_training_page_snippets_run(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    text = open(os.path.join(ROOT, "docs", "training.md"), encoding="utf-8").read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 7
    monkeypatch.chdir(tmp_path)  # the snippets write their output folders in the working directory
    namespace: dict = {"__name__": "docs_training"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/training.md[block {i}]", "exec"), namespace)
    for folder in ("plain-loop-adapter", "sft-adapter", "accelerate-adapter", "trainer-run/checkpoint-2",
                   "sft-run/checkpoint-2"):
        files = set(os.listdir(tmp_path / folder))
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files, folder
        assert "model.safetensors" not in files
