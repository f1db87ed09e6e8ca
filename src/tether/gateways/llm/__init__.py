"""The LLM gateway."""
