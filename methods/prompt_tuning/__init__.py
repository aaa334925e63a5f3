"""peft_prompt_tuning: prompt tuning for peft-core (work in progress)."""
