"""Answers from a stage-two model: `Answerer` turns (audio, instruction) batches into decoded text with a
model's weights; `generation_config` reads a run's decoding settings. Used by stage two's evaluations,
`slit generate` and `slit.export.load_bundle`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from slit.models.stage2 import is_encoder_decoder


class Answerer:
    """Generates answers for (audio, instruction) batches with a stage-two model's weights."""

    def __init__(
        self,
        graphdef: Any,  # noqa: ANN401
        frozen: dict,
        encoders: Any,  # noqa: ANN401 (slit.train.stage2_model.Encoders)
        config: ml_collections.ConfigDict,
        llm_tokenizer: Any,  # noqa: ANN401
    ):
        self.graphdef, self.frozen, self.encoders, self.config = graphdef, frozen, encoders, config
        self.llm_tokenizer = llm_tokenizer

        def prompt(params: dict, frozen: dict, audio, num_samples, qformer_ids, instruction_ids):  # noqa: ANN001, ANN202
            model = nnx.merge(graphdef, params, frozen)
            soft = model.soft_prompt(audio, num_samples, qformer_ids, None)
            return model.prompt(soft, instruction_ids)

        self._prompt = jax.jit(prompt)

    def answer(
        self,
        params: dict,
        audio: np.ndarray,
        num_samples: np.ndarray,
        instructions: Sequence[str],
        gen: Any,  # noqa: ANN401 (slit.generate.GenerationConfig)
    ) -> list[str]:
        """audio (B, S) float32, num_samples (B,) int32, B instructions -> B decoded answers."""
        from slit.generate import generate, generate_seq2seq

        d = self.config.data
        qformer_ids = self.encoders.qformer.encode(list(instructions))
        instruction_ids = self.encoders.instruction.encode(list(instructions), d.max_instruction_length)
        embeds, mask, ids = self._prompt(
            params, self.frozen, jnp.asarray(audio), jnp.asarray(num_samples), qformer_ids, instruction_ids
        )
        llm = nnx.merge(self.graphdef, params, self.frozen).llm
        if is_encoder_decoder(llm):
            out = generate_seq2seq(llm, embeds, mask, gen)
        else:
            out = generate(llm, embeds, mask, gen, prompt_token_ids=ids)
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        return [
            self.llm_tokenizer.decode(tokens[i, : lengths[i]], skip_special_tokens=True).strip()
            for i in range(len(tokens))
        ]


def generation_config(config: ml_collections.ConfigDict, **overrides: Any) -> Any:  # noqa: ANN401
    """The run's decoding settings (config.eval), with any non-None `overrides` (GenerationConfig
    fields; temperature, top_k or top_p turn sampling on unless do_sample is given; temperature 0 is
    greedy)."""
    from slit.generate import GenerationConfig

    e = config.eval
    values = dict(
        max_new_tokens=e.max_new_tokens,
        num_beams=e.num_beams,
        length_penalty=e.length_penalty,
        repetition_penalty=e.repetition_penalty,
    )
    given = {k: v for k, v in overrides.items() if v is not None}
    if given.get("temperature") == 0:  # temperature 0 means greedy, as in most tools
        del given["temperature"]
        given.setdefault("do_sample", False)
    if "do_sample" not in given and any(k in given for k in ("temperature", "top_k", "top_p")):
        given["do_sample"] = True
    values.update(given)
    gen = GenerationConfig(**values)
    gen.validate()
    return gen
