"""Reliability under bad input, part 1: malformed and adversarial ``adapter_config.json`` files.

Every generated file goes through the full path, ``PeftModel.from_pretrained(model, folder)``, onto one base
model that is reused across all examples. Each load must either raise a typed peft-core error (also a
builtin, naming the field) with the base model exactly as it was, or succeed with a working adapter (some
mutations are valid configs) that ``unload()`` removes again. See docs/reliability.md.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import peft_core
import pytest
import torch
from conftest import model_inputs, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st
from peft_core import ConfigError, LoraConfig, MethodNotInstalledError, PeftModel, get_peft_model
from peft_core.patterns import MAX_PATTERN_LENGTH, compile_module_pattern
from reliability_support import FUZZ, STATS, check_error, fingerprint, unchanged, watchdog, write_summary
from torch import nn


@pytest.fixture(scope="module", autouse=True)
def _report(tmp_path_factory):
    yield
    write_summary(tmp_path_factory.getbasetemp())


def _method_config(name: str) -> Any:
    """The config class of a method, or None when its plugin is not installed (prompt/prefix tuning may not be)."""
    try:
        return getattr(peft_core, name)
    except (AttributeError, MethodNotInstalledError):
        return None


GOOD = {
    "LORA": lambda: LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8,
                               init_lora_weights=False),
    "PROMPT_TUNING": lambda: _method_config("PromptTuningConfig")(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "PREFIX_TUNING": lambda: _method_config("PrefixTuningConfig")(task_type="CAUSAL_LM", num_virtual_tokens=4),
}
CLASS_NAMES = {"LORA": "LoraConfig", "PROMPT_TUNING": "PromptTuningConfig", "PREFIX_TUNING": "PrefixTuningConfig"}


#: Messages about the file as a whole (it is not JSON), which cannot name a field.
DOCUMENT_ERRORS = ("invalid JSON", "a value cannot be read", "nested too deeply to read", "not UTF-8")


class Target:
    """One method's good adapter folder and the base model every generated config is loaded onto."""

    def __init__(self, method: str, folder: Path) -> None:
        self.method = method
        self.folder = folder
        self.base = tiny_llama()
        adapted = get_peft_model(tiny_llama(), GOOD[method]())
        adapted.save_pretrained(folder)
        self.good: dict[str, Any] = json.loads((folder / "adapter_config.json").read_text())
        cls = type(adapted.peft_config["default"])
        self.fields = sorted(set(self.good) | set(cls.peft_inert_fields) | {"unknown_field", "ünïcode_field"})
        self.before = fingerprint(self.base)
        self.x = model_inputs("llama")

    def load(self, what: str, content: str | bytes, field: str | None = None) -> None:
        """Write ``content`` as adapter_config.json, load it, and check the outcome."""
        path = self.folder / "adapter_config.json"
        path.write_bytes(content.encode("utf-8", "surrogatepass") if isinstance(content, str) else content)
        STATS["configs_tried"] += 1
        try:
            with warnings.catch_warnings(), watchdog(20, f"loading a config ({what})"):
                warnings.simplefilter("ignore")
                model = PeftModel.from_pretrained(self.base, self.folder)
        except Exception as exc:
            check_error(exc, what)
            whole_file = any(m in str(exc) for m in DOCUMENT_ERRORS)  # the file could not be read as JSON at all
            if field is not None and isinstance(exc, ConfigError) and not whole_file and field != "peft_type":
                assert re.search(rf"\b{re.escape(field)}\b", str(exc)), \
                    f"{what}: the message does not name the field {field!r}: {exc}"
            assert unchanged(self.base, self.before), f"{what}: the base model changed after a refused load"
            return
        # a valid config after all: the adapter must work, and unload must give the base model back
        STATS["loads_accepted"] += 1
        with torch.no_grad():
            logits = model(**self.x).logits
        assert torch.isfinite(logits).all(), f"{what}: accepted, but the adapted model outputs NaN/Inf"
        assert model.unload() is self.base
        for p in self.base.parameters():  # wrapping froze the base model (documented); undo for the next example
            p.requires_grad_(True)
        assert unchanged(self.base, self.before), f"{what}: unload() did not give the base model back"


