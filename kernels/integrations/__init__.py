"""Adapters that put the fused kernels inside other trainers: TRL (`kernels.integrations.trl`) and verl
(`kernels.integrations.verl`).

Importing this package imports neither TRL nor verl; each adapter module imports its trainer library when it is
itself imported. `kernels.integrations.head` is the shared, library-free part: a per-instance wrap of a Hugging
Face causal LM's forward that returns hidden states or fused per-token log-probs instead of logits.
"""
