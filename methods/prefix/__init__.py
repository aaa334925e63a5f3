"""peft_prefix: prefix tuning for peft-core (work in progress)."""
