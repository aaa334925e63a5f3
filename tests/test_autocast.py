"""Mixed precision (``torch.autocast("cpu", dtype=torch.bfloat16)``) against Hugging Face PEFT 0.21 (the oracle).

``TrainingArguments(bf16=True)`` and Accelerate's bf16 mode run the forward under autocast and the backward
outside it. Every case here does the same to a peft-core model and to a PEFT model holding the SAME adapter
weights (copied through the file format, or module to module for prefix tuning's MLP, whose file keeps
only its output), and compares the two:

- the matrix: LoRA on ``nn.Linear`` (llama q/v, and all-linear), on transformers' ``Conv1D`` (gpt2 c_attn),
  on ``nn.Embedding`` (embed_tokens), on ``nn.Conv2d`` (a small custom net); prompt tuning and prefix
  tuning with and without ``prefix_projection`` on llama, prefix tuning with the projection on t5;
  crossed with LoRA dropout 0 / 0.1 and train / eval mode. Loss and logits must equal PEFT's within bf16
  tolerance, and every trainable parameter gets a finite gradient equal to PEFT's. Where a dropout mask
  is drawn (train mode, LoRA dropout > 0 on a layer that applies it) the two libraries cannot draw the
  same mask, so there the loss and gradients are only checked to be finite and non-zero, and the loss
  to differ from the eval-mode one (the dropout really ran);
- mixed batches (``adapter_names=["a", "b"]``) under autocast, against PEFT's mixed batch;
- adapter dtype on bf16/fp16 base models (``autocast_adapter_dtype``), and an SGD step in each, with the
  forward under autocast and without it;
- ``low_cpu_mem_usage`` for ``get_peft_model`` and ``PeftModel.from_pretrained``;
- the transformers Trainer with ``bf16=True`` on CPU, against PEFT's model in the plain Trainer.

The base models' own dropout is switched off before wrapping (gpt2 and t5 have some): in train mode it
would draw masks the two libraries need not draw alike, and this file tests the adapters, not them.
``RESULTS`` collects each case's max differences (``pytest -s`` prints them as a table at the end).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from conftest import copy_adapter_weights, max_diff, model_inputs, tiny_gpt2, tiny_llama, tiny_t5
from peft_core import LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from safetensors.torch import load_file
from torch import nn

warnings.filterwarnings("ignore", message=".*will not detect padding tokens.*")
pytestmark = [
    # PEFT's notices about its own choices, not about the models under test: LoRA on an embedding makes its
    # state dict (copy_adapter_weights) hold the base embedding too; the mixed-batch adapters "a" and "b"
    # are the brief's names, and "a" is a letter of "lora_"; its prefix tuning passes past_key_values
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`:UserWarning"),
    pytest.mark.filterwarnings("ignore:Adapter name 'a' should not be contained:UserWarning"),
    pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning"),
]

BF16 = torch.bfloat16
#: bf16 keeps 8 significant bits (relative rounding 2**-9): losses of the tiny models (~4.9) then agree to
#: ~1e-3 and logits (|x| <~ 1) to ~3e-2; gradients, rounded through every bf16 layer of the backward, differ
#: by up to ~15% (relative norm, all-linear LoRA) between the libraries, each as far from the fp32 ones.
LOSS_TOL = 2e-2
LOGIT_TOL = 5e-2
GRAD_TOL = 0.2
N_VIRTUAL = 3

#: case id -> {"loss": ..., "logits": ..., "grad": ...} max differences against PEFT (filled as tests run;
#: nan: not compared)
RESULTS: dict[str, dict[str, float]] = {}


@pytest.fixture(scope="module", autouse=True)
def print_results() -> Iterator[None]:
    """The measured differences as a table once the module's tests ran (shown with ``pytest -s``)."""
    yield
    if RESULTS:
        print(f"\n{'case':58s} {'loss':>9s} {'logits':>9s} {'grad':>9s}")
        for name, r in RESULTS.items():
            print(f"{name:58s} {r['loss']:9.2e} {r['logits']:9.2e} {r['grad']:9.2e}")


