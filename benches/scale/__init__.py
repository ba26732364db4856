"""Scale benches: whole stages and the block-wise engine at Llama-2-7B shapes."""
