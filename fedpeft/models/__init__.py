"""Base models and adapters: loading, peft configs, the per-process model cache, LLM options."""
