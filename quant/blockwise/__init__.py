"""Block-wise reconstruction: the engine (capture, caches, prefetch, resume) and its algorithms."""
