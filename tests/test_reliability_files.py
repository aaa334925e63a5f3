"""Reliability under bad input, part 2: adapter weight files, and saves that fail or are killed midway.

Generated files (truncated, corrupted, wrong dtypes and shapes, missing and extra keys, padded, lying
headers) go through ``PeftModel.from_pretrained(model, folder)`` onto one reused base model: each must give a
``CheckpointError`` with the model as it was, or load (a float16 file, flipped bits in tensor data: safetensors
has no checksum) and unload cleanly. ``.bin`` files are read with ``torch.load(weights_only=True)``: a pickle
that would run code is refused, and a test proves nothing ran. Saves: an exception after any number of
written bytes, or during the final renames, leaves the previous folder byte-identical and no temporary file;
a real SIGKILL mid-save leaves the previous files intact (and a ``.peft-core-tmp-*`` file, which loads ignore).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import model_inputs, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st
from peft_core import CheckpointError, LoraConfig, PeftModel, get_peft_model
from reliability_support import FUZZ, STATS, check_error, fingerprint, unchanged, watchdog, write_summary
from safetensors.torch import save as st_save

TESTS = Path(__file__).resolve().parent
DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "C64", "U64",
          "U32", "U16", "XX", ""]
TMP_PREFIX = ".peft-core-tmp-"


@pytest.fixture(scope="module", autouse=True)
def _report(tmp_path_factory):
    yield
    write_summary(tmp_path_factory.getbasetemp())


def adapted(seed: int = 0) -> PeftModel:
    torch.manual_seed(seed)
    return get_peft_model(tiny_llama(), LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=4,
                                                   init_lora_weights=False))


def split(data: bytes) -> tuple[dict[str, Any], bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header: dict[str, Any], payload: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + payload


class Files:
    """A good adapter (safetensors and .bin) and the base model generated files are loaded onto."""

    def __init__(self, root: Path) -> None:
        self.root = root
        model = adapted()
        self.st_dir, self.bin_dir = root / "st", root / "bin"
        model.save_pretrained(self.st_dir)
        model.save_pretrained(self.bin_dir, safe_serialization=False)
        self.st_bytes = (self.st_dir / "adapter_model.safetensors").read_bytes()
        self.bin_bytes = (self.bin_dir / "adapter_model.bin").read_bytes()
        self.tensors = model.get_adapter_state_dict("default")
        self.header, self.payload = split(self.st_bytes)
        self.keys = sorted(k for k in self.header if k != "__metadata__")
        self.base = tiny_llama()
        self.before = fingerprint(self.base)
        self.x = model_inputs("llama")

    def load(self, what: str, data: bytes, binary: bool = False) -> None:
        folder = self.bin_dir if binary else self.st_dir
        (folder / ("adapter_model.bin" if binary else "adapter_model.safetensors")).write_bytes(data)
        STATS["files_tried"] += 1
        try:
            with warnings.catch_warnings(), watchdog(20, f"loading a file ({what})"):
                warnings.simplefilter("ignore")
                model = PeftModel.from_pretrained(self.base, folder)
        except Exception as exc:
            check_error(exc, what)
            assert isinstance(exc, CheckpointError), f"{what}: {type(exc).__name__} for a bad file: {exc}"
            assert unchanged(self.base, self.before), f"{what}: the base model changed after a refused load"
            return
        STATS["loads_accepted"] += 1
        with torch.no_grad():
            model(**self.x)
        assert model.unload() is self.base
        for p in self.base.parameters():
            p.requires_grad_(True)
        assert unchanged(self.base, self.before), f"{what}: unload() did not give the base model back"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return Files(tmp_path_factory.mktemp("files"))


# ---------------------------------------------------------------- generated safetensors files
def _header_edit(f: Files) -> st.SearchStrategy[tuple[str, bytes]]:
    key = st.sampled_from(f.keys)
    ints = st.one_of(st.integers(-3, 70), st.sampled_from([2**31, 2**32 + 1, 2**62, 2**63, 2**64 + 5]))

    def edit(change: tuple[str, str, Any]) -> tuple[str, bytes]:
        kind, k, value = change
        header = json.loads(json.dumps(f.header))
        if kind == "dtype":
            header[k]["dtype"] = value
        elif kind == "shape":
            header[k]["shape"] = value
        elif kind == "offsets":
            header[k]["data_offsets"] = value
        elif kind == "drop":
            header.pop(k)
        elif kind == "rename":
            header[value] = header.pop(k)
        elif kind == "metadata":
            header["__metadata__"] = value
        return f"header {kind}", join(header, f.payload)

    return st.one_of(
        st.tuples(st.just("dtype"), key, st.sampled_from(DTYPES)),
        st.tuples(st.just("shape"), key, st.lists(ints, max_size=4)),
        st.tuples(st.just("offsets"), key, st.lists(ints, min_size=0, max_size=3)),
        st.tuples(st.just("drop"), key, st.none()),
        st.tuples(st.just("rename"), key, st.text(max_size=40)),
        st.tuples(st.just("metadata"), key, st.one_of(st.dictionaries(st.text(max_size=5), st.text(max_size=5)),
                                                       st.integers(), st.lists(st.integers(), max_size=2))),
    ).map(edit)


def _retensor(f: Files) -> st.SearchStrategy[tuple[str, bytes]]:
    key = st.sampled_from(sorted(f.tensors))
    dtypes = st.sampled_from([torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool, torch.float16,
                              torch.bfloat16, torch.float64])
    shapes = st.lists(st.integers(0, 40), max_size=3).map(tuple)

    def make(change: tuple[str, str, Any]) -> tuple[str, bytes]:
        kind, k, value = change
        tensors = {name: t.detach().clone() for name, t in f.tensors.items()}
        if kind == "missing":
            tensors.pop(k)
        elif kind == "extra":
            tensors[value or "x"] = torch.zeros(2, 2)
        elif kind == "shape":
            tensors[k] = torch.zeros(value)
        elif kind == "dtype":
            tensors[k] = tensors[k].to(value)
        elif kind == "nonfinite":
            tensors[k] = torch.full_like(tensors[k], value)
        return f"tensors {kind}", st_save(tensors)

    return st.one_of(
        st.tuples(st.just("missing"), key, st.none()),
        st.tuples(st.just("extra"), key, st.one_of(st.text(max_size=30), st.sampled_from(
            ["base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight", "prompt_embeddings",
             "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"]))),
        st.tuples(st.just("shape"), key, shapes),
        st.tuples(st.just("dtype"), key, dtypes),
        st.tuples(st.just("nonfinite"), key, st.sampled_from([float("nan"), float("inf")])),
    ).map(make)


def _safetensors_mutations(f: Files) -> st.SearchStrategy[tuple[str, bytes]]:
    data = f.st_bytes
    size = len(data)
    return st.one_of(
        st.integers(0, size - 1).map(lambda i: ("truncated", data[:i])),
        st.binary(min_size=1, max_size=4096).map(lambda extra: ("padded", data + extra)),
        st.lists(st.tuples(st.integers(0, size - 1), st.integers(0, 255)), min_size=1, max_size=8)
        .map(lambda flips: ("flipped bytes", _flip(data, flips))),
        st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 7, 2**63, 100_000_001]))
        .map(lambda n: ("header length", struct.pack("<Q", n) + data[8:])),
        _header_edit(f),
        _retensor(f),
        st.one_of(st.binary(max_size=256), st.just(b""), st.just(b"\x00" * 8))
        .map(lambda b: ("random bytes", b)),
    )


def _flip(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for pos, value in flips:
        out[pos] = value
    return bytes(out)


@settings(FUZZ)
@given(data=st.data())
def test_generated_safetensors_files_give_checkpoint_errors_and_leave_the_model_unchanged(files, data):
    what, content = data.draw(_safetensors_mutations(files), label="file")
    files.load(what, content)


# ---------------------------------------------------------------- generated .bin files
def _bin_mutations(f: Files) -> st.SearchStrategy[tuple[str, bytes]]:
    good = f.bin_bytes

    def saved(obj: Any) -> bytes:
        import io

        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()

    k = sorted(f.tensors)[0]
    objects = st.sampled_from([
        ("a list", [torch.zeros(2)]), ("a tensor", torch.zeros(2)), ("ints", {k: 3}), ("int keys", {1: torch.zeros(2)}),
        ("nested", {k: {"w": torch.zeros(2)}}), ("None", None), ("a string", "LORA"),
        ("int tensor", {**f.tensors, k: f.tensors[k].to(torch.int64)}),
        ("wrong shape", {**f.tensors, k: torch.zeros(3, 3)}),
        ("parameters", {name: torch.nn.Parameter(t.clone()) for name, t in f.tensors.items()}),
        ("float16", {name: t.half() for name, t in f.tensors.items()}),
    ])
    return st.one_of(
        st.integers(0, len(good) - 1).map(lambda i: (".bin truncated", good[:i])),
        st.lists(st.tuples(st.integers(0, len(good) - 1), st.integers(0, 255)), min_size=1, max_size=8)
        .map(lambda flips: (".bin flipped bytes", _flip(good, flips))),
        st.binary(max_size=256).map(lambda b: (".bin random bytes", b)),
        objects.map(lambda named: (f".bin holding {named[0]}", saved(named[1]))),
    )


@settings(FUZZ)
@given(data=st.data())
def test_generated_bin_files_give_checkpoint_errors_and_leave_the_model_unchanged(files, data):
    what, content = data.draw(_bin_mutations(files), label="file")
    files.load(what, content, binary=True)


# ---------------------------------------------------------------- named cases
def test_named_bad_files(files):
    f = files
    header = json.loads(json.dumps(f.header))
    k, first = f.keys[0], sorted(f.tensors)[0]
    cases = {
        "empty file": b"",
        "int tensors": st_save({**f.tensors, first: f.tensors[first].to(torch.int32)}),
        "shape mismatch": st_save({**f.tensors, first: torch.zeros(4, 5)}),
        "missing key": st_save({n: t for n, t in f.tensors.items() if n != first}),
        "extra key": st_save({**f.tensors, "base_model.model.model.layers.0.mlp.lora_A.weight": torch.zeros(4, 32)}),
        "header claims 2**62 bytes": struct.pack("<Q", 2**62) + f.st_bytes[8:],
        "tensor claims 2**60 bytes": join({**header, k: {**header[k], "data_offsets": [0, 2**60]}}, f.payload),
        "tensor of shape 2**31 x 2**31": join({**header, k: {**header[k], "shape": [2**31, 2**31]}}, f.payload),
        "complex tensor": st_save({**f.tensors, first: f.tensors[first].to(torch.complex64)}),
        "complex header": join({**header, k: {**header[k], "dtype": "C64", "shape": [2, 16]}}, f.payload),
    }
    expect = {"int tensors": "not floating point", "shape mismatch": "shape mismatch", "missing key": "missing",
              "extra key": "match nothing", "complex tensor": "not floating point"}
    for what, data in cases.items():
        STATS["files_tried"] += 1
        (f.st_dir / "adapter_model.safetensors").write_bytes(data)
        with pytest.raises(CheckpointError) as info:
            PeftModel.from_pretrained(f.base, f.st_dir)
        check_error(info.value, what)
        assert what not in expect or expect[what] in str(info.value), (what, str(info.value))
        assert unchanged(f.base, f.before), what
    (f.st_dir / "adapter_model.safetensors").write_bytes(f.st_bytes)


def test_a_file_much_larger_than_its_header_is_refused_without_reading_it(files, monkeypatch):
    """A 4 GiB file (sparse: it takes no disk) with a valid adapter at its start: refused after reading 8 bytes
    and the header, never read whole into memory."""
    path = files.st_dir / "adapter_model.safetensors"
    with open(path, "wb") as fh:
        fh.write(files.st_bytes)
        fh.truncate(4 << 30)
    read_whole = []
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: read_whole.append(self) or real(self))
    STATS["files_tried"] += 1
    try:
        with pytest.raises(CheckpointError, match="header describes") as info:
            PeftModel.from_pretrained(files.base, files.st_dir)
        assert path not in read_whole  # behaviour, not a wall-clock bound: the file was never read whole
        check_error(info.value, "file padded to 4 GiB")
        assert unchanged(files.base, files.before)
    finally:
        path.write_bytes(files.st_bytes)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(files, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    zipped = tmp_path / "zip.bin"
    torch.save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": Evil()}, zipped)
    legacy = tmp_path / "legacy.bin"
    legacy.write_bytes(pickle.dumps({"w": Evil()}))
    # the test itself must not have triggered it
    assert not marker.exists()
    st_path = files.bin_dir / "adapter_model.safetensors"
    assert not st_path.exists()  # the .bin folder: load must take adapter_model.bin
    for what, path in [("evil pickle (torch zip)", zipped), ("evil pickle (legacy)", legacy)]:
        (files.bin_dir / "adapter_model.bin").write_bytes(path.read_bytes())
        STATS["files_tried"] += 1
        with pytest.raises(CheckpointError, match="weights_only") as info:
            PeftModel.from_pretrained(files.base, files.bin_dir)
        check_error(info.value, what)
        assert not marker.exists(), "the pickle ran code"
        assert unchanged(files.base, files.before)
    good = adapted().get_adapter_state_dict("default")
    torch.save(good, files.bin_dir / "adapter_model.bin")  # and a plain-tensor .bin still loads
    PeftModel.from_pretrained(tiny_llama(), files.bin_dir)


# ---------------------------------------------------------------- saves that fail midway
def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _two_adapters(seed: int) -> PeftModel:
    model = adapted(seed)
    model.add_adapter("other", LoraConfig(target_modules=["v_proj"], r=2, init_lora_weights=False))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A folder holding a saved two-adapter model (v1), its bytes, and a different model (v2) to save over it."""
    root = tmp_path_factory.mktemp("saves")
    v1 = _two_adapters(1)
    v1.save_pretrained(root)
    x = model_inputs("llama")
    with torch.no_grad():
        logits = v1(**x).logits
    return root, _snapshot(root), _two_adapters(2), logits, x


