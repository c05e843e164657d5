"""Stage two of SLIT/BLIP-2: a bridge's output as a soft prompt for a frozen LLM.

frozen audio encoder (slit.models.audio.encoder) -> bridge (slit.models.bridges, chosen by name; the
Q-Former bridge: queries, optionally with the instruction as InstructBLIP, then one linear projection to
the LLM width) -> soft prompt in front of the frozen LLM (BLIP-2 stage two):
- decoder-only LLMs see [soft prompt; instruction; answer] and the loss is on the answer tokens only
  (soft prompt, instruction and padding are masked);
- encoder-decoder LLMs (T5) are a prefix LM: the encoder reads [soft prompt; instruction] and the
  decoder predicts the answer.
The model may also be handed the frozen encoder's features instead of audio (a feature cache).

Token-id conventions of a `Stage2Batch`: Q-Former instruction ids are padded with the Q-Former's pad id
(left-truncated by the data side); LLM instruction ids are *left*-padded and answer ids *right*-padded
with -1, so that padding never depends on the LLM's own pad/EOS ids (often the same id).

Gradients reach the bridge through the frozen LLM's activations; the LLM's and the audio tower's
weights are `Frozen`, so they get neither gradients nor optimizer state. The LLM layers can be
rematerialised in the loss (`remat_policy`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from slit.models.audio.encoder import AudioEncoderConfig, encode_audio, make_audio_tower
from slit.models.bridges import make_bridge
from slit.models.layers import COMPUTE_DTYPES, compute_dtype_scope, unfreeze
from slit.models.layers import REMAT_POLICIES as REMAT_POLICIES
from slit.train.sharding import constrain

LOSS_AVERAGES = ("tokens", "examples")
"""How the answer-token losses of a batch are averaged (Stage2Config.loss_average)."""


@dataclasses.dataclass(frozen=True)
class Stage2Config:
    """Everything that shapes a stage-two model besides the LLM itself.

    audio: the audio encoder (frozen unless `audio.trainable`); bridge: a registered bridge's config
    (slit.models.bridges);
    qformer_init: where a Q-Former bridge's pretrained text weights come from (`qformer.init`; "":
    random), read by slit.train.stage2_model.create_model.
    """

    audio: AudioEncoderConfig
    bridge: Any  # a config dataclass of slit.models.bridges.BRIDGES
    remat_policy: str = "none"
    # "tokens": the mean over every answer token of the batch (LAVIS), so a caption weighs ~10x a
    # one-word answer; "examples": each example's answer tokens averaged first, then the mean over
    # examples, so the task mixture's weights are the tasks' shares of the loss.
    loss_average: str = "tokens"
    qformer_init: str = ""
    llm_trainable: bool = False  # the LLM's weights are `nnx.Param`s and train (`llm.trainable`)
    # The top-level `compute_dtype`: "bfloat16" runs the loss's matmuls (bridge, and the LLM's, set by
    # slit.train.stage2_model.create_model; the towers read their own configs) on bf16 inputs with f32
    # accumulation; master weights, optimizer state, norms, softmax and the loss stay float32.
    compute_dtype: str = "float32"

    def __post_init__(self):
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r}; choose one of {REMAT_POLICIES}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype={self.compute_dtype!r}; choose one of {COMPUTE_DTYPES}")
        if self.loss_average not in LOSS_AVERAGES:
            raise ValueError(f"loss_average={self.loss_average!r}; choose one of {LOSS_AVERAGES}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Stage2Batch:
    """One global batch.

    audio (B, S) float32 zero-padded; num_samples (B,) int32 (or, from a feature cache, the frozen
    encoder's features (B, F, D) and frame_mask (B, F) bool instead);
    qformer_ids (B, Lq) int32: the instruction in Q-Former tokens, padded with the Q-Former pad id;
    instruction_ids (B, Li) int32: the instruction in LLM tokens, left-padded with -1;
    answer_ids (B, La) int32: the answer in LLM tokens (EOS last), right-padded with -1.
    """

    qformer_ids: jax.Array
    instruction_ids: jax.Array
    answer_ids: jax.Array
    audio: jax.Array | None = None
    num_samples: jax.Array | None = None
    features: jax.Array | None = None
    frame_mask: jax.Array | None = None


def is_encoder_decoder(llm: nnx.Module) -> bool:
    """True for encoder-decoder LLMs (T5), which have `encode`."""
    return hasattr(llm, "encode")


def remat_policy(name: str) -> Any:  # noqa: ANN401 (a jax.checkpoint policy)
    """The jax.checkpoint policy named in the config (see REMAT_POLICIES)."""
    return {
        "dots_saveable": jax.checkpoint_policies.dots_saveable,
        "everything": jax.checkpoint_policies.nothing_saveable,
    }[name]


class RematLayer(nnx.Module):
    """Wraps one frozen LLM layer so that its activations are rematerialised in the backward pass.

    Array (and None) arguments pass through jax.checkpoint; anything else (a dtype) is static.
    The wrapped layer keeps its weights under `layer`.
    """

    def __init__(self, layer: nnx.Module, policy: str):
        self.layer = layer
        self.policy = policy

    def __call__(self, *args: Any) -> Any:  # noqa: ANN401
        dynamic = [i for i, a in enumerate(args) if _is_array_tree(a)]
        graphdef, state = nnx.split(self.layer)

        def run(state: Any, values: list) -> Any:  # noqa: ANN401
            full = list(args)
            for i, v in zip(dynamic, values, strict=True):
                full[i] = v
            return nnx.merge(graphdef, state)(*full)

        return jax.checkpoint(run, policy=remat_policy(self.policy))(state, [args[i] for i in dynamic])


def _is_array_tree(value: Any) -> bool:  # noqa: ANN401
    leaves = jax.tree.leaves(value)
    return all(isinstance(x, jax.Array | jax.core.Tracer) for x in leaves)


@contextlib.contextmanager
def rematerialised_layers(llm: nnx.Module, policy: str) -> Iterator[None]:
    """Within the block, every layer the LLM calls as a whole (decoder-only layers; T5's encoder layers)
    is rematerialised with `policy`. The layers are swapped back afterwards, so the weights' paths (and
    the frozen-model fingerprints) do not depend on the policy. T5's decoder layers are not wrapped: its
    decoder calls their parts one by one (and answers are short). An LLM with scanned layers
    (`llm.scan_layers`) rematerialises the scan's body instead, every stack of it (T5's decoder too).
    """
    swapped = {}
    if getattr(llm, "scan_layers", False):
        previous, llm.remat_policy = llm.remat_policy, policy
        try:
            yield
        finally:
            llm.remat_policy = previous
        return
    if policy != "none":
        for name in ("layers", "encoder_layers"):
            layers = getattr(llm, name, None)
            if layers is not None:
                swapped[name] = layers
                setattr(llm, name, nnx.List([RematLayer(layer, policy) for layer in layers]))
    try:
        yield
    finally:
        for name, layers in swapped.items():
            setattr(llm, name, layers)


def masked_cross_entropy(
    logits_btv: jax.Array, labels_bt: jax.Array, weights_bt: jax.Array, normaliser: jax.Array | None = None
) -> jax.Array:
    """Weighted mean token cross-entropy: sum(w * ce) / max(sum(w), 1) (w: 0/1 masks, or per-token
    weights); divided by `normaliser` instead when given (a micro-batch's share of a larger batch's
    mean: that batch's max(sum(w), 1))."""
    log_probs = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_probs, labels_bt[..., None], axis=-1)[..., 0]
    weights = weights_bt.astype(jnp.float32)
    denominator = jnp.maximum(weights.sum(), 1.0) if normaliser is None else normaliser
    return -(picked * weights).sum() / denominator


