"""Weight-only int8 storage of a frozen LLM's transformer layers (`llm.quantization=int8`).

Each linear kernel W (in, out) of the decoder's layers is stored as int8 values Q and one float32 scale
per output channel, s = max_i |W[i, o]| / 127, Q = round(W / s) (a channel of zeros gets s = 1). A layer
computes `(x @ Q) * s`: the scale leaves the contraction, so the matmul reads int8 weights converted to
the compute dtype inside it (on GPU and TPU XLA can fuse the conversion into the matrix product: not
measured here; XLA:CPU converts the weights first, README "Benchmarks"), and the result equals
`x @ (Q * s)`, the dequantised weights, up to float32 summation order. Weights take a
quarter of their float32 bytes (half of bfloat16's); the embedding table and the output layer stay in
`llm.param_dtype` (their rows are read or produce the logits directly).

Stacked (scanned) layers quantise per layer and output channel: kernels [L, in, out], scales [L, out].
What is stored so: every projection of a Llama-family layer (q, k, v, o, gate, up, down); of a GPT-2 layer,
the attention's output projection and the MLP (its fused q/k/v kernel, a quarter of the layer's weights,
stays in `llm.param_dtype`). T5's layers are not (refused).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from slit.errors import UserError
from slit.models.layers import Frozen

QUANTIZATIONS = ("none", "int8")
INT8_MAX = 127


def unknown_quantization(value: str) -> str | None:
    """What is wrong with `llm.quantization=value` in words; None for a known one."""
    if value in QUANTIZATIONS:
        return None
    return f"llm.quantization={value!r}: use one of {', '.join(map(repr, QUANTIZATIONS))}"


def int8_per_output_channel(kernel: np.ndarray | jax.Array) -> tuple[np.ndarray | jax.Array, ...]:
    """kernel [..., in, out] -> (int8 [..., in, out], float32 scale [..., out]): symmetric absmax per
    output channel, `kernel ~= q * scale[..., None, :]` within scale / 2 per element.

    A concrete kernel is quantised on the host in NumPy (no float32 copy of it on the device, and the
    same bits whatever the device); a traced one with jnp, so that `slit plan` sizes an int8 LLM under
    `eval_shape`."""
    xp = jnp if isinstance(kernel, jax.core.Tracer) else np
    w = (kernel if xp is jnp else np.asarray(jax.device_get(kernel))).astype(xp.float32)
    scale = xp.max(xp.abs(w), axis=-2) / INT8_MAX
    scale = xp.where(scale > 0, scale, 1.0).astype(xp.float32)
    q = xp.clip(xp.rint(w / scale[..., None, :]), -INT8_MAX, INT8_MAX).astype(xp.int8)
    return q, scale


def quantize_layers(module: nnx.Module, quantization: str, what: str = "the LLM") -> int:
    """Stores the linear kernels under `module.layers` as `quantization` ("none": unchanged; "int8":
    `int8_per_output_channel`), in place, keeping each kernel's logical axes (the scale takes the
    kernel's axes without its input axis). Returns the number of kernels changed; a UserError when
    "int8" finds none (an LLM whose layers slit cannot store in int8)."""
    from slit.models.llm.llama import FrozenLinear

    if problem := unknown_quantization(quantization):
        raise UserError(problem)
    if quantization == "none":
        return 0
    layers = getattr(module, "layers", None)
    linears = [] if layers is None else [n for _, n in nnx.iter_graph(layers) if isinstance(n, FrozenLinear)]
    if not linears:
        raise UserError(
            f"llm.quantization=int8: {what} ({type(module).__name__}) has no linear layers slit can store "
            "in int8 (Llama-family and GPT-2 LLMs can); use --config.llm.quantization=none"
        )
    if any(linear.kernel_scale is not None for linear in linears):  # its scales would become 1
        raise ValueError(f"{what}: its layers are stored in int8 already; quantise a module once")
    for linear in linears:
        metadata = linear.kernel.get_metadata()
        axes = metadata.get("out_sharding")
        q, scale = int8_per_output_channel(linear.kernel.get_value())
        linear.kernel = Frozen(jnp.asarray(q), **metadata)
        scale_metadata = dict(metadata)
        if axes is not None:
            scale_metadata["out_sharding"] = (*tuple(axes)[:-2], tuple(axes)[-1])
        linear.kernel_scale = Frozen(jnp.asarray(scale), **scale_metadata)
    return len(linears)