def without_dropout(model: nn.Module) -> nn.Module:
    """The base model's own dropout off (``nn.Dropout`` modules, and t5's attention, which keeps a float)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        elif isinstance(getattr(m, "dropout", None), float):
            m.dropout = 0.0
    return model


class ConvNet(nn.Module):
    """A small image classifier: one Conv2d (the LoRA target) and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(pixels)).mean(dim=(2, 3)))


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return ConvNet().eval()


@dataclasses.dataclass(frozen=True)
class Case:
    """One column of the matrix: a base model, its inputs, and the adapter config given to both libraries."""

    model: Callable[[], nn.Module]
    flavour: str  # "llama", "gpt2", "t5" (conftest.model_inputs) or "conv"
    method: str  # "lora", "prompt", "prefix"
    config: dict[str, Any]
    #: LoRA dropout never applies here (an embedding looks rows up; neither library drops ids), so even
    #: train mode with dropout > 0 is deterministic and compared with PEFT
    dropout_inert: bool = False


LORA = {"r": 4, "lora_alpha": 16, "init_lora_weights": False}
CASES: dict[str, Case] = {
    "lora_linear_qv": Case(tiny_llama, "llama", "lora", {**LORA, "target_modules": ["q_proj", "v_proj"]}),
    "lora_all_linear": Case(tiny_llama, "llama", "lora", {**LORA, "target_modules": "all-linear"}),
    "lora_conv1d": Case(tiny_gpt2, "gpt2", "lora", {**LORA, "target_modules": ["c_attn"], "fan_in_fan_out": True}),
    "lora_embedding": Case(tiny_llama, "llama", "lora", {**LORA, "target_modules": ["embed_tokens"]},
                           dropout_inert=True),
    "lora_conv2d": Case(conv_net, "conv", "lora", {**LORA, "target_modules": ["conv"]}),
    "prompt_llama": Case(tiny_llama, "llama", "prompt", {"num_virtual_tokens": N_VIRTUAL}),
    "prefix_llama": Case(tiny_llama, "llama", "prefix", {"num_virtual_tokens": N_VIRTUAL}),
    "prefix_projection_llama": Case(tiny_llama, "llama", "prefix", {
        "num_virtual_tokens": N_VIRTUAL, "prefix_projection": True, "encoder_hidden_size": 16}),
    "prefix_projection_t5": Case(tiny_t5, "t5", "prefix", {
        "num_virtual_tokens": N_VIRTUAL, "prefix_projection": True, "encoder_hidden_size": 16}),
}
TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM", "conv": None}
OURS = {"lora": LoraConfig, "prompt": PromptTuningConfig, "prefix": PrefixTuningConfig}
THEIRS = {"lora": peft.LoraConfig, "prompt": peft.PromptTuningConfig, "prefix": peft.PrefixTuningConfig}


def configs(case: Case, dropout: float = 0.0, **extra: Any) -> tuple[Any, Any]:
    """(ours, PEFT's) config of a case: the same fields, given to both libraries."""
    kw = dict(case.config, **extra)
    if TASK[case.flavour] is not None:
        kw["task_type"] = TASK[case.flavour]
    if case.method == "lora":
        kw["lora_dropout"] = dropout
    return OURS[case.method](**kw), THEIRS[case.method](**kw)


def pair(case: Case, dropout: float = 0.0) -> tuple[nn.Module, nn.Module]:
    """(ours, PEFT's) on equal base models (own dropout off) holding the same adapter weights."""
    ours_cfg, theirs_cfg = configs(case, dropout)
    theirs = peft.get_peft_model(without_dropout(case.model()), theirs_cfg)
    ours = get_peft_model(without_dropout(case.model()), ours_cfg)
    copy_weights(theirs, ours)
    return ours, theirs


def copy_weights(theirs: nn.Module, ours: nn.Module, adapter: str = "default") -> None:
    if getattr(theirs.peft_config[adapter], "prefix_projection", False):
        # PEFT's file holds the MLP's output, not the MLP: it goes across module to module
        ours.adapter_modules[adapter].load_state_dict(theirs.prompt_encoder[adapter].state_dict())
    else:
        assert copy_adapter_weights(theirs, ours, adapter) > 0


