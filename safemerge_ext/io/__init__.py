"""Streaming io: Hugging Face model folders and PEFT adapters, read one tensor at a time."""
