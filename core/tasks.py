"""Task types, with Hugging Face PEFT's names and values."""

from __future__ import annotations

import enum

__all__ = ["PeftType", "TaskType"]


class TaskType(str, enum.Enum):
    """What the wrapped model is for; decides the task model class and its trainable head."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"

    def __str__(self) -> str:  # json and f-strings show the bare value, as PEFT writes it
        return self.value


class PeftType(str, enum.Enum):
    """Hugging Face PEFT's method names, as ``adapter_config.json`` writes them in ``peft_type``. A str enum:
    ``config.peft_type == PeftType.LORA``. Which of them are installed: ``peft-core list-methods``."""

    PROMPT_TUNING = "PROMPT_TUNING"
    MULTITASK_PROMPT_TUNING = "MULTITASK_PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    LORA = "LORA"
    ADALORA = "ADALORA"
    BOFT = "BOFT"
    ADAPTION_PROMPT = "ADAPTION_PROMPT"
    IA3 = "IA3"
    LOHA = "LOHA"
    LOKR = "LOKR"
    OFT = "OFT"
    POLY = "POLY"
    LN_TUNING = "LN_TUNING"
    VERA = "VERA"
    FOURIERFT = "FOURIERFT"
    XLORA = "XLORA"
    HRA = "HRA"
    VBLORA = "VBLORA"
    CPT = "CPT"
    MISS = "MISS"
    RANDLORA = "RANDLORA"
    ROAD = "ROAD"
    TRAINABLE_TOKENS = "TRAINABLE_TOKENS"
    SHIRA = "SHIRA"
    C3A = "C3A"
    WAVEFT = "WAVEFT"
    OSF = "OSF"
    DELORA = "DELORA"
    GRALORA = "GRALORA"

    def __str__(self) -> str:
        return self.value