def _check_previous_folder(root: Path, before: dict[str, bytes], logits: torch.Tensor, x: dict) -> None:
    assert _snapshot(root) == before, "the previous adapter files changed"
    leftovers = [p.name for p in root.rglob(f"{TMP_PREFIX}*")]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    with torch.no_grad():
        assert torch.equal(PeftModel.from_pretrained(tiny_llama(), root)(**x).logits, logits)


@settings(FUZZ)
@given(cut=st.integers(min_value=0, max_value=1 << 16))
def test_a_save_failing_after_any_number_of_bytes_leaves_the_previous_folder(saved, cut):
    root, before, v2, logits, x = saved
    total = sum(len(b) for b in before.values())  # v2 writes files of the same sizes
    cut = cut % total  # fail before the last byte
    written = [0]
    real = os.write

    def write(fd: int, data: Any) -> int:
        if written[0] + len(data) > cut:
            real(fd, bytes(data)[: cut - written[0]])
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        written[0] += len(data)
        return real(fd, data)

    STATS["saves_interrupted"] += 1
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "write", write)
        with pytest.raises(OSError, match="injected"):
            v2.save_pretrained(root)
    _check_previous_folder(root, before, logits, x)


@pytest.mark.parametrize("failing_rename", [1, 2, 3, 4])
def test_a_save_failing_during_the_final_renames_puts_the_previous_files_back(saved, failing_rename):
    root, before, v2, logits, x = saved
    calls = [0]
    real = os.replace

    def replace(src: Any, dst: Any) -> None:
        if Path(src).name.startswith(TMP_PREFIX) and not str(src).endswith(".old"):
            calls[0] += 1
            if calls[0] == failing_rename:
                raise OSError(errno.EBUSY, "Device or resource busy (injected)")
        real(src, dst)

    STATS["saves_interrupted"] += 1
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "replace", replace)
        with pytest.raises(OSError, match="injected"):
            v2.save_pretrained(root)
    _check_previous_folder(root, before, logits, x)


