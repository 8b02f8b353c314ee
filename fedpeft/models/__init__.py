"""Base models and adapters: where a model's files are, loading, peft configs, the per-process model cache, LLM options."""
