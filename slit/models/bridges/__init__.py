"""Bridges from the frozen audio encoder to the frozen LLM, chosen by name (`bridge.kind`).

Every bridge is an NNX module with the same call:

    bridge(frames_bfd, frame_mask_bf, instruction_ids_bl | None, rngs) -> soft prompt (B, P, D_llm)

frames (B, F, D_enc) and their bool mask (B, F) come from the audio encoder; instruction_ids (B, L) are
the instruction in the bridge's own tokens (padded with its pad id), for bridges that read it (None
otherwise). The output sits in front of the LLM's prompt. Each bridge ends in a Dense named
`projection` into the LLM width and can rescale it (`match_output_scale`) so that its outputs start at
the scale of the LLM's token embeddings.

Adding a bridge is one new file here (a frozen config dataclass with a `kind` field and an
`instruction_to_llm` field (whether the LLM also reads the instruction's tokens), and the module built as
`Module(config, llm_width, rngs=...)`) plus its entry in `BRIDGES`.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
from flax import nnx

from slit.models.bridges.linear import LinearBridge, LinearBridgeConfig
from slit.models.bridges.pengi import PengiBridge, PengiBridgeConfig
from slit.models.bridges.qformer import QFormerBridge, QFormerBridgeConfig
from slit.models.bridges.window_qformer import WindowQFormerBridge, WindowQFormerBridgeConfig


class Bridge(Protocol):
    """What stage two asks of a bridge."""

    def __call__(
        self,
        frames_bfd: jax.Array,
        frame_mask_bf: jax.Array,
        instruction_ids_bl: jax.Array | None,
        rngs: nnx.Rngs | None,
    ) -> jax.Array: ...

    def match_output_scale(self, target_rms: jax.Array) -> None: ...


BRIDGES: dict[str, tuple[type, type]] = {
    "qformer": (QFormerBridgeConfig, QFormerBridge),
    "linear": (LinearBridgeConfig, LinearBridge),
    "window_qformer": (WindowQFormerBridgeConfig, WindowQFormerBridge),
    "pengi": (PengiBridgeConfig, PengiBridge),
}
"""kind -> (config dataclass, module)."""

QFORMER_BRIDGES = ("qformer", "window_qformer")
"""The bridges built around a Q-Former (its weights under `qformer/`): stage one applies to them, and
`init_from` and `qformer.init` fill their Q-Former."""


def make_bridge(config: Any, llm_width: int, rngs: nnx.Rngs) -> Bridge:  # noqa: ANN401 (a bridge config)
    """The bridge module `config` describes (its type must be the registered one for `config.kind`)."""
    if config.kind not in BRIDGES:
        raise ValueError(f"bridge kind {config.kind!r}: choose one of {', '.join(BRIDGES)}")
    config_type, module = BRIDGES[config.kind]
    if not isinstance(config, config_type):
        raise TypeError(
            f"bridge kind {config.kind!r} takes a {config_type.__name__}, not {type(config).__name__}"
        )
    return module(config, llm_width, rngs=rngs)
