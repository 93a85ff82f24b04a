"""chatlora: LoRA fine-tuning of chat LLMs, fast and correct, from data check to served model."""

__version__ = "0.1.0"
