"""Data-free synthesis (LLM-QAT): sampling, batched decode, shard store, merge."""
