"""Text generation with a KV cache, in one jitted `jax.lax.while_loop`.

`generate` decodes from a decoder-only LM (slit.models.llm.base.DecoderOnlyLM) given prompt
*embeddings*, so that a soft prompt (projected Q-Former outputs) can sit in front of embedded text;
`generate_seq2seq` decodes from an encoder-decoder LM (EncoderDecoderLM) given the encoder's input
embeddings, starting from the model's decoder-start token.

The prompt is run once (prefill) into a cache of P + N - 1 slots (N = max_new_tokens); then each
step feeds one slot per row. Shapes are static, so one compilation serves every call with the same
shapes and config; the loop stops as soon as every row has finished.

Strategies follow transformers' `generate` so that tokens match it:
- greedy (argmax) and sampling (temperature, top-k, top-p), with repetition penalty; a row finishes
  at any EOS id and is padded with the pad id afterwards;
- beam search with length penalty and transformers' `early_stopping` (False: stop when no running
  beam can improve on the finished ones by the heuristic transformers uses; True: stop when
  `num_beams` hypotheses are finished; "never": the canonical bound), processors applied to
  log-probabilities, 2 * num_beams candidates per step (more with several EOS ids); with
  `do_sample` the candidates are drawn without replacement (Gumbel top-k) instead.

Shapes: B batch, P prompt length, D model width, V vocabulary, N max_new_tokens, K num_beams.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from slit.errors import UserError
from slit.generate import processors
from slit.models.llm.base import DecoderOnlyLM, EncoderDecoderLM, KVCache

__all__ = ["GenerationConfig", "Generated", "generate", "generate_seq2seq", "positions_from_mask"]

_NEG = -1.0e9  # transformers' "impossible" beam score


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """How to decode. Defaults are transformers' `GenerationConfig` defaults (top_k=50 included,
    which only matters with `do_sample`).

    eos_token_ids: None takes the model's (`model.token_ids.eos`); () never stops early.
    pad_token_id: what follows EOS; None takes the model's pad id, else its first EOS id, else 0.
    early_stopping: True, False or "never", as transformers defines it (beam search only).
    seed: used when `generate` gets no rng.
    """

    max_new_tokens: int = 20
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_ids: tuple[int, ...] | None = None
    pad_token_id: int | None = None
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.early_stopping, (bool, int)) and not isinstance(self.early_stopping, str):
            object.__setattr__(self, "early_stopping", bool(self.early_stopping))
        if self.eos_token_ids is not None:
            object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))

    def validate(self) -> None:
        """Raises UserError naming the first value that cannot work."""
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens", "an integer >= 1"),
            (self.num_beams >= 1, "num_beams", "an integer >= 1"),
            (self.early_stopping in (True, False, "never"), "early_stopping", 'True, False or "never"'),
            (self.temperature > 0, "temperature", "> 0 (for greedy decoding set do_sample=False)"),
            (self.top_k >= 0, "top_k", "an integer >= 0 (0 turns top-k filtering off)"),
            (0.0 < self.top_p <= 1.0, "top_p", "in (0, 1] (1 turns nucleus filtering off)"),
            (self.repetition_penalty > 0, "repetition_penalty", "> 0 (1 turns it off)"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise UserError(f"generation config: {name}={getattr(self, name)!r}; expected {expected}")

    @property
    def eos(self) -> tuple[int, ...]:
        return self.eos_token_ids or ()

    @property
    def pad(self) -> int:
        return 0 if self.pad_token_id is None else self.pad_token_id


class Generated(NamedTuple):
    """tokens: int32 [B, N], the new tokens only, pad after a row's EOS (and after the last step
    when every row finished early). lengths: int32 [B], tokens per row up to and including EOS."""

    tokens: jax.Array
    lengths: jax.Array


def _seed_key_data(seed: int) -> np.ndarray:
    """uint32 key data for `seed` (what jax.random.PRNGKey(seed) holds), made without a device call."""
    return np.asarray([(seed >> 32) & 0xFFFFFFFF, seed & 0xFFFFFFFF], np.uint32)


def _rbg_key(rng: jax.Array) -> jax.Array:
    """An "rbg" key (jax's key type that draws from XLA's RngBitGenerator) made from `rng`, a typed
    key or raw uint32 key data.

    Steps fold their index into it (`jax.random.fold_in`), as with any key; the draws themselves then
    come from RngBitGenerator rather than from threefry hashing, which makes the decoding loop compile
    several times faster on CPU. The same key gives the same draws on the same backend.
    """
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    return jax.random.wrap_key_data(jnp.resize(jnp.ravel(rng).astype(jnp.uint32), (4,)), impl="rbg")


def positions_from_mask(mask_bp: jax.Array) -> jax.Array:
    """int32 [B, P]: 0, 1, 2, ... over each row's valid (True) slots, as transformers derives
    position ids from the attention mask (padded slots get 0; they are never attended to)."""
    return jnp.maximum(jnp.cumsum(mask_bp.astype(jnp.int32), axis=-1) - 1, 0)


def _resolve(config: GenerationConfig, model: Any) -> GenerationConfig:
    config.validate()
    ids = model.token_ids
    eos = config.eos_token_ids if config.eos_token_ids is not None else tuple(ids.eos)
    pad = config.pad_token_id
    if pad is None:
        pad = ids.pad if ids.pad is not None else (eos[0] if eos else 0)
    # The seed only makes the default rng (outside jit); leaving it out of the static config means
    # one compilation serves every seed.
    return dataclasses.replace(config, eos_token_ids=eos, pad_token_id=pad, seed=0)


def _check_prompt(embeds: jax.Array, mask: jax.Array, hidden_size: int, what: str) -> None:
    if embeds.ndim != 3 or embeds.shape[-1] != hidden_size:
        raise UserError(
            f"{what} embeddings have shape {tuple(embeds.shape)}; expected [batch, length, {hidden_size}] "
            "(the model's hidden size)"
        )
    if tuple(mask.shape) != tuple(embeds.shape[:2]):
        raise UserError(
            f"{what} mask has shape {tuple(mask.shape)}; expected [batch, length] = {tuple(embeds.shape[:2])}"
        )
    if isinstance(mask, jax.core.Tracer):
        return
    mask = np.asarray(mask, bool)
    empty = np.flatnonzero(~mask.any(axis=1))
    if empty.size:
        raise UserError(f"{what} rows {empty.tolist()} have no valid token; every row needs at least one")
    if what == "prompt" and not mask[:, -1].all():
        rows = np.flatnonzero(~mask[:, -1]).tolist()
        raise UserError(
            f"prompt rows {rows} end with padding; prompts must be left-padded (padding first, then the "
            "prompt), so that every row's last slot is its last prompt token"
        )


# ---------------------------------------------------------------------------------------------------------
# Public entry points.


def generate(
    model: DecoderOnlyLM,
    prompt_embeds: jax.Array,
    prompt_mask: jax.Array,
    config: GenerationConfig,
    rng: jax.Array | None = None,
    *,
    positions: jax.Array | None = None,
    prompt_token_ids: jax.Array | None = None,
) -> Generated:
    """Continues left-padded prompts with a decoder-only LM.

    prompt_embeds [B, P, D]: the prompt as the model's input embeddings (`model.embed(ids)`, with any
      soft prompt concatenated), padding first. prompt_mask bool [B, P]: False for padding.
    positions int32 [B, P]: defaults to `positions_from_mask(prompt_mask)`; new tokens continue
      from each row's last prompt position.
    prompt_token_ids int [B, P]: the prompt's token ids for the repetition penalty; entries < 0
      (soft-prompt slots) and padded slots do not count. None: only generated tokens count.
    rng: a PRNG key for sampling (default: made from `config.seed`); the draws are reproducible for
      the same key on the same backend (see `_random_stream`).
    """
    rng = _seed_key_data(config.seed) if rng is None else rng
    config = _resolve(config, model)
    _check_prompt(prompt_embeds, prompt_mask, model.hidden_size, "prompt")
    if prompt_token_ids is not None and tuple(prompt_token_ids.shape) != tuple(prompt_mask.shape):
        raise UserError(
            f"prompt_token_ids has shape {tuple(prompt_token_ids.shape)}; expected "
            f"{tuple(prompt_mask.shape)}, the prompt mask's (use -1 for soft-prompt slots)"
        )
    graphdef, state = nnx.split(model)
    tokens, lengths = _generate_decoder_only(
        graphdef,
        state,
        prompt_embeds,
        prompt_mask,
        positions,
        prompt_token_ids,
        rng,
        config=config,
    )
    return Generated(tokens, lengths)


def generate_seq2seq(
    model: EncoderDecoderLM,
    encoder_embeds: jax.Array,
    encoder_mask: jax.Array,
    config: GenerationConfig,
    rng: jax.Array | None = None,
) -> Generated:
    """Decodes from an encoder-decoder LM, starting from its decoder-start token.

    encoder_embeds [B, S_enc, D]: the encoder's input embeddings (soft prompt and embedded text);
    encoder_mask bool [B, S_enc]: False for padding (either side). The repetition penalty counts the
    decoder's tokens (the start token included, as in transformers).
    """
    rng = _seed_key_data(config.seed) if rng is None else rng
    config = _resolve(config, model)
    if model.token_ids.decoder_start is None:
        raise UserError(
            "the model declares no decoder-start token id; set decoder_start_token_id in its config.json"
        )
    _check_prompt(encoder_embeds, encoder_mask, model.hidden_size, "encoder input")
    graphdef, state = nnx.split(model)
    tokens, lengths = _generate_encoder_decoder(
        graphdef, state, encoder_embeds, encoder_mask, rng, config=config
    )
    return Generated(tokens, lengths)


# ---------------------------------------------------------------------------------------------------------
# The jitted programs: prefill, then the search loop.
#
# The loop body feeds one input per row, then chooses the next token from the resulting scores, so
# that token choice is compiled once and nothing is computed that is not used: the prefill covers
# the prompt but its last slot (whose output-layer scores XLA then never computes), and the first
# iteration feeds the last prompt slot.

# forward(inputs [B, ...], step, cache) -> (scores float32 [B, V], cache): feeds each row one slot
# (for step 0 the last prompt slot, then the token chosen at step - 1) and returns the next-token
# scores. feed(tokens int32 [B]) -> the inputs that feed those tokens.
Forward = Callable[[jax.Array, jax.Array, KVCache], tuple[jax.Array, KVCache]]
Feed = Callable[[jax.Array], jax.Array]


def _repeat_rows(tree: Any, times: int) -> Any:
    """Every array with a batch axis [B, ...] -> [B * times, ...], each row repeated in place."""
    return jax.tree.map(lambda x: jnp.repeat(x, times, axis=0) if x.ndim else x, tree)


@functools.partial(jax.jit, static_argnames=("graphdef", "config"))
def _generate_decoder_only(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    prompt_embeds: jax.Array,
    prompt_mask: jax.Array,
    positions: jax.Array | None,
    prompt_token_ids: jax.Array | None,
    rng: jax.Array,
    *,
    config: GenerationConfig,
) -> tuple[jax.Array, jax.Array]:
    model = nnx.merge(graphdef, state)
    prompt_mask = prompt_mask.astype(bool)
    positions = positions_from_mask(prompt_mask) if positions is None else positions.astype(jnp.int32)
    batch, prompt_len, _ = prompt_embeds.shape
    # Slots: the prompt, then every chosen token but the last.
    cache = model.init_cache(batch, prompt_len + config.max_new_tokens - 1, prompt_embeds.dtype)
    if prompt_len > 1:
        _, cache = model(prompt_embeds[:, :-1], positions[:, :-1], prompt_mask[:, :-1], cache)
    seen = None
    if config.repetition_penalty != 1.0:
        if prompt_token_ids is None:
            seen = jnp.zeros((batch, model.vocab_size), bool)
        else:
            seen = processors.seen_tokens(prompt_token_ids, model.vocab_size, prompt_mask)
    first_inputs, last_position = prompt_embeds[:, -1], positions[:, -1]  # left-padded: real slots
    if config.num_beams > 1:
        first_inputs, cache, seen, last_position = _repeat_rows(
            (first_inputs, cache, seen, last_position), config.num_beams
        )

    def forward(inputs_bd: jax.Array, step: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        rows = inputs_bd.shape[0]
        step_positions = (last_position + step)[:, None]
        logits, cache = model(inputs_bd[:, None], step_positions, jnp.ones((rows, 1), bool), cache)
        return logits[:, -1], cache

    def feed(tokens_b: jax.Array) -> jax.Array:
        return model.embed(tokens_b[:, None])[:, 0].astype(prompt_embeds.dtype)

    search = _sample_search if config.num_beams == 1 else _beam_search
    return search(forward, feed, first_inputs, cache, seen, config, rng)


@functools.partial(jax.jit, static_argnames=("graphdef", "config"))
def _generate_encoder_decoder(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    encoder_embeds: jax.Array,
    encoder_mask: jax.Array,
    rng: jax.Array,
    *,
    config: GenerationConfig,
) -> tuple[jax.Array, jax.Array]:
    model = nnx.merge(graphdef, state)
    encoder_mask = encoder_mask.astype(bool)
    batch = encoder_embeds.shape[0]
    encoded = model.encode(encoder_embeds, encoder_mask)
    if hasattr(model, "cross_attention_cache"):  # computed once instead of at every step
        encoded = model.cross_attention_cache(encoded)
    start = jnp.full((batch,), model.token_ids.decoder_start, jnp.int32)
    cache = model.init_cache(batch, config.max_new_tokens, encoder_embeds.dtype)
    seen = None
    if config.repetition_penalty != 1.0:
        seen = processors.seen_tokens(start[:, None], model.vocab_size)
    if config.num_beams > 1:
        start, cache, seen, encoded, encoder_mask = _repeat_rows(
            (start, cache, seen, encoded, encoder_mask), config.num_beams
        )

    def forward(tokens_b: jax.Array, step: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        step_positions = jnp.full((tokens_b.shape[0], 1), step, jnp.int32)  # the start token: 0
        logits, cache = model.decode(tokens_b[:, None], step_positions, encoded, encoder_mask, cache)
        return logits[:, -1], cache

    search = _sample_search if config.num_beams == 1 else _beam_search
    return search(forward, lambda tokens_b: tokens_b, start, cache, seen, config, rng)


def _process(
    scores_bv: jax.Array, seen_bv: jax.Array | None, config: GenerationConfig, min_tokens_to_keep: int
) -> jax.Array:
    """transformers' processor order: repetition penalty; then, when sampling, temperature, top-k, top-p."""
    if seen_bv is not None:
        scores_bv = processors.apply_repetition_penalty(scores_bv, seen_bv, config.repetition_penalty)
    if config.do_sample:
        if config.temperature != 1.0:
            scores_bv = processors.apply_temperature(scores_bv, config.temperature)
        if config.top_k != 0:
            scores_bv = processors.top_k_filter(scores_bv, config.top_k, min_tokens_to_keep)
        if config.top_p < 1.0:
            scores_bv = processors.top_p_filter(scores_bv, config.top_p, min_tokens_to_keep)
    return scores_bv