def test_short_writes_are_completed_not_truncated(saved, tmp_path):
    """os.write may write fewer bytes than asked (a disk filling up, a signal); the rest must still be written,
    not a truncated file renamed into place."""
    _, _, v2, _, x = saved
    real = os.write
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "write", lambda fd, data: real(fd, bytes(data)[:7]))
        v2.save_pretrained(tmp_path / "short")
    v2.save_pretrained(tmp_path / "normal")
    assert _snapshot(tmp_path / "short") == _snapshot(tmp_path / "normal")
    with torch.no_grad():
        assert torch.equal(PeftModel.from_pretrained(tiny_llama(), tmp_path / "short")(**x).logits, v2(**x).logits)


def test_a_save_then_succeeds_and_loads(saved, tmp_path):
    _, before, v2, _, x = saved
    target = tmp_path / "copy"
    target.mkdir()
    for name, data in before.items():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_bytes(data)
    v2.save_pretrained(target)
    loaded = PeftModel.from_pretrained(tiny_llama(), target)
    with torch.no_grad():
        assert torch.equal(loaded(**x).logits, v2(**x).logits)
    assert not list(target.rglob(f"{TMP_PREFIX}*"))


CHILD = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {tests!r})
    import torch
    from conftest import tiny_llama
    from peft_core import LoraConfig, get_peft_model

    torch.manual_seed(7)
    model = get_peft_model(tiny_llama(), LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=4,
                                                    init_lora_weights=False))
    real, written, stall_after = os.write, [0], int(sys.argv[2])

    def stalling_write(fd, data):
        if written[0] + len(data) > stall_after:
            real(fd, bytes(data)[: stall_after - written[0]])
            print("STALLED", flush=True)
            time.sleep(600)
        written[0] += len(data)
        return real(fd, data)

    os.write = stalling_write
    model.save_pretrained(sys.argv[1])
    print("FINISHED", flush=True)
