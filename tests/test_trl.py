"""TRL's SFTTrainer and DPOTrainer on peft-core models (peft_core.integrations.trl): training, adapter-only
checkpoints and resume, gradients under gradient checkpointing, DPO's reference without a second model."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import tiny_llama

pytest.importorskip("trl")

VOCAB = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(125)]


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def sft_data(n: int = 16):
    from datasets import Dataset

    return Dataset.from_list([{"text": " ".join(f"w{(i + k) % 40 + 3}" for k in range(12))} for i in range(n)])


def dpo_data(n: int = 8):
    from datasets import Dataset

    rows = [{"prompt": f"w{i + 3} w{i + 4}", "chosen": f" w{i + 5} w{i + 6}", "rejected": f" w{i + 50} w{i + 60}"}
            for i in range(n)]
    return Dataset.from_list(rows)


def lora_model(init: bool = False):
    from peft_core import LoraConfig, get_peft_model

    return get_peft_model(tiny_llama(), LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=init))


def sft_config(output_dir, **kw):
    from trl import SFTConfig

    base = dict(output_dir=str(output_dir), per_device_train_batch_size=4, max_steps=6, learning_rate=5e-3,
                report_to=[], use_cpu=True, seed=0, logging_steps=1, disable_tqdm=True, save_steps=3,
                dataloader_num_workers=0, max_length=32)
    base.update(kw)
    return SFTConfig(**base)


def adapter(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.get_adapter_state_dict().items()}


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_sft_trains_checkpoints_the_adapter_and_resumes(tmp_path):
    from peft_core.integrations.trl import SFTTrainer

    model = lora_model()
    trainer = SFTTrainer(model=model, args=sft_config(tmp_path / "run"), train_dataset=sft_data(),
                         processing_class=tokenizer())
    trainer.train()
    seen = losses(trainer)
    assert seen[-1] < seen[0]
    trained = adapter(model)
    ckpt = tmp_path / "run" / "checkpoint-3"
    files = set(os.listdir(ckpt))
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}
    assert os.path.getsize(ckpt / "adapter_model.safetensors") < 64 * 1024

    again = lora_model()
    resumed = SFTTrainer(model=again, args=sft_config(tmp_path / "run"), train_dataset=sft_data(),
                         processing_class=tokenizer())
    resumed.train(resume_from_checkpoint=str(ckpt))
    got = adapter(again)
    for k in trained:
        torch.testing.assert_close(got[k], trained[k], rtol=0, atol=1e-5)


class _GradProbe:
    """Records, before the first optimiser step, the gradient norm of every trainable parameter."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Probe(TrainerCallback):
            def __init__(self) -> None:
                self.norms: dict[str, float] = {}
                self.checkpointing = False

            def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
                if not self.norms:
                    self.checkpointing = bool(model.get_base_model().is_gradient_checkpointing)
                    self.norms = {n: (0.0 if p.grad is None else float(p.grad.norm()))
                                  for n, p in model.named_parameters() if p.requires_grad}

        return Probe()


@pytest.mark.parametrize(("bf16", "reentrant"), [(True, False), (False, False), (True, True)],
                         ids=["bf16-default", "fp32", "bf16-reentrant"])