def _is_eos(tokens: jax.Array, eos: tuple[int, ...]) -> jax.Array:
    if not eos:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(eos, tokens.dtype))


# ---------------------------------------------------------------------------------------------------------
# Greedy and sampling.


def _sample_search(
    forward: Forward,
    feed: Feed,
    first_inputs: jax.Array,
    cache: KVCache,
    seen_bv: jax.Array | None,
    config: GenerationConfig,
    rng: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    batch = first_inputs.shape[0]
    n = config.max_new_tokens
    key = _rbg_key(rng)

    def keep_going(carry: dict) -> jax.Array:
        return (carry["step"] < n) & ~jnp.all(carry["finished"])

    def body(carry: dict) -> dict:
        step, finished = carry["step"], carry["finished"]
        logits, cache = forward(carry["inputs"], step, carry["cache"])
        scores = _process(logits, carry["seen"], config, min_tokens_to_keep=1)
        if config.do_sample:
            token = jax.random.categorical(jax.random.fold_in(key, step), scores, axis=-1)
        else:
            token = jnp.argmax(scores, axis=-1)
        token = jnp.where(finished, config.pad, token).astype(jnp.int32)
        return dict(
            step=step + 1,
            inputs=feed(token),
            tokens=carry["tokens"].at[:, step].set(token),
            lengths=carry["lengths"] + (~finished).astype(jnp.int32),
            finished=finished | _is_eos(token, config.eos),
            seen=None if carry["seen"] is None else processors.mark_seen(carry["seen"], token),
            cache=cache,
        )

    carry = dict(
        step=jnp.zeros((), jnp.int32),
        inputs=first_inputs,
        tokens=jnp.full((batch, n), config.pad, jnp.int32),
        lengths=jnp.zeros((batch,), jnp.int32),
        finished=jnp.zeros((batch,), bool),
        seen=seen_bv,
        cache=cache,
    )
    carry = jax.lax.while_loop(keep_going, body, carry)
    return carry["tokens"], carry["lengths"]


# ---------------------------------------------------------------------------------------------------------
# Beam search (transformers' vectorised beam search, step for step).


def _beam_search(
    forward: Forward,
    feed: Feed,
    first_inputs: jax.Array,
    cache: KVCache,
    seen: jax.Array | None,
    config: GenerationConfig,
    rng: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """first_inputs, cache and seen with B * K rows (the K rows of a batch item adjacent)."""
    k, n = config.num_beams, config.max_new_tokens
    key = _rbg_key(rng)
    batch = first_inputs.shape[0] // k
    num_candidates = max(2, 1 + len(config.eos)) * k
    min_tokens_to_keep = len(config.eos) + 1  # transformers keeps a non-EOS continuation when sampling
    lp = config.length_penalty
    # length ** length_penalty for lengths 1..N, computed in double precision as Python does.
    penalty_of_length = jnp.asarray([float(length) ** lp for length in range(n + 1)], jnp.float32)
    horizon = n if (config.early_stopping == "never" and lp > 0.0) else None
    top_k_mask = jnp.arange(num_candidates) < k

    def gather(x: jax.Array, index_bk: jax.Array) -> jax.Array:
        """x [B, C, ...] -> [B, K', ...] along axis 1."""
        index = index_bk.reshape(index_bk.shape + (1,) * (x.ndim - 2))
        return jnp.take_along_axis(x, index, axis=1)

    def select(carry: dict, logits: jax.Array, step: jax.Array) -> dict:
        vocab = logits.shape[-1]
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        log_probs = _process(log_probs, carry["seen"], config, min_tokens_to_keep)
        totals = (log_probs.reshape(batch, k, vocab) + carry["running_scores"][:, :, None]).reshape(batch, -1)
        if config.do_sample:
            gumbel = jax.random.gumbel(jax.random.fold_in(key, step), totals.shape)
            index = jax.lax.top_k(totals + gumbel, num_candidates)[1]
            cand_scores = jnp.take_along_axis(totals, index, axis=1)
        else:
            cand_scores, index = jax.lax.top_k(totals, num_candidates)
        cand_origin, cand_token = index // vocab, (index % vocab).astype(jnp.int32)
        cand_tokens = gather(carry["running_tokens"], cand_origin)
        cand_tokens = jax.lax.dynamic_update_slice_in_dim(cand_tokens, cand_token[:, :, None], step, axis=2)
        hits = _is_eos(cand_token, config.eos) | (step + 1 >= n)

        # Running beams: the best K candidates that did not finish.
        running_candidates = cand_scores + hits.astype(jnp.float32) * _NEG
        keep = jax.lax.top_k(running_candidates, k)[1]
        running_tokens = gather(cand_tokens, keep)
        running_scores = gather(running_candidates, keep)
        origin_rows = (jnp.arange(batch)[:, None] * k + gather(cand_origin, keep)).reshape(-1)

        # Finished hypotheses: the best K so far, length-penalised.
        finished = carry["finished"]
        just_finished = hits & top_k_mask[None, :]
        final_scores = cand_scores / penalty_of_length[step + 1]
        if config.early_stopping is True:
            final_scores += jnp.all(finished, axis=-1, keepdims=True).astype(jnp.float32) * _NEG
        final_scores += (~carry["can_improve"]).astype(jnp.float32) * _NEG
        final_scores += (~just_finished).astype(jnp.float32) * _NEG
        merged_scores = jnp.concatenate([carry["scores"], final_scores], axis=1)
        best = jax.lax.top_k(merged_scores, k)[1]
        scores = gather(merged_scores, best)
        sequences = gather(jnp.concatenate([carry["sequences"], cand_tokens], axis=1), best)
        cand_lengths = jnp.full((batch, num_candidates), step + 1, jnp.int32)
        lengths = gather(jnp.concatenate([carry["lengths"], cand_lengths], axis=1), best)
        finished = gather(jnp.concatenate([finished, just_finished], axis=1), best)

        # Can a running beam still beat the worst finished one? (transformers' heuristic)
        best_length = step + 1 if horizon is None else horizon
        best_running = running_scores[:, :1] / penalty_of_length[best_length]
        worst_finished = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), _NEG)
        can_improve = carry["can_improve"] & jnp.any(best_running > worst_finished, axis=-1, keepdims=True)
        go_on = jnp.any(can_improve) & ~jnp.all(hits)
        if config.early_stopping is True:
            go_on = go_on & ~jnp.all(finished)

        seen = carry["seen"]
        if seen is not None:
            seen = processors.mark_seen(seen[origin_rows], running_tokens[:, :, step].reshape(-1))
        return dict(
            carry,
            running_tokens=running_tokens,
            running_scores=running_scores,
            origin_rows=origin_rows,
            sequences=sequences,
            scores=scores,
            lengths=lengths,
            finished=finished,
            can_improve=can_improve,
            go_on=go_on,
            seen=seen,
        )

    def keep_going(carry: dict) -> jax.Array:
        return carry["go_on"] & (carry["step"] < n)

    def body(carry: dict) -> dict:
        step = carry["step"]
        logits, cache = forward(carry["inputs"], step, carry["cache"])
        carry = select(carry, logits, step)
        rows = carry["origin_rows"]  # each running beam continues the cache row it came from
        return dict(
            carry,
            step=step + 1,
            inputs=feed(carry["running_tokens"][:, :, step].reshape(-1)),
            cache=jax.tree.map(lambda x: x[rows] if x.ndim else x, cache),
        )

    carry = dict(
        step=jnp.zeros((), jnp.int32),
        inputs=first_inputs,
        running_tokens=jnp.full((batch, k, n), config.pad, jnp.int32),
        running_scores=jnp.zeros((batch, k)).at[:, 1:].set(_NEG),
        origin_rows=jnp.arange(batch * k),
        sequences=jnp.full((batch, k, n), config.pad, jnp.int32),
        scores=jnp.full((batch, k), _NEG),
        lengths=jnp.zeros((batch, k), jnp.int32),
        finished=jnp.zeros((batch, k), bool),
        can_improve=jnp.ones((batch, 1), bool),
        go_on=jnp.ones((), bool),
        seen=seen,
        cache=cache,
    )
    carry = jax.lax.while_loop(keep_going, body, carry)
    return carry["sequences"][:, 0], carry["lengths"][:, 0]
