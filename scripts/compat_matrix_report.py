"""Print the checkpoint-compatibility matrix against Hugging Face PEFT as a table (issue 6).

Runs the cases of ``tests/test_compat_matrix.py`` (the same builder the tests use, with the same checks)
and prints, for each, the max abs difference of the logits between the library that saved the adapter and
the one that loaded it, in both directions. A case whose checks fail shows the failure instead of a number.

    .venv/bin/python scripts/compat_matrix_report.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import test_compat_matrix as matrix  # noqa: E402 - needs tests/ on the path


def _run(fn, *args) -> str | None:
    with tempfile.TemporaryDirectory(prefix="compat-matrix-") as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fn(*args, Path(folder))
        except Exception as e:  # report it in the table, keep going
            return f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
    return None


def main() -> int:
    import argparse

    # --help answers without running the (minutes-long) report
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    start = time.perf_counter()
    failures: dict[tuple[str, str, str], str] = {}
    rows: list[tuple[str, str]] = []
    for model, method in matrix.CASES:
        rows.append((model, method))
        for direction in matrix.DIRECTIONS:
            error = _run(matrix.run_case, model, method, direction)
            if error:
                failures[(model, method, direction)] = error
    for model, method in matrix.LORA_VARIANTS:
        rows.append((model, method))
        for direction in matrix.DIRECTIONS:
            error = _run(matrix.run_case, model, method, direction)
            if error:
                failures[(model, method, direction)] = error
    for model in ("llama", "bert_cls"):
        for direction in matrix.DIRECTIONS:
            error = _run(matrix.test_two_adapters_in_one_folder, model, direction)
            for name in ("default", "second"):
                key = (model, f"two LoRA adapters, {name!r}")
                if key not in rows:
                    rows.append(key)
                if error:
                    failures[(*key, direction)] = error
    for model, method in matrix.BIN_CASES:
        error = _run(lambda m, k, folder: matrix.run_case(m, k, "peft_to_ours", folder, safe=False), model, method)
        rows.append((model, f"{method} (.bin)"))
        if error:
            failures[(model, f"{method} (.bin)", "peft_to_ours")] = error

    def cell(model: str, method: str, direction: str) -> str:
        key = (model, method, direction)
        if key in failures:
            return failures[key]
        if method.endswith(" (.bin)"):
            key = (model, method[: -len(" (.bin)")], direction + " (.bin)")
        value = matrix.RESULTS.get(key)
        if value is None:
            return "—"
        return f"{value:.1e}" + ("" if value <= matrix.TOLERANCE else " (over 1e-5)")

    print(f"Max abs logit difference, saved by one library and loaded by the other (tolerance "
          f"{matrix.TOLERANCE:g}; Hugging Face peft {matrix.peft.__version__})\n")
    print("| model | adapter | PEFT → peft-core | peft-core → PEFT |")
    print("| --- | --- | --- | --- |")
    for model, method in rows:
        print(f"| {model} | {method} | {cell(model, method, 'peft_to_ours')} | {cell(model, method, 'ours_to_peft')} |")
    print(f"\n{len(failures)} failure(s); {time.perf_counter() - start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
