"""Task types, with Hugging Face PEFT's names and values."""

from __future__ import annotations

import enum

__all__ = ["TaskType"]


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