""")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_a_save_killed_midway_leaves_the_previous_files(tmp_path):
    """A real SIGKILL of a process in the middle of writing: deterministic, since the child stalls after a fixed
    number of bytes and says so before the parent kills it."""
    root = tmp_path / "adapter"
    v1 = adapted(3)
    v1.save_pretrained(root)
    before = _snapshot(root)
    x = model_inputs("llama")
    with torch.no_grad():
        logits = v1(**x).logits
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(TESTS)))
    cut = len(before["adapter_model.safetensors"]) // 2
    child = subprocess.Popen([sys.executable, str(script), str(root), str(cut)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(child.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while "STALLED\n" not in lines and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "STALLED\n" in lines, f"the child did not reach the stall: {lines} {child.stderr.read()[-2000:]}"
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        child.wait(timeout=30)
        child.stdout.close()
        child.stderr.close()
    STATS["saves_interrupted"] += 1
    leftovers = sorted(p.name for p in root.rglob(f"{TMP_PREFIX}*"))
    assert leftovers, "a killed save leaves its partial temporary file (documented)"
    assert {n: b for n, b in _snapshot(root).items() if not n.startswith(TMP_PREFIX)} == before
    with torch.no_grad():  # loads ignore the leftovers
        assert torch.equal(PeftModel.from_pretrained(tiny_llama(), root)(**x).logits, logits)
    v1.save_pretrained(root)  # and a later save works beside them; they are safe to delete
    assert sorted(p.name for p in root.rglob(f"{TMP_PREFIX}*")) == leftovers