def answer_weights(answer_ids_bl: jax.Array, loss_average: str) -> jax.Array:
    """Each answer token's weight in the loss (B, La) float32: 1 per valid token ("tokens"), or 1 / the
    example's valid tokens ("examples": every example's weights sum to 1); 0 on padding (-1)."""
    weights = (answer_ids_bl >= 0).astype(jnp.float32)
    if loss_average == "examples":
        weights = weights / jnp.maximum(weights.sum(axis=1, keepdims=True), 1.0)
    return weights


def loss_normaliser(answer_ids_bl: jax.Array, loss_average: str) -> jax.Array:
    """The denominator of a batch's loss, max(sum of `answer_weights`, 1) (a float32 scalar): the
    number of answer tokens ("tokens") or of examples with an answer ("examples")."""
    return jnp.maximum(answer_weights(answer_ids_bl, loss_average).sum(), 1.0)


class Stage2Model(nnx.Module):
    """Audio encoder + trainable bridge + LLM; the encoder and the LLM are frozen unless the config
    trains them (`audio.trainable`, `llm_trainable`)."""

    def __init__(
        self,
        config: Stage2Config,
        llm: nnx.Module,
        *,
        rngs: nnx.Rngs,
        audio_rngs: nnx.Rngs | None = None,
    ):
        """`llm`: a DecoderOnlyLM or EncoderDecoderLM (slit/models/llm/base.py), weights loaded, `Frozen`
        (made trainable here with `config.llm_trainable`)."""
        self.config = config
        self.audio_tower = make_audio_tower(config.audio, audio_rngs or rngs)
        self.bridge = make_bridge(config.bridge, llm.hidden_size, rngs)
        self.llm = unfreeze(llm) if config.llm_trainable else llm

    # --- the soft prompt ----------------------------------------------------------------------------

    def encode_audio(self, audio_bs: jax.Array, num_samples_b: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Encoder features (B, frames, enc_width) and their mask; no gradient flows back unless the
        encoder trains (`audio.trainable`)."""
        a = self.config.audio
        return encode_audio(
            self.audio_tower, a.window_samples, audio_bs, num_samples_b, trainable=a.trainable
        )

    def soft_prompt(
        self,
        audio_bs: jax.Array | None,
        num_samples_b: jax.Array | None,
        qformer_ids_bl: jax.Array | None,
        rngs: nnx.Rngs | None,
        features_bfd: jax.Array | None = None,
        frame_mask_bf: jax.Array | None = None,
    ) -> jax.Array:
        """The bridge's output (B, P, llm_width), in the LLM's input space, from the audio or from the
        frozen features themselves (a feature cache: `features_bfd`, `frame_mask_bf`)."""
        if features_bfd is None:
            features_bfd, frame_mask_bf = self.encode_audio(audio_bs, num_samples_b)
        else:
            features_bfd = jax.lax.stop_gradient(features_bfd)
        features_bfd = constrain(features_bfd, ("batch", "frames", "embed"))
        soft = self.bridge(features_bfd, frame_mask_bf, qformer_ids_bl, rngs)
        return constrain(soft, ("batch", "queries", "embed"))

    def prompt(
        self, soft_bqd: jax.Array, instruction_ids_bl: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """[soft prompt; instruction] as LLM input: embeddings (B, Q + Li, D), mask (B, Q + Li) and the
        token ids for repetition penalties (-1 on soft-prompt and padding slots). A bridge that carries
        the instruction itself (`instruction_to_llm` False: Pengi) gives the LLM the soft prompt alone
        (Li = 0)."""
        b, q, _ = soft_bqd.shape
        if not self.config.bridge.instruction_to_llm:
            instruction_ids_bl = instruction_ids_bl[:, :0]
        valid = instruction_ids_bl >= 0
        embeds = self.llm.embed(jnp.maximum(instruction_ids_bl, 0)).astype(jnp.float32)
        embeds = jnp.concatenate([soft_bqd.astype(jnp.float32), embeds], axis=1)
        mask = jnp.concatenate([jnp.ones((b, q), bool), valid], axis=1)
        ids = jnp.concatenate([jnp.full((b, q), -1, jnp.int32), jnp.where(valid, instruction_ids_bl, -1)], 1)
        return embeds, mask, ids

    # --- the loss -------------------------------------------------------------------------------------

    def answer_logits(self, batch: Stage2Batch, rngs: nnx.Rngs | None) -> jax.Array:
        """Logits (B, La, V) that predict each answer token (position j predicts answer_ids[:, j])."""
        soft = self.soft_prompt(
            batch.audio, batch.num_samples, batch.qformer_ids, rngs, batch.features, batch.frame_mask
        )
        prompt_embeds, prompt_mask, _ = self.prompt(soft, batch.instruction_ids)
        return self.logits_after_prompt(prompt_embeds, prompt_mask, batch.answer_ids)

    def logits_after_prompt(
        self, prompt_embeds: jax.Array, prompt_mask: jax.Array, answer_ids: jax.Array
    ) -> jax.Array:
        """Logits (B, La, V) predicting answer_ids (B, La; -1 = padding) after a prompt (B, P, D) with its
        mask (B, P): the LLM part of `answer_logits`, so that several answers can follow one prompt."""
        answer_valid = answer_ids >= 0
        answer_ids = jnp.maximum(answer_ids, 0)
        if is_encoder_decoder(self.llm):
            encoder_out = self.llm.encode(constrain(prompt_embeds, ("batch", "length", "embed")), prompt_mask)
            start = self.llm.token_ids.decoder_start
            decoder_ids = jnp.concatenate(
                [jnp.full((answer_ids.shape[0], 1), start, jnp.int32), answer_ids[:, :-1]], axis=1
            )
            positions = jnp.broadcast_to(jnp.arange(decoder_ids.shape[1]), decoder_ids.shape)
            logits, _ = self.llm.decode(decoder_ids, positions, encoder_out, prompt_mask)
            return logits
        embeds = jnp.concatenate([prompt_embeds, self.llm.embed(answer_ids).astype(jnp.float32)], axis=1)
        embeds = constrain(embeds, ("batch", "length", "embed"))
        mask = jnp.concatenate([prompt_mask, answer_valid], axis=1)
        positions = jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)
        p, a = prompt_mask.shape[1], answer_ids.shape[1]
        logits, _ = self.llm(embeds, positions, mask, logits_span=(p - 1, p + a - 1))
        return logits

    def __call__(
        self, batch: Stage2Batch, *, rngs: nnx.Rngs | None, normaliser: jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The answer-only language-modelling loss on one global batch. Returns (loss, metrics).

        normaliser: the loss's denominator (default: this batch's `loss_normaliser`); a micro-batch of
        gradient accumulation is given its full batch's, so that the micro-batches' losses sum to the
        full batch's loss."""
        policy, dtype = self.config.remat_policy, self.config.compute_dtype
        with rematerialised_layers(self.llm, policy), compute_dtype_scope(dtype):
            logits = self.answer_logits(batch, rngs)
        logits = constrain(logits, ("batch", "length", "vocab"))
        valid = batch.answer_ids >= 0
        labels = jnp.maximum(batch.answer_ids, 0)
        weights = answer_weights(batch.answer_ids, self.config.loss_average)
        loss = masked_cross_entropy(logits, labels, weights, normaliser)
        hits = (logits.argmax(-1) == labels) & valid
        accuracy = hits.sum() / jnp.maximum(valid.sum(), 1)
        return loss, {"loss": loss, "token_accuracy": accuracy, "answer_tokens": valid.sum()}