def test_sft_lora_gets_gradients_under_gradient_checkpointing(tmp_path, bf16, reentrant):
    """TRL's defaults (bf16=True, gradient_checkpointing=True, on the CPU too), bf16=False (whose loss path
    calls model(..., fused_lm_head=True)), and reentrant checkpointing, where only inputs that require grad carry
    gradients through a checkpointed block (so the embeddings' output must require grad)."""
    from peft_core.integrations.trl import SFTTrainer

    model = lora_model()
    probe = _GradProbe()
    args = sft_config(tmp_path, max_steps=1, bf16=bf16, gradient_checkpointing=True, save_strategy="no",
                      gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    trainer = SFTTrainer(model=model, args=args, train_dataset=sft_data(), processing_class=tokenizer(),
                         callbacks=[probe])
    trainer.train()
    assert probe.checkpointing
    assert probe.norms and all(n.count("lora_") for n in probe.norms)
    assert all(v > 0 for v in probe.norms.values()), probe.norms


def dpo_config(output_dir, **kw):
    from trl import DPOConfig

    base = dict(output_dir=str(output_dir), per_device_train_batch_size=4, max_steps=3, learning_rate=5e-3,
                report_to=[], use_cpu=True, seed=0, logging_steps=1, disable_tqdm=True, save_steps=3,
                dataloader_num_workers=0, max_length=32, bf16=False)
    base.update(kw)
    return DPOConfig(**base)


def test_dpo_uses_the_policy_with_adapters_disabled_as_reference(tmp_path):
    from peft_core.integrations.trl import DPOTrainer

    model = lora_model()  # random (non-identity) LoRA init: the policy differs from its base from the start
    trainer = DPOTrainer(model=model, args=dpo_config(tmp_path / "run"), train_dataset=dpo_data(),
                         processing_class=tokenizer())
    assert trainer.ref_model is None
    assert list(model.peft_config) == ["default"]  # no second ("ref") adapter is held

    calls = []
    original = type(model).disable_adapter

    def counting(self):
        calls.append(1)
        return original(self)

    batch = next(iter(trainer.get_train_dataloader()))
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(model, batch)
    type(model).disable_adapter = counting
    try:
        trainer.train()
    finally:
        type(model).disable_adapter = original
    assert len(calls) == 3  # the reference forward of each step
    assert any(h.get("loss") is not None for h in trainer.state.log_history)

    # the reference log-probs are the base model's: same sums with the adapter removed entirely
    base = tiny_llama()
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    logps = torch.log_softmax(logits.float(), -1)
    tgt = labels[:, 1:]
    mask = tgt != -100
    per_token = torch.gather(logps, 2, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    expected = per_token.sum(1)
    chosen, rejected = expected.chunk(2)
    torch.testing.assert_close(ref_chosen, chosen, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ref_rejected, rejected, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # and the policy's are not (so the check above is not vacuous)
        policy = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    assert not torch.allclose(policy, logits, atol=1e-3)
    files = set(os.listdir(tmp_path / "run" / "checkpoint-3"))
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files


def test_dpo_with_a_peft_core_peft_config_wraps_the_base(tmp_path):
    from peft_core import AdaptedModel, LoraConfig
    from peft_core.integrations.trl import DPOTrainer

    trainer = DPOTrainer(model=tiny_llama(), args=dpo_config(tmp_path, max_steps=1, save_strategy="no"),
                         train_dataset=dpo_data(4), processing_class=tokenizer(),
                         peft_config=LoraConfig(task_type="CAUSAL_LM", r=2))
    assert isinstance(trainer.model, AdaptedModel) and trainer.ref_model is None
    trainer.train()


def test_sft_matches_trl_with_hugging_face_peft(tmp_path):
    """The same LoRA weights trained by TRL through PEFT and through peft-core: the same losses, step by step."""
    import peft
    import trl
    from peft_core import PeftModel
    from peft_core.integrations.trl import SFTTrainer

    torch.manual_seed(1)
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "init")
    ours = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "init"), is_trainable=True)

    runs = []
    for cls, model, name in ((trl.SFTTrainer, theirs, "peft"), (SFTTrainer, ours, "ours")):
        trainer = cls(model=model, args=sft_config(tmp_path / name, max_steps=4, save_strategy="no"),
                      train_dataset=sft_data(), processing_class=tokenizer())
        trainer.train()
        runs.append(losses(trainer))
    assert len(runs[0]) == 4
    torch.testing.assert_close(torch.tensor(runs[1]), torch.tensor(runs[0]), rtol=1e-4, atol=1e-4)


def test_trl_module_names_are_restored_and_errors_are_clear(tmp_path):
    import accelerate.utils
    import trl.trainer.dpo_trainer as dpo
    import trl.trainer.sft_trainer as sft
    from peft_core import LoraConfig
    from peft_core.integrations.trl import SFTTrainer

    SFTTrainer(model=lora_model(), args=sft_config(tmp_path, max_steps=1), train_dataset=sft_data(4),
               processing_class=tokenizer())
    assert sft.is_peft_model is accelerate.utils.is_peft_model and dpo.is_peft_model is accelerate.utils.is_peft_model
    assert not sft.is_peft_model(lora_model())  # outside our trainers TRL is untouched
    with pytest.raises(ValueError, match="peft_config"):
        SFTTrainer(model=lora_model(), args=sft_config(tmp_path, max_steps=1), train_dataset=sft_data(4),
                   processing_class=tokenizer(), peft_config=LoraConfig(task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="lm_head"):
        SFTTrainer(model=tiny_llama(), args=sft_config(tmp_path, max_steps=1), train_dataset=sft_data(4),
                   processing_class=tokenizer(),
                   peft_config=LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "lm_head"]))


_WITHOUT_PEFT = r'''
import importlib.abc, importlib.util, pathlib, sys, tempfile

real_find_spec = importlib.util.find_spec

def find_spec(name, package=None):  # what transformers, accelerate and TRL ask to learn whether PEFT is there
    return None if name.split(".")[0] == "peft" else real_find_spec(name, package)

class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "peft":
            raise ModuleNotFoundError(name)

importlib.util.find_spec = find_spec
sys.meta_path.insert(0, Hide())
sys.path.insert(0, sys.argv[1])
import test_trl

tmp = pathlib.Path(tempfile.mkdtemp())
test_trl.test_sft_lora_gets_gradients_under_gradient_checkpointing(tmp / "sft", True, False)
test_trl.test_dpo_uses_the_policy_with_adapters_disabled_as_reference(tmp / "dpo")
assert "peft" not in sys.modules
print("trained without peft")
'''