@pytest.fixture(scope="module", params=list(GOOD))
def target(request, tmp_path_factory):
    if request.param != "LORA" and _method_config(CLASS_NAMES[request.param]) is None:
        pytest.skip(f"the {request.param} plugin is not installed")
    return Target(request.param, tmp_path_factory.mktemp(request.param.lower()))


# ---------------------------------------------------------------- strategies
SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2, 4, 16, 10**6, 10**6 + 1, 2**31, 2**63, 10**30, 10**308, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 0.5, 1.0, 1e-300, 1e308, float("nan"), float("inf"), float("-inf")]),
    st.text(max_size=12),
    st.sampled_from(["", "LORA", "none", "all", "lora_only", "q_proj", "all-linear", "CAUSAL_LM", "SEQ_CLS",
                     "gaussian", "TEXT", "RANDOM", "zero", "ünïcödé", "\x00", "\ud800", "😀😀", "a" * 300]),
)
JUNK = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=10)

#: Patterns that take exponential or high-polynomial time in a backtracking engine.
CATASTROPHIC = ["(a+)+$", "(.*){1,32}z", "(.*a){20}", "(a|a)*$", "(a|aa)+$", "(.*)*$", ".*.*.*.*.*z",
                "(.?){30}z", ".?" * 30 + "z", r"(\w+\.)*z", "((a*)*)*b", "(x+x+)+y", "(?:.*?,){30}z",
                r"^(([a-z])+.)+[A-Z]([a-z])+$", r"(\d+)*\.", "(.*){2}(.*){2}(.*){2}z", r"(.)\1*z"]
REGEX_ATOMS = [".", ".*", ".+", "a", "a+", "q_proj", "v_proj", "layers", r"\.", r"\d+", "[a-z]", "(", ")", "|",
               "?", "*", "+", "{2,}", "{1,20}", "^", "$", "(?:", "(?!", r"\1", "[", "]", "\\", "_proj"]
REGEX = st.one_of(st.sampled_from(CATASTROPHIC), st.lists(st.sampled_from(REGEX_ATOMS), max_size=12).map("".join),
                  st.text(alphabet="().*+?|[]{}\\^$aq_0123,:!", max_size=16))
NAMES = st.lists(st.one_of(st.text(max_size=12), st.sampled_from(["q_proj", "v_proj", "nothing", "Q_PROJ", "q_proj ",
                                                                   "\uff51_proj", "q_proj\x00", "layers.0.self_attn"])),
                 max_size=4)


