"""torch.compile over LoRA models: the adapter path traces without graph breaks (counted by Dynamo, not timed)."""

from __future__ import annotations

import threading

import peft_core
import pytest
import torch
import torch._dynamo as dynamo
from conftest import tiny_llama


def _lora_llama():
    return peft_core.get_peft_model(tiny_llama(), peft_core.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))


def test_lora_forward_has_no_graph_break_and_compiled_equals_eager() -> None:
    model = _lora_llama()
    x = torch.randint(0, 128, (2, 8))
    explained = dynamo.explain(model)(input_ids=x)
    # The layers used to read the routing ContextVar on every call, which Dynamo cannot trace.
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
    with torch.no_grad():
        eager = model(input_ids=x).logits
        compiled = torch.compile(model, backend="eager", fullgraph=True)(input_ids=x).logits
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-6)


def test_routing_is_seen_in_the_routed_thread_only() -> None:
    """The no-ContextVar fast path must not hide a routing in flight, nor leak it into another thread."""
    model = _lora_llama()
    runtime = model._runtime
    seen: dict[str, object] = {}
    inside, release = threading.Event(), threading.Event()

    def routed() -> None:
        with runtime.route(["default", peft_core.BASE_ROW]) as routing:
            seen["routed"] = runtime.routing() is routing
            inside.set()
            release.wait(10)

    worker = threading.Thread(target=routed)
    worker.start()
    assert inside.wait(10)
    seen["other"] = runtime.routing()
    release.set()
    worker.join()
    assert seen == {"routed": True, "other": None}
    assert runtime.routing() is None and runtime._routed_calls == 0


@pytest.mark.parametrize("adapter_names", [["default", peft_core.BASE_ROW]])
def test_mixed_batch_still_routes_after_compiling_the_plain_path(adapter_names) -> None:
    model = _lora_llama()
    torch.nn.init.normal_(model.base_model.model.layers[0].self_attn.q_proj.lora_B["default"].weight)
    x = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        torch.compile(model, backend="eager")(input_ids=x)
        mixed = model(input_ids=x, adapter_names=adapter_names).logits
        with model.disable_adapter():
            base = model(input_ids=x[1:]).logits
        adapted = model(input_ids=x[:1]).logits
    torch.testing.assert_close(mixed[1:], base)
    torch.testing.assert_close(mixed[:1], adapted)
    assert not torch.allclose(adapted, base)
