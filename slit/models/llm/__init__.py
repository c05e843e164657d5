"""Frozen language models (Llama family, GPT-2, T5) as NNX modules; see base.py for the interface."""