def _mutations(t: Target) -> st.SearchStrategy[tuple[str, str | bytes, str | None]]:
    """(what was done, file content, the field it concerns) for one generated adapter_config.json."""
    good = t.good

    def with_field(field: str, value: Any) -> str:
        return json.dumps({**good, field: value})

    def without(field: str) -> str:
        return json.dumps({k: v for k, v in good.items() if k != field})

    def literal(field: str, text: str) -> str:  # values json.dumps cannot write: Infinity is, 1e999 is not
        body = json.dumps({k: v for k, v in good.items() if k != field})
        return body[:-1] + f', "{field}": {text}}}'

    fields = st.sampled_from(t.fields)
    options = [
        st.tuples(fields, JUNK).map(lambda fv: (f"set {fv[0]}", with_field(*fv), fv[0])),
        st.sampled_from(sorted(good)).map(lambda f: (f"drop {f}", without(f), f)),
        st.one_of(st.text(max_size=12), JUNK).map(lambda v: ("set peft_type", with_field("peft_type", v), None)),
        st.tuples(fields, st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "9" * 5000, "-0",
                                           "1.0e-400", '"\\ud800"', '"\\u0000"', "[[[[[]]]]]", "{}", "[]", "null"]))
        .map(lambda ft: (f"literal {ft[0]}", literal(*ft), ft[0])),
        st.tuples(fields, st.integers(min_value=10, max_value=5000), st.booleans())
        .map(lambda fdo: (f"nest {fdo[0]}", literal(fdo[0], ("[" * fdo[1] + "]" * fdo[1]) if fdo[2]
                                                     else ('{"a":' * fdo[1] + "1" + "}" * fdo[1])), fdo[0])),
        JUNK.filter(lambda v: not isinstance(v, dict)).map(lambda v: ("not an object", json.dumps(v), None)),
        st.integers(min_value=0, max_value=len(json.dumps(good)) - 1)
        .map(lambda i: ("truncated", json.dumps(good)[:i], None)),
        st.tuples(st.sampled_from(sorted(good)), JUNK)
        .map(lambda fv: (f"duplicate {fv[0]}", json.dumps(good)[:-1] + f", {json.dumps(fv[0])}: {json.dumps(fv[1])}}}",
                         fv[0])),
        st.one_of(st.binary(max_size=64),
                  st.sampled_from([b"\xef\xbb\xbf" + json.dumps(good).encode(), json.dumps(good).encode("utf-16"),
                                   json.dumps(good).encode()[:20] + b"\xff\xfe" + json.dumps(good).encode()[20:],
                                   b"", b"\x00" * 16]))
        .map(lambda b: ("bytes", b, None)),
    ]
    if t.method == "LORA":
        options += [
            REGEX.map(lambda r: ("target_modules regex", with_field("target_modules", r), "target_modules")),
            REGEX.map(lambda r: ("exclude_modules regex", with_field("exclude_modules", r), "exclude_modules")),
            NAMES.map(lambda n: ("target_modules names", with_field("target_modules", n), "target_modules")),
            st.tuples(st.sampled_from(["rank_pattern", "alpha_pattern"]),
                      st.dictionaries(REGEX, st.one_of(st.integers(-4, 64), SCALARS), max_size=3))
            .map(lambda fp: (f"{fp[0]} keys", with_field(*fp), fp[0])),
            st.sampled_from([("r", 4), ("r", 16), ("lora_alpha", 0), ("layers_to_transform", [1]),
                             ("layers_to_transform", [0, 1]), ("bias", "all"), ("modules_to_save", ["lm_head"]),
                             ("task_type", "SEQ_CLS"), ("use_rslora", True), ("init_lora_weights", "gaussian")])
            .map(lambda fv: (f"valid-looking {fv[0]}", with_field(*fv), fv[0])),
        ]
    return st.one_of(*options)


@settings(FUZZ)
@given(data=st.data())
def test_generated_configs_give_typed_errors_and_leave_the_model_unchanged(target, data):
    what, content, field = data.draw(_mutations(target), label="mutation")
    target.load(what, content, field)


# ---------------------------------------------------------------- named cases the generator may or may not reach
DROP = object()


@pytest.mark.parametrize(("what", "change", "field", "error"), [
    ("negative r", {"r": -3}, "r", ConfigError),
    ("huge r", {"r": 10**12}, "r", ConfigError),
    ("r as a string", {"r": "8"}, "r", ConfigError),
    ("unknown peft_type", {"peft_type": "NOT_A_METHOD"}, "NOT_A_METHOD", MethodNotInstalledError),
    ("peft_type missing", {"peft_type": DROP}, "peft_type", ConfigError),
    ("NaN alpha", {"lora_alpha": float("nan")}, "lora_alpha", ConfigError),
    ("NaN alpha_pattern", {"alpha_pattern": {"q_proj": float("nan")}}, "alpha_pattern", ConfigError),
    ("invalid rank_pattern regex", {"rank_pattern": {"((": 4}}, "rank_pattern", ConfigError),
    ("huge int dropout", {"lora_dropout": 10**400}, "lora_dropout", ConfigError),
    ("huge int alpha", {"lora_alpha": 10**400}, "lora_alpha", ConfigError),
    ("targets matching nothing", {"target_modules": ["nothing_here"]}, "target_modules", peft_core.TargetError),
    ("catastrophic regex", {"target_modules": "(.*){1,32}z"}, "target_modules", ConfigError),
    ("unsupported PEFT feature", {"use_qalora": True}, "use_qalora", ConfigError),
])
def test_named_bad_configs(tmp_path, what, change, field, error):
    t = Target("LORA", tmp_path)
    doc = {**t.good, **change}
    doc = {k: v for k, v in doc.items() if v is not DROP}
    (tmp_path / "adapter_config.json").write_text(json.dumps(doc))
    STATS["configs_tried"] += 1
    with watchdog(20, what), pytest.raises(error) as info:
        PeftModel.from_pretrained(t.base, tmp_path)
    check_error(info.value, what)
    assert field in str(info.value)
    assert unchanged(t.base, t.before)


