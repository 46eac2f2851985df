"""Model definitions: decoder LLM, item encoders, adaptors."""
