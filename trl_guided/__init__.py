"""trl-guided: Guided GRPO for Hugging Face TRL."""

__version__ = "0.1.0"