def batch(case: Case, seed: int = 1) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(model inputs, labels): batch 2, 7 tokens (t5: 5 decoder tokens); the conv net: 2 images 3x6x6."""
    if case.flavour == "conv":
        g = torch.Generator().manual_seed(seed)
        return {"pixels": torch.randn(2, 3, 6, 6, generator=g)}, torch.tensor([1, 3])
    x = model_inputs(case.flavour, seed=seed)
    return x, x["decoder_input_ids" if case.flavour == "t5" else "input_ids"]


def run(model: nn.Module, case: Case, x: dict[str, torch.Tensor], labels: torch.Tensor,
        amp: bool = True, dtype: torch.dtype = BF16, **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits), the forward under ``dtype`` autocast as the Trainer runs it (the backward is the
    caller's, outside autocast, as there); ``amp=False``: autocast off."""
    with torch.autocast("cpu", dtype=dtype, enabled=amp):
        if case.flavour == "conv":
            logits = model(**x, **kw)
            return nn.functional.cross_entropy(logits.float(), labels), logits
        out = model(**x, labels=labels, **kw)
    return out.loss, out.logits


def key(name: str, peft_model: bool) -> str:
    """A trainable parameter's name, the same in both libraries (PEFT nests the user's model one level
    deeper and calls the prompt modules ``prompt_encoder``)."""
    if peft_model:
        name = name.replace("base_model.model.", "", 1).replace("prompt_encoder.", "adapter_modules.", 1)
    else:
        name = name.replace("base_model.", "", 1)
    return name


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    is_peft = isinstance(model, peft.PeftModel)
    return {key(n, is_peft): p for n, p in model.named_parameters() if p.requires_grad}


def checked_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter's gradient, each asserted present, finite and not all zero."""
    grads = {}
    for name, p in trainable(model).items():
        assert p.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient for {name}"
        assert p.grad.abs().max() > 0, f"all-zero gradient for {name}"
        grads[name] = p.grad
    assert grads, "nothing trainable"
    return grads