# ---------------------------------------------------------------- the ReDoS defence
class LongNames(nn.Module):
    """Module names of 60+ characters made of one letter: the worst case for (a+)+$-style patterns."""

    def __init__(self) -> None:
        super().__init__()
        inner = nn.Module()
        inner.add_module("a" * 60, nn.Linear(4, 4))
        inner.add_module("q_proj", nn.Linear(4, 4))
        self.add_module("b" * 80, inner)

    def forward(self, x):
        return x


@pytest.mark.parametrize("pattern", CATASTROPHIC)
def test_catastrophic_regexes_are_refused_without_running(pattern):
    model = LongNames()
    with watchdog(5, f"regex {pattern!r}"), pytest.raises(ConfigError, match="target_modules") as info:
        get_peft_model(model, LoraConfig(target_modules=pattern))
    assert "regex" in str(info.value) or "regular expression" in str(info.value)
    assert not any("lora" in n for n, _ in model.named_modules())


@pytest.mark.parametrize("pattern", [r".*\.(q_proj|v_proj)$", r".*(q_proj|v_proj)", r"^(?!.*mlp).*(q|v)_proj",
                                     r"model\.layers\.\d+\.self_attn\.(q|v)_proj", r"(?:.*\.)?[qv]_proj",
                                     r".*layers\.[01]\..*\.(q_proj|v_proj)"])
def test_usual_peft_regexes_still_work(pattern):
    with watchdog(5, pattern):
        model = get_peft_model(tiny_llama(), LoraConfig(target_modules=pattern))
    adapted = sorted(n for n, m in model.base_model.named_modules() if type(m).__name__ == "LoraLinear")
    assert adapted and all(n.endswith(("q_proj", "v_proj")) for n in adapted)


def test_worst_accepted_regex_is_fast_on_long_names():
    """The bound admits three unbounded quantifiers; against 200-character names that stays milliseconds."""
    pattern = ".*.*.*z"
    compiled = compile_module_pattern(pattern, "target_modules")
    names = ["x" * 200, "layers." * 28 + "q_proj"]
    # a hang guard, not a timing assertion: a catastrophic pattern would run for minutes (the bound itself is
    # what compile_module_pattern checks, below); how fast matching is belongs in benchmarks/
    with watchdog(60, pattern):
        for name in names * 5:
            assert compiled.fullmatch(name) is None
    with pytest.raises(ConfigError, match="too many ways"):
        compile_module_pattern(".*.*.*.*z", "target_modules")
    with pytest.raises(ConfigError, match="characters long"):
        compile_module_pattern("a" * (MAX_PATTERN_LENGTH + 1), "target_modules")
    with pytest.raises(ConfigError, match="backreferences"):
        compile_module_pattern(r"(q)\1", "target_modules")
    assert compile_module_pattern(r".*\.(q_proj|v_proj)$", "x").fullmatch("model.layers.0.q_proj")


def test_rank_pattern_keys_are_checked_as_the_regex_targeting_runs():
    with pytest.raises(ConfigError, match=re.escape("rank_pattern key '(a+)+'")):
        LoraConfig(target_modules=["q_proj"], rank_pattern={"(a+)+": 4})
    config = LoraConfig(target_modules=["q_proj", "v_proj"], rank_pattern={r"layers\.0\..*q_proj": 2})
    model = get_peft_model(tiny_llama(), config)
    assert model.base_model.model.layers[0].self_attn.q_proj.r["default"] == 2
    assert model.base_model.model.layers[1].self_attn.q_proj.r["default"] == 8
