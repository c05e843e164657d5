"""slit: audio-language models from a frozen audio encoder, a learnable Q-Former and a frozen LLM."""

from flax import nnx

__version__ = "0.1.0"

# slit places every variable itself, from logical axis names through one rules table
# (slit/train/sharding.py). Variables are therefore created unsharded and laid out by `jax.jit`
# out_shardings, never eagerly at construction.
nnx.use_eager_sharding(False)