def grad_diff(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> float:
    """Largest relative difference of two gradient sets, ``|ours - theirs| / |theirs|`` (Frobenius norms) per
    parameter: bf16 rounds each entry by ~1% of the largest one, so entry-wise maxima are noise."""
    assert ours.keys() == theirs.keys()
    return max(((ours[k].float() - theirs[k].float()).norm() / theirs[k].float().norm()).item() for k in ours)


def base_logits(model: nn.Module, case: Case, x: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), model.disable_adapter():
        return run(model, case, x, labels)[1]


# ---------------------------------------------------------------- the matrix
MATRIX = [(c, d, m) for c in CASES for d in ((0.0, 0.1) if CASES[c].method == "lora" else (0.0,))
          for m in ("train", "eval")]


@pytest.mark.parametrize(("case_id", "dropout", "mode"), MATRIX)
def test_autocast_matches_peft(case_id: str, dropout: float, mode: str) -> None:
    case = CASES[case_id]
    ours, theirs = pair(case, dropout)
    for m in (ours, theirs):
        m.train(mode == "train")
    x, labels = batch(case)
    torch.manual_seed(0)  # the dropout mask of the train-mode cases: the same every run
    loss_o, logits_o = run(ours, case, x, labels)
    assert logits_o.dtype == BF16  # the autocast really ran
    loss_o.backward()
    assert math.isfinite(loss_o.item())
    grads_o = checked_grads(ours)
    # ours keeps fp32 adapter weights on an fp32 model, as PEFT does
    assert all(p.dtype == torch.float32 for p in trainable(ours).values())

    if mode == "train" and dropout > 0 and not case.dropout_inert:
        # PEFT's dropout mask cannot be reproduced; the dropout must at least have run
        ours.eval()
        with torch.no_grad():
            eval_loss = run(ours, case, x, labels)[0]
        assert abs(loss_o.item() - eval_loss.item()) > 1e-4, "train-mode dropout changed nothing"
        RESULTS[f"{case_id} p={dropout} {mode}"] = {"loss": math.nan, "logits": math.nan, "grad": math.nan}
        return

    loss_t, logits_t = run(theirs, case, x, labels)
    loss_t.backward()
    grads_t = checked_grads(theirs)
    result = {"loss": abs(loss_o.item() - loss_t.item()), "logits": max_diff(logits_o, logits_t),
              "grad": grad_diff(grads_o, grads_t)}
    RESULTS[f"{case_id} p={dropout} {mode}"] = result
    # the adapter moves the logits by more than the tolerance: one ignored under autocast fails below
    base = base_logits(ours, case, x, labels)
    # prompt tuning's logits have the virtual positions first; the base model's, only the input's
    assert max_diff(logits_o[:, logits_o.shape[1] - base.shape[1]:], base) > 2 * LOGIT_TOL
    assert result["loss"] <= LOSS_TOL * max(1.0, abs(loss_t.item())), result
    assert result["logits"] <= LOGIT_TOL, result
    assert result["grad"] <= GRAD_TOL, result

    # and ours is no further from the exact (fp32) numbers than PEFT under the same autocast: bf16 rounding
    # may differ between two correct implementations, a wrong dtype route shows up as a larger error
    theirs.zero_grad(set_to_none=True)
    loss_f, logits_f = run(theirs, case, x, labels, amp=False)
    loss_f.backward()
    grads_f = {k: p.grad for k, p in trainable(theirs).items()}
    assert abs(loss_o.item() - loss_f.item()) <= 1.5 * abs(loss_t.item() - loss_f.item()) + 1e-3
    assert max_diff(logits_o, logits_f) <= 1.5 * max_diff(logits_t, logits_f) + 1e-2
    assert grad_diff(grads_o, grads_f) <= 1.5 * grad_diff(grads_t, grads_f) + 1e-2


# ---------------------------------------------------------------- mixed batches
#: layer type -> (case whose base model and inputs are used, adapter "a"'s targets, adapter "b"'s targets)
MIXED = {
    "linear": ("lora_linear_qv", ["q_proj", "v_proj"], ["q_proj", "o_proj"]),
    "conv1d": ("lora_conv1d", ["c_attn"], ["c_attn", "c_proj"]),
    "embedding": ("lora_embedding", ["embed_tokens"], ["embed_tokens", "q_proj"]),
    "conv2d": ("lora_conv2d", ["conv"], ["conv", "head"]),
}


#: token counts covering both of ours' mixed-batch routes (rows grouped by adapter; one bmm per row from 8
#: tokens); the conv net has one image size
MIXED_CASES = [(layer, seq) for layer in MIXED for seq in ((4, 9) if layer != "conv2d" else (0,))]


@pytest.mark.parametrize(("layer", "seq"), MIXED_CASES)
def test_mixed_batch_under_autocast_matches_peft(layer: str, seq: int) -> None:
    case_id, targets_a, targets_b = MIXED[layer]
    case = CASES[case_id]
    ours_a, theirs_a = configs(case, target_modules=targets_a)
    ours_b, theirs_b = configs(case, target_modules=targets_b, r=2, lora_alpha=6)
    theirs = peft.get_peft_model(case.model(), theirs_a, adapter_name="a")
    ours = get_peft_model(case.model(), ours_a, adapter_name="a")
    theirs.add_adapter("b", theirs_b)
    ours.add_adapter("b", ours_b)
    for name in ("a", "b"):
        copy_weights(theirs, ours, name)
    theirs.eval()
    ours.eval()
    if case.flavour == "conv":
        x, labels = batch(case)
    else:
        x = model_inputs(case.flavour, seq=seq)
        labels = x["input_ids"]
    rows = ["a", "b"]
    with torch.no_grad():
        mixed_o = run(ours, case, x, labels, adapter_names=rows)[1]
        mixed_t = run(theirs, case, x, labels, adapter_names=rows)[1]
        single = {}
        for name in rows:
            ours.set_adapter(name)
            single[name] = run(ours, case, x, labels)[1]
    assert mixed_o.dtype == BF16
    diff = max_diff(mixed_o, mixed_t)
    RESULTS[f"mixed {layer} seq={seq}" if case.flavour != "conv" else f"mixed {layer}"] = {
        "loss": math.nan, "logits": diff, "grad": math.nan}
    assert diff <= LOGIT_TOL
    for i, name in enumerate(rows):
        assert max_diff(mixed_o[i], single[name][i]) <= LOGIT_TOL, name
    # the two adapters give each row different logits: a batch routed all to one adapter fails above
    assert max_diff(single["a"], single["b"]) > 2 * LOGIT_TOL


# ---------------------------------------------------------------- adapter dtype on half-precision base models
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: LoRA on Linear and Embedding layers, prompt tuning, and prefix tuning's MLP: what each library makes of
#: ``autocast_adapter_dtype`` (PEFT applies it to LoRA only; prompt modules are fp32 either way)
DTYPE_CASES = {
    "lora": Case(tiny_llama, "llama", "lora", {**LORA, "target_modules": ["q_proj", "v_proj", "embed_tokens"]}),
    "prompt": CASES["prompt_llama"],
    "prefix_projection": CASES["prefix_projection_llama"],
}
#: SGD's learning rate per method, for the tiny llama's small gradients: large enough that one step moves
#: the loss well past bf16 rounding (a prompt's gradients are the smallest)
LR = {"lora": 10.0, "prompt": 300.0, "prefix_projection": 10.0}


@pytest.mark.parametrize("amp", [True, False], ids=["autocast", "no_autocast"])
@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
@pytest.mark.parametrize("half", list(HALF))
@pytest.mark.parametrize("method", list(DTYPE_CASES))
def test_adapter_dtype_on_half_base_and_a_training_step_match_peft(method: str, half: str,
                                                                   autocast_adapter_dtype: bool, amp: bool) -> None:
    dtype, case = HALF[half], DTYPE_CASES[method]
    ours_cfg, theirs_cfg = configs(case)
    theirs = peft.get_peft_model(case.model().to(dtype), theirs_cfg, autocast_adapter_dtype=autocast_adapter_dtype)
    ours = get_peft_model(case.model().to(dtype), ours_cfg, autocast_adapter_dtype=autocast_adapter_dtype)
    dtypes = {k: p.dtype for k, p in trainable(ours).items()}
    assert dtypes == {k: p.dtype for k, p in trainable(theirs).items()}
    expected = dtype if method == "lora" and not autocast_adapter_dtype else torch.float32
    assert set(dtypes.values()) == {expected}
    copy_weights(theirs, ours)
    assert {k: p.dtype for k, p in trainable(ours).items()} == dtypes  # loading a file keeps them
    assert {p.dtype for n, p in ours.named_parameters() if not p.requires_grad} == {dtype}  # the base is untouched

    # one SGD step each, the forward under autocast in the base's dtype (what bf16=True / fp16=True do), or
    # without (a custom loop on a half-precision model: fp32 adapters then meet half activations unaided)
    x, labels = batch(case)
    losses, grads = [], []
    for m in (ours, theirs):
        m.train()
        before = {k: p.detach().clone() for k, p in trainable(m).items()}
        optimizer = torch.optim.SGD(list(trainable(m).values()), lr=LR[method])
        loss = run(m, case, x, labels, amp=amp, dtype=dtype)[0]
        loss.backward()
        grads.append(checked_grads(m))
        optimizer.step()
        for k, p in trainable(m).items():
            assert p.dtype == dtypes[k] and not torch.equal(p, before[k]), k  # every weight moved, dtype kept
        with torch.no_grad():
            losses.append((loss.item(), run(m, case, x, labels, amp=amp, dtype=dtype)[0].item()))
    (before_o, after_o), (before_t, after_t) = losses
    RESULTS[f"dtype {method} {half} adapter_dtype={autocast_adapter_dtype} {'autocast' if amp else 'no autocast'}"] = {
        "loss": max(abs(before_o - before_t), abs(after_o - after_t)), "logits": math.nan,
        "grad": grad_diff(*grads)}
    assert abs(before_o - before_t) <= LOSS_TOL and abs(after_o - after_t) <= LOSS_TOL
    assert before_t - after_t > 5e-3  # the step lowered PEFT's loss well past rounding, and ours alike:
    assert abs((before_o - after_o) - (before_t - after_t)) <= 0.2 * (before_t - after_t)
    assert grad_diff(*grads) <= GRAD_TOL


# ---------------------------------------------------------------- low_cpu_mem_usage
def assert_holds(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """``model``'s adapter is exactly ``weights`` (a PEFT file or state dict), and on no meta device. PEFT also
    writes the base embedding of LoRA on an embedding (``save_embedding_layers``): ours does not."""
    assert not any(p.is_meta for p in model.parameters())
    got = model.get_adapter_state_dict()
    assert got and got.keys() <= weights.keys()
    assert all(".base_layer." in k for k in weights.keys() - got.keys())
    for k in got:
        assert torch.equal(got[k], weights[k]), k


LCMU_CASES = {"lora": DTYPE_CASES["lora"], "prompt": CASES["prompt_llama"], "prefix": CASES["prefix_llama"]}


def test_get_peft_model_low_cpu_mem_usage_leaves_lora_on_meta_like_peft() -> None:
    case = LCMU_CASES["lora"]
    ours_cfg, theirs_cfg = configs(case)
    ours = get_peft_model(tiny_llama(), ours_cfg, low_cpu_mem_usage=True)
    theirs = peft.get_peft_model(tiny_llama(), theirs_cfg, low_cpu_mem_usage=True)
    for m in (ours, theirs):
        assert trainable(m) and all(p.is_meta for p in trainable(m).values())
        assert not any(p.is_meta for p in m.parameters() if not p.requires_grad)  # the base model is real
    assert trainable(ours).keys() == trainable(theirs).keys()

    # a state dict gives them memory and values, in both libraries alike
    source = peft.get_peft_model(tiny_llama(), theirs_cfg)  # init_lora_weights=False: values to tell apart
    weights = peft.get_peft_model_state_dict(source)
    from peft_core import set_peft_model_state_dict

    set_peft_model_state_dict(ours, {k: v.clone() for k, v in weights.items()})
    peft.set_peft_model_state_dict(theirs, {k: v.clone() for k, v in weights.items()}, low_cpu_mem_usage=True)
    assert not any(p.is_meta for p in ours.parameters())
    assert_holds(ours, weights)
    x, labels = batch(case)
    with torch.no_grad():
        assert max_diff(run(ours, case, x, labels, amp=False)[1], run(source, case, x, labels, amp=False)[1]) <= 1e-5
        diff = max_diff(run(ours, case, x, labels)[1], run(theirs, case, x, labels)[1])
    RESULTS["low_cpu_mem_usage get_peft_model + state dict"] = {"loss": math.nan, "logits": diff, "grad": math.nan}
    assert diff <= LOGIT_TOL


@pytest.mark.parametrize("base_dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("method", list(LCMU_CASES))
def test_from_pretrained_low_cpu_mem_usage_equals_file_and_normal_load(method: str, base_dtype: str,
                                                                       tmp_path: Path) -> None:
    case = LCMU_CASES[method]
    dtype = {"fp32": torch.float32, "bf16": BF16}[base_dtype]
    _, theirs_cfg = configs(case)
    peft.get_peft_model(tiny_llama(), theirs_cfg).save_pretrained(tmp_path)  # the oracle writes the file
    saved = load_file(tmp_path / "adapter_model.safetensors")
    lazy = PeftModel.from_pretrained(tiny_llama().to(dtype), tmp_path, low_cpu_mem_usage=True)
    normal = PeftModel.from_pretrained(tiny_llama().to(dtype), tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama().to(dtype), tmp_path, low_cpu_mem_usage=True)
    assert not any(p.is_meta for p in lazy.parameters())
    assert_holds(lazy, saved)
    # held in fp32 on a bf16 base too (autocast_adapter_dtype), as PEFT holds them (loaded for inference:
    # nothing is trainable, so the adapter's parameters are picked by name)
    for m, names in ((lazy, ("lora_", "adapter_modules.")), (theirs, ("lora_", "prompt_encoder."))):
        assert {p.dtype for n, p in m.named_parameters() if any(s in n for s in names)} == {torch.float32}
    x, labels = batch(case)
    with torch.no_grad():
        for amp in (False, True):
            assert torch.equal(run(lazy, case, x, labels, amp=amp)[1], run(normal, case, x, labels, amp=amp)[1])
        diff = max_diff(run(lazy, case, x, labels)[1], run(theirs, case, x, labels)[1])
    RESULTS[f"low_cpu_mem_usage from_pretrained {method} {base_dtype}"] = {
        "loss": math.nan, "logits": diff, "grad": math.nan}
    assert diff <= LOGIT_TOL


# ---------------------------------------------------------------- the transformers Trainer, bf16=True
class Rows(torch.utils.data.Dataset):
    """6 short token rows (3 steps of 2): each its own labels, as a causal LM learns them."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = (torch.arange(2, 10) * (i + 1)) % 120 + 2
        return {"input_ids": ids, "labels": ids}


def train_3_steps(model: nn.Module, trainer_cls: type, output_dir: Path) -> tuple[list[float], list[bool]]:
    """Per-step losses of 3 bf16 steps, and whether autocast was on in each LoRA forward (seen by a hook)."""
    from transformers import TrainingArguments

    seen: list[bool] = []
    layer = next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
    layer.register_forward_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    args = TrainingArguments(output_dir=str(output_dir), bf16=True, use_cpu=True, max_steps=3,
                             per_device_train_batch_size=2, report_to=[], save_strategy="no", logging_steps=1,
                             optim="sgd", learning_rate=1.0, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    trainer = trainer_cls(model=model, args=args, train_dataset=Rows())
    out = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert math.isfinite(out.training_loss) and len(losses) == 3
    return losses, seen


def test_adapter_trainer_bf16_trains_like_peft_in_the_trainer(tmp_path: Path) -> None:
    from peft_core.integrations.transformers import AdapterTrainer
    from transformers import Trainer

    ours_cfg, theirs_cfg = configs(CASES["lora_linear_qv"])
    ours = get_peft_model(tiny_llama(), ours_cfg)
    theirs = peft.get_peft_model(tiny_llama(), theirs_cfg)
    copy_weights(theirs, ours)
    start = {k: p.detach().clone() for k, p in trainable(ours).items()}
    losses_o, seen = train_3_steps(ours, AdapterTrainer, tmp_path / "ours")
    losses_t, _ = train_3_steps(theirs, Trainer, tmp_path / "theirs")
    assert seen and all(seen)  # the Trainer's bf16 really ran the adapter under autocast
    for k, p in trainable(ours).items():  # trained, and still fp32
        assert p.dtype == torch.float32 and torch.isfinite(p).all() and not torch.equal(p, start[k]), k
    diff = max(abs(a - b) for a, b in zip(losses_o, losses_t))
    # the same 3 SGD updates (AdamW would turn rounding noise in near-zero gradients into full-size steps):
    # ours' and PEFT's weights moved alike (relative norm of the moves)
    moved_o = {k: p.detach() - start[k] for k, p in trainable(ours).items()}
    moved_t = {k: p.detach() - start[k] for k, p in trainable(theirs).items()}
    update = grad_diff(moved_o, moved_t)
    RESULTS["AdapterTrainer bf16 3 steps (loss; grad = weight update)"] = {
        "loss": diff, "logits": math.nan, "grad": update}
    assert all(math.isfinite(v) for v in losses_o)
    # the steps' losses drift by ~2e-2 over 3 steps: a tolerance tighter than LOSS_TOL catches a wrong step
    assert diff <= 5e-3
    assert update <= GRAD_TOL
