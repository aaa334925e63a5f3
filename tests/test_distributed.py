"""Training beyond one process, for real: two processes on this CPU (gloo, 127.0.0.1 only).

Run as a script, this file is one rank of a job (``python tests/test_distributed.py ddp|fsdp OUT``, with
RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set); the tests launch two ranks, then compare what they
wrote with single-process training on the same global batch, done here in the test process. Every launch
has a deadline and its whole process group is killed past it, so a hung collective fails a test instead
of hanging the suite.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_llama

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORLD = 2
STEPS = 3
GLOBAL_BATCH = 4
SEQ = 8
TARGETS = ["q_proj", "v_proj", "down_proj"]
LAUNCH_TIMEOUT = 75  # seconds for one 2-process job (each takes ~10 s)
FP_TOL = 1e-5  # 2 ranks vs 1 process: same maths, summed in another order

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed/gloo"),
]


# ---------------------------------------------------------------------- shared by ranks and tests
def _batches() -> torch.Tensor:
    """STEPS global batches of token ids; rank r trains on rows _rows(r) of each."""
    return torch.randint(2, 128, (STEPS, GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def _rows(rank: int, world: int = WORLD) -> slice:
    per = GLOBAL_BATCH // world
    return slice(rank * per, (rank + 1) * per)


def _model(dropout: float = 0.0) -> Any:
    """A tiny Llama with a trained LoRA adapter ("default") and an inactive one ("other"), built the same way
    in every process: the inactive adapter is frozen, so DDP must leave it alone without being told."""
    from peft_core import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["k_proj"]))
    model.train()
    return model


def _train(forward: Callable[..., Any], model: torch.nn.Module, rows: slice) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for batch in _batches():
        ids = batch[rows]
        loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _nbytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _adapter_state(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.get_adapter_state_dict("default").items()}


# ---------------------------------------------------------------------- one rank (script mode)
def _count_bytes(names: list[str], *, whole_list: bool = False) -> dict[str, int]:
    """Wrap torch.distributed functions (DDP and FSDP look them up at call time) to count the bytes they move:
    per call, the largest tensor (a reduce-scatter's input, an all-gather's output: the unsharded size), or
    with ``whole_list`` every tensor (a coalesced broadcast's list)."""
    counts = dict.fromkeys(names, 0)

    def tensors_in(args: tuple[Any, ...]) -> list[torch.Tensor]:
        found = []
        for a in args:
            found += [t for t in (a if isinstance(a, list | tuple) else [a]) if isinstance(t, torch.Tensor)]
        return found

    for name in names:
        original = getattr(dist, name, None)
        if original is None:  # not in this torch version
            continue

        def counting(*args: Any, _name: str = name, _original: Callable[..., Any] = original, **kwargs: Any) -> Any:
            sizes = [_nbytes([t]) for t in tensors_in((*args, *kwargs.values()))]
            counts[_name] += sum(sizes) if whole_list else max(sizes, default=0)
            return _original(*args, **kwargs)

        setattr(dist, name, counting)
    return counts


def _recording_hook(names: dict[int, str], log: list[tuple[int, list[str]]]) -> Callable[..., Any]:
    """A DDP comm hook that records each gradient bucket (bytes, parameter names), then all-reduces it."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(state, bucket):  # unannotated: DDP rejects annotations other than its own
        buf = bucket.buffer()
        log.append((buf.numel() * buf.element_size(), [names[id(p)] for p in bucket.parameters()]))
        return allreduce_hook(state, bucket)

    return hook


def _no_buffer_sync() -> dict[str, bool]:
    # torch 2.13 renamed DDP's broadcast_buffers to forward_sync_buffers (the old name warns).
    params = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def _ddp_rank(rank: int, out: Path) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    broadcast = _count_bytes(["_broadcast_coalesced"], whole_list=True)
    model = _model()
    names = {id(p): n for n, p in model.named_parameters()}
    ddp = DDP(model)  # the defaults, as accelerate builds it: find_unused_parameters=False
    init_broadcast = broadcast["_broadcast_coalesced"]
    buckets: list[tuple[int, list[str]]] = []
    ddp.register_comm_hook(None, _recording_hook(names, buckets))
    losses = _train(ddp, model, _rows(rank))
    logging = ddp._get_ddp_logging_data()
    module = ddp.module
    module.save_pretrained(out / "ddp_adapter")  # every rank calls it; rank 0 writes
    module.save_pretrained(out / f"ddp_by_rank{rank}")
    if rank == 1:
        module.save_pretrained(out / "ddp_forced_rank1", is_main_process=True)  # told otherwise: it writes
    result = {
        "losses": losses, "state": _adapter_state(module), "buckets": buckets, "init_broadcast": init_broadcast,
        "train_broadcast": broadcast["_broadcast_coalesced"] - init_broadcast,
        "state_bytes": _nbytes(module.state_dict().values()), "logging": logging,
    }

    # The lean set-up: every rank builds the same model (same seed), so DDP need not broadcast it at start,
    # and the frozen model's buffers never change, so they need no sync either: then only adapter gradients
    # ever cross. With dropout on, which draws from each rank's own RNG.
    lean_model = _model(dropout=0.1)
    names = {id(p): n for n, p in lean_model.named_parameters()}
    before = broadcast["_broadcast_coalesced"]
    lean = DDP(lean_model, init_sync=False, **_no_buffer_sync())
    lean_buckets: list[tuple[int, list[str]]] = []
    lean.register_comm_hook(None, _recording_hook(names, lean_buckets))
    _train(lean, lean_model, _rows(rank))
    result.update(lean_broadcast=broadcast["_broadcast_coalesced"] - before, lean_buckets=lean_buckets,
                  lean_state=_adapter_state(lean_model))
    return result


def _fsdp_rank(rank: int, out: Path) -> dict[str, Any]:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # FSDP2 moves gradients with reduce_scatter_single (older torch: reduce_scatter_tensor)
    counts = _count_bytes(["reduce_scatter_single", "reduce_scatter_tensor", "all_gather_single",
                           "all_gather_into_tensor"])

    def shard(model: torch.nn.Module, policy: Any) -> None:
        for layer in model.base_model.model.layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)

    model = _model()
    shard(model, MixedPrecisionPolicy())
    lora_type = type(model.get_parameter(next(n for n, p in model.named_parameters() if p.requires_grad))).__name__
    losses = _train(model, model, _rows(rank))
    reduced = counts["reduce_scatter_single"] + counts["reduce_scatter_tensor"]
    model.save_pretrained(out / "fsdp_adapter")  # gathers the shards on every rank, rank 0 writes
    result = {"losses": losses, "state": _adapter_state(model), "lora_param_type": lora_type,
              "reduce_scatter_bytes": reduced,
              "all_gather_bytes": counts["all_gather_single"] + counts["all_gather_into_tensor"]}

    # bf16 compute (parameters all-gathered in bf16), fp32 shards and gradient reduction
    mixed = _model()
    shard(mixed, MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    result["bf16_losses"] = _train(mixed, mixed, _rows(rank))
    mixed.save_pretrained(out / "fsdp_bf16_adapter")
    result["bf16_state"] = _adapter_state(mixed)
    return result


def _rank_main(scenario: str, out: Path) -> None:
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    # a peer that died or hangs makes collectives fail after this, rather than wait forever
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    try:
        result = {"ddp": _ddp_rank, "fsdp": _fsdp_rank}[scenario](rank, out)
        torch.save(result, out / f"{scenario}_rank{rank}.pt")
        # both ranks tear down together: rank 0 hosts the store, and a gloo teardown racing the peer's last
        # messages aborted rank 0 now and then ("terminate called without an active exception", seen once in CI)
        dist.barrier()
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------- launching
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _base_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore::FutureWarning")
    return env


def _run_all(commands: list[tuple[list[str], dict[str, str]]], logs: Path) -> None:
    """Start the commands together (each in its own process group), wait for all with one deadline, kill
    every group past it, and fail with the output tails if any failed."""
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for i, (cmd, env) in enumerate(commands):
        log = open(logs / f"proc{i}.log", "wb")  # closed below, once the process has ended
        procs.append((subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True), log))
    timed_out = False
    try:
        for proc, _ in procs:
            try:
                proc.wait(timeout=LAUNCH_TIMEOUT)
            except subprocess.TimeoutExpired:
                timed_out = True
                break
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the group: torchrun/accelerate children included
                proc.wait()
            log.close()
    codes = [proc.returncode for proc, _ in procs]
    if timed_out or any(codes):
        tails = "\n".join(f"--- proc{i} (exit {c}):\n{(logs / f'proc{i}.log').read_text()[-3000:]}"
                          for i, c in enumerate(codes))
        pytest.fail(f"{f'timed out after {LAUNCH_TIMEOUT}s' if timed_out else 'failed'}: {tails}")


def _launch_ranks(scenario: str, out: Path) -> list[dict[str, Any]]:
    port = str(_free_port())
    commands = []
    for rank in range(WORLD):
        env = _base_env()
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port)
        commands.append(([sys.executable, str(Path(__file__).resolve()), scenario, str(out)], env))
    _run_all(commands, out / f"{scenario}_logs")
    return [torch.load(out / f"{scenario}_rank{r}.pt", weights_only=False) for r in range(WORLD)]


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def workdir() -> Any:
    path = Path(tempfile.mkdtemp(prefix="peft-core-dist-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def single(workdir: Path) -> dict[str, Any]:
    """One process on the whole global batch: what the distributed runs must reproduce."""
    torch.manual_seed(0)
    model = _model()
    losses = _train(model, model, slice(None))
    model.save_pretrained(workdir / "single_adapter")
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=_batches()[0]).logits
    return {"losses": losses, "state": _adapter_state(model), "logits": logits, "dir": workdir / "single_adapter",
            "trainable": {n: p for n, p in model.named_parameters() if p.requires_grad},
            "frozen_bytes": _nbytes(p for p in model.parameters() if not p.requires_grad)}


@pytest.fixture(scope="module")
def ddp(workdir: Path) -> list[dict[str, Any]]:
    return _launch_ranks("ddp", workdir)


@pytest.fixture(scope="module")
def fsdp(workdir: Path) -> list[dict[str, Any]]:
    pytest.importorskip("torch.distributed.fsdp", reason="needs FSDP2").fully_shard  # noqa: B018
    return _launch_ranks("fsdp", workdir)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _reload_logits(folder: Path) -> torch.Tensor:
    """The saved adapter loaded into a plain, never-wrapped model."""
    from peft_core import PeftModel

    model = PeftModel.from_pretrained(tiny_llama(), folder).eval()
    with torch.no_grad():
        return model(input_ids=_batches()[0]).logits


# ---------------------------------------------------------------------- DDP
def test_ddp_ranks_identical_and_equal_to_single_process(ddp: list[dict[str, Any]], single: dict[str, Any]) -> None:
    r0, r1 = ddp
    assert _max_diff(r0["state"], r1["state"]) == 0.0  # averaged gradients, same optimizer: bit-identical
    assert _max_diff(r0["state"], single["state"]) < FP_TOL
    # each rank's loss is the mean over its half; their mean is the global batch's loss
    for step, loss in enumerate(single["losses"]):
        assert abs((r0["losses"][step] + r1["losses"][step]) / 2 - loss) < FP_TOL
    assert _max_diff(r0["lean_state"], r1["lean_state"]) == 0.0  # with dropout, which differs per rank


def test_ddp_reduces_only_adapter_gradients(ddp: list[dict[str, Any]], single: dict[str, Any]) -> None:
    trainable = single["trainable"]
    adapter_bytes = _nbytes(trainable.values())
    for rank in ddp:
        # no find_unused_parameters: every registered parameter got its gradient at every step
        assert rank["logging"]["find_unused_parameters"] == 0 and rank["logging"]["unused_parameter_size"] == 0
        assert rank["logging"]["total_parameter_size_bytes"] == adapter_bytes
        for buckets in (rank["buckets"], rank["lean_buckets"]):
            assert len(buckets) == STEPS  # one bucket a step: the adapter gradients fit in one
            for nbytes, names in buckets:
                assert nbytes == adapter_bytes and sorted(names) == sorted(trainable)
        assert not any(".other." in n for n in trainable)  # the inactive adapter is frozen, never registered
        # DDP's start-up broadcast sends the whole module once (frozen weights included): DDP's design. The
        # lean set-up (init_sync=False, no buffer sync) sends nothing but the adapter gradients.
        assert rank["init_broadcast"] >= rank["state_bytes"] > single["frozen_bytes"]
        assert rank["train_broadcast"] < 100 * STEPS  # the rotary inv_freq buffer (32 bytes) each forward
        assert rank["lean_broadcast"] == 0


def test_ddp_saves_on_main_process_same_files_and_reloads(ddp: list[dict[str, Any]], single: dict[str, Any],
                                                          workdir: Path) -> None:
    assert (workdir / "ddp_by_rank0").is_dir() and not (workdir / "ddp_by_rank1").exists()
    assert (workdir / "ddp_forced_rank1").is_dir()
    saved = workdir / "ddp_adapter"
    assert _files(saved) == _files(single["dir"]) == ["adapter_config.json", "adapter_model.safetensors",
                                                       "other/adapter_config.json", "other/adapter_model.safetensors"]
    for name in ("adapter_config.json", "other/adapter_config.json", "other/adapter_model.safetensors"):
        assert (saved / name).read_bytes() == (single["dir"] / name).read_bytes(), name
    from safetensors.torch import load_file

    assert _max_diff(load_file(saved / "adapter_model.safetensors"), ddp[0]["state"]) == 0.0
    assert (_reload_logits(saved) - single["logits"]).abs().max().item() < FP_TOL


# ---------------------------------------------------------------------- FSDP2
def test_fsdp2_trains_sharded_and_matches_single_process(fsdp: list[dict[str, Any]], single: dict[str, Any]) -> None:
    r0, r1 = fsdp
    assert r0["lora_param_type"] == "DTensor"  # the LoRA weights really were sharded
    assert _max_diff(r0["state"], r1["state"]) == 0.0
    assert _max_diff(r0["state"], single["state"]) < FP_TOL
    adapter_bytes = _nbytes(single["trainable"].values())
    for rank in fsdp:
        # gradients: the adapter's only (the tiny model's sizes divide by 2, so there is no shard padding);
        # the frozen weights are all-gathered for compute, which is what sharding means
        assert rank["reduce_scatter_bytes"] == STEPS * adapter_bytes
        assert rank["all_gather_bytes"] > single["frozen_bytes"]


def test_fsdp2_saves_full_adapter_that_reloads(fsdp: list[dict[str, Any]], single: dict[str, Any],
                                               workdir: Path) -> None:
    from safetensors.torch import load_file

    saved = workdir / "fsdp_adapter"
    assert _files(saved) == _files(single["dir"])
    on_disk = load_file(saved / "adapter_model.safetensors")
    assert _max_diff(on_disk, single["state"]) < FP_TOL
    assert all(on_disk[k].shape == v.shape for k, v in single["state"].items())  # gathered, not one shard
    assert (_reload_logits(saved) - single["logits"]).abs().max().item() < FP_TOL


def test_fsdp2_bf16_mixed_precision_keeps_fp32_adapter(fsdp: list[dict[str, Any]], single: dict[str, Any],
                                                       workdir: Path) -> None:
    from safetensors.torch import load_file

    r0, r1 = fsdp
    assert _max_diff(r0["bf16_state"], r1["bf16_state"]) == 0.0
    on_disk = load_file(workdir / "fsdp_bf16_adapter" / "adapter_model.safetensors")
    assert {t.dtype for t in on_disk.values()} == {torch.float32}
    # bf16 compute changes the rounding, not the training: the fp32 run's losses to bf16 precision (measured: 8e-5)
    for step, loss in enumerate(single["losses"]):
        assert abs((r0["bf16_losses"][step] + r1["bf16_losses"][step]) / 2 - loss) < 2e-3


# ---------------------------------------------------------------------- accelerate (the example)
def _example(args: list[str], out: Path, launcher: list[str] | None) -> tuple[list[str], dict[str, str]]:
    script = str(ROOT / "examples" / "train_accelerate.py")
    common = ["--output_dir", str(out), "--steps", "4", "--lora_dropout", "0"]
    env = _base_env()
    env["HF_HOME"] = str(out.parent / "hf_home")  # no user accelerate config file can change the launch
    return ([*(launcher or [sys.executable]), script, *common, *args], env)


def _result(log: Path) -> dict[str, Any]:
    line = next(ln for ln in log.read_text().splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_accelerate_example_two_processes_match_one(workdir: Path) -> None:
    from safetensors.torch import load_file

    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    launcher = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
                "--main_process_port", str(_free_port())]
    one, two = workdir / "acc_1proc", workdir / "acc_2proc"
    logs = workdir / "acc_logs"
    # both at once: each process has one thread, and the machine has two cores
    _run_all([_example([], one, None), _example(["--cpu"], two, launcher)], logs)
    r1, r2 = _result(logs / "proc0.log"), _result(logs / "proc1.log")
    assert (r1["processes"], r2["processes"]) == (1, 2)
    assert r2["rank_max_abs_diff"] == 0.0 and r1["reload_max_abs_diff"] == r2["reload_max_abs_diff"] == 0.0
    assert _files(one) == _files(two) == ["adapter_config.json", "adapter_model.safetensors"]
    assert _max_diff(load_file(one / "adapter_model.safetensors"), load_file(two / "adapter_model.safetensors")) \
        < FP_TOL


if __name__ == "__main__":
    _rank_main(sys.argv[1], Path(sys.argv[2]))