def test_trainers_work_without_hugging_face_peft_installed():
    """TRL binds PEFT's names only when PEFT is installed; the trainers must not need them."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", _WITHOUT_PEFT, os.path.dirname(__file__)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trained without peft" in done.stdout


def test_stock_trl_trainer_is_pointed_to_this_module(tmp_path):
    """TRL's own SFTTrainer on a peft-core model takes its full-model paths; building it says where ours are."""
    import trl

    with pytest.warns(UserWarning, match=r"peft_core\.integrations\.trl\.SFTTrainer"):
        stock = trl.SFTTrainer(model=lora_model(), args=sft_config(tmp_path, max_steps=1, bf16=False),
                               train_dataset=sft_data(4), processing_class=tokenizer())
    # the failure the integration exists for: TRL patched its fused head onto the wrapper, which then finds no
    # backbone output
    with pytest.raises(AttributeError, match="last_hidden_state"):
        stock.train()


def test_dpo_matches_trl_with_hugging_face_peft(tmp_path):
    """TRL's DPO with a PEFT LoRA (from peft_config: reference = adapters disabled) and ours from the same initial
    weights: the same losses and rewards, step by step; only the adapter trains."""
    import peft
    import trl
    from peft_core import PeftModel
    from peft_core.integrations.trl import DPOTrainer

    torch.manual_seed(2)
    theirs = trl.DPOTrainer(model=tiny_llama(), args=dpo_config(tmp_path / "peft", save_strategy="no"),
                            train_dataset=dpo_data(), processing_class=tokenizer(),
                            peft_config=peft.LoraConfig(task_type="CAUSAL_LM", r=4))
    theirs.model.save_pretrained(tmp_path / "init")
    model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "init"), is_trainable=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    before = adapter(model)
    ours = DPOTrainer(model=model, args=dpo_config(tmp_path / "ours", save_strategy="no"),
                      train_dataset=dpo_data(), processing_class=tokenizer())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    theirs.train()
    ours.train()
    assert any(not torch.equal(before[k], v) for k, v in adapter(model).items())
    keys = ("loss", "rewards/chosen", "rewards/rejected")
    got = [[h[k] for k in keys] for h in ours.state.log_history if "loss" in h]
    want = [[h[k] for k in keys] for h in theirs.state.log_history if "loss" in h]
    assert len(got) == 3
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-3, atol=1e-5)


def test_dpo_precomputed_reference_and_sft_from_a_peft_core_config(tmp_path):
    """precompute_ref_log_probs=True computes the reference once, from the base (adapters disabled); SFT takes a
    peft-core peft_config as DPO does."""
    from peft_core import AdaptedModel, LoraConfig
    from peft_core.integrations.trl import DPOTrainer, SFTTrainer

    model = lora_model()
    trainer = DPOTrainer(model=model, args=dpo_config(tmp_path / "dpo", max_steps=1, save_strategy="no",
                                                      precompute_ref_log_probs=True),
                         train_dataset=dpo_data(4), processing_class=tokenizer())
    assert trainer.ref_model is None
    assert "ref_chosen_logps" in trainer.train_dataset.column_names
    batch = next(iter(trainer.get_train_dataloader()))  # carries its precomputed reference log-probs
    # the online reference (adapters disabled, checked against the bare base above) gives the same numbers
    want_chosen, want_rejected = trainer.compute_ref_log_probs(model, batch)
    torch.testing.assert_close(batch["ref_chosen_logps"], want_chosen, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(batch["ref_rejected_logps"], want_rejected, rtol=1e-4, atol=1e-4)
    trainer.train()

    sft = SFTTrainer(model=tiny_llama(), args=sft_config(tmp_path / "sft", max_steps=1, save_strategy="no"),
                     train_dataset=sft_data(4), processing_class=tokenizer(),
                     peft_config=LoraConfig(task_type="CAUSAL_LM", r=2))
    assert isinstance(sft.model, AdaptedModel)
    sft.train()


def test_dpo_resumes_from_an_adapter_checkpoint(tmp_path):
    from peft_core.integrations.trl import DPOTrainer

    def run(resume=None):
        model = lora_model()
        trainer = DPOTrainer(model=model, args=dpo_config(tmp_path / "run", max_steps=4, save_steps=2),
                             train_dataset=dpo_data(), processing_class=tokenizer())
        trainer.train(resume_from_checkpoint=resume)
        return adapter(model)

    whole = run()
    files = set(os.listdir(tmp_path / "run" / "checkpoint-2"))
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    again = run(str(tmp_path / "run" / "checkpoint-2"))
    for k in whole:
        torch.testing.assert_close(again[k], whole[k], rtol=0, atol=1e-5)


def test_trl_stays_optional():
    """Only peft_core.integrations.trl imports trl; without trl it says which extra to install."""
    import subprocess
    import sys

    code = ("import sys\n"
            "import peft_core, peft_core.integrations.transformers\n"
            "assert 'trl' not in sys.modules, 'trl imported by the core'\n"
            "sys.modules['trl'] = None\n"
            "try:\n"
            "    import peft_core.integrations.trl\n"
            "except ImportError as e:\n"
            "    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pip install peft-core[trl]" in done.stdout
