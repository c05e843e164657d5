"""Stage one of SLIT/BLIP-2: a Q-Former trained against a frozen audio encoder.

Three objectives with equal weights (BLIP-2, arXiv 2301.12597; salesforce/LAVIS `blip2_qformer.py`), each
under its own attention mask:
- contrastive (ITC): queries-only and text-only passes, max over queries, learnable temperature;
- matching (ITM): [queries; text] with full visibility, hard negatives from the global batch;
- grounded generation (ITG): text after [DEC] generated from the queries under a causal text mask.

The frozen audio tower is the shared audio-encoder component (slit.models.audio.encoder: Whisper or a
wav2vec2-family encoder, a chosen hidden layer, optional windows). A batch may also bring the frozen
features themselves (a feature cache), and then the tower is not run.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from slit import losses
from slit.models import masks
from slit.models.audio.encoder import AudioEncoderConfig, encode_audio, make_audio_tower
from slit.models.layers import Dense, LayerNorm, gelu, l2_normalize, normal, weight, zeros
from slit.models.qformer import BERT_LAYER_NORM_EPS, QFormer, QFormerConfig
from slit.train.sharding import constrain


@dataclasses.dataclass(frozen=True)
class Stage1Config:
    """Everything that shapes a stage-one model.

    audio: the frozen encoder (slit.models.audio.encoder: architecture, hidden layer, windows).
    qformer_init: where the Q-Former's pretrained text weights come from (`qformer.init`; "" = random),
      read by `slit.train.stage1_model.create_model`; the model itself never reads files.
    """

    audio: AudioEncoderConfig
    qformer: QFormerConfig
    embed_dim: int = 256
    temperature_init: float = 0.07
    temperature_min: float = 0.001
    temperature_max: float = 0.5
    label_smoothing: float = 0.1
    pad_token_id: int = 0
    dec_token_id: int = 1
    qformer_init: str = ""


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Stage1Batch:
    """One global batch: text_ids (B, T) int32, and either the audio (audio (B, S) float32 zero-padded,
    num_samples (B,)) or the frozen encoder's outputs (features (B, F, D), frame_mask (B, F) bool)."""

    text_ids: jax.Array
    audio: jax.Array | None = None
    num_samples: jax.Array | None = None
    features: jax.Array | None = None
    frame_mask: jax.Array | None = None


class MaskedLMHead(nnx.Module):
    """BERT's MLM head: dense -> GELU -> LayerNorm -> logits tied to the word embeddings (+ bias)."""

    def __init__(self, width: int, vocab_size: int, init_std: float, *, rngs: nnx.Rngs):
        self.transform = Dense(width, width, axes=("embed", "embed"), rngs=rngs, kernel_init=normal(init_std))
        self.norm = LayerNorm(width, eps=BERT_LAYER_NORM_EPS, rngs=rngs)
        self.bias = weight(nnx.Param, zeros, rngs, (vocab_size,), ("vocab",))

    def __call__(self, hidden_bld: jax.Array, word_embeddings: nnx.Module) -> jax.Array:
        """(batch, L, width) -> logits (batch, L, vocab)."""
        h = self.norm(gelu(self.transform(hidden_bld)))
        return word_embeddings.attend(h) + self.bias[...]


class Stage1Model(nnx.Module):
    """Frozen audio tower + trainable Q-Former with contrastive, matching and generation heads."""

    def __init__(self, config: Stage1Config, *, rngs: nnx.Rngs, audio_rngs: nnx.Rngs | None = None):
        c = config
        self.config = c
        self.audio_tower = make_audio_tower(c.audio, audio_rngs or rngs)
        self.qformer = QFormer(c.qformer, rngs=rngs)
        width = c.qformer.width
        head = dict(axes=("embed", None), rngs=rngs, kernel_init=normal(c.qformer.initializer_range))
        self.audio_projection = Dense(width, c.embed_dim, **head)
        self.text_projection = Dense(width, c.embed_dim, **head)
        self.itm_head = Dense(width, 2, **head)
        self.lm_head = MaskedLMHead(width, c.qformer.vocab_size, c.qformer.initializer_range, rngs=rngs)
        self.temperature = nnx.Param(jnp.asarray(c.temperature_init, jnp.float32), out_sharding=())

    def clamped_temperature(self) -> jax.Array:
        """The temperature clamped to [min, max]; the gradient passes straight through the clamp."""
        t = self.temperature[...]
        clamped = jnp.clip(t, self.config.temperature_min, self.config.temperature_max)
        return t + jax.lax.stop_gradient(clamped - t)

    def encode_audio(self, audio_bs: jax.Array, num_samples_b: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Encoder features (batch, frames, enc_width) and their mask; no gradient flows back unless the
        encoder trains (window by window when `audio.window_samples` is set:
        slit.models.audio.encoder.encode_audio)."""
        a = self.config.audio
        return encode_audio(
            self.audio_tower, a.window_samples, audio_bs, num_samples_b, trainable=a.trainable
        )

    def batch_features(self, batch: Stage1Batch) -> tuple[jax.Array, jax.Array]:
        """The batch's frozen features and frame mask: given (a feature cache), or encoded from its audio."""
        if batch.features is not None:
            features, mask = jax.lax.stop_gradient(batch.features), batch.frame_mask
        else:
            features, mask = self.encode_audio(batch.audio, batch.num_samples)
        return constrain(features, ("batch", "frames", "embed")), mask

    def query_outputs(
        self,
        features: jax.Array,
        mask: jax.Array,
        rngs: nnx.Rngs | None,
        encoder_kv: list | None = None,
        return_self_kv: bool = False,
    ) -> jax.Array | tuple[jax.Array, list]:
        """Queries-only Q-Former pass -> (batch, num_queries, width) (and, with `return_self_kv`, each
        layer's self-attention keys and values, for a grounded-generation pass to reuse)."""
        out = self.qformer(
            with_queries=True,
            encoder_bfd=features,
            encoder_mask_bf=mask,
            encoder_kv=encoder_kv,
            rngs=rngs,
            return_self_kv=return_self_kv,
        )
        if return_self_kv:
            return constrain(out[0], ("batch", "queries", "embed")), out[1]
        return constrain(out, ("batch", "queries", "embed"))

    def audio_embeddings(self, query_outputs_bqw: jax.Array) -> jax.Array:
        """(batch, queries, width) -> L2-normalised (batch, queries, embed_dim)."""
        return l2_normalize(self.audio_projection(query_outputs_bqw))

    def text_embeddings(self, text_ids_bl: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
        """Text-only pass; the [CLS] output -> L2-normalised (batch, embed_dim)."""
        valid = text_ids_bl != self.config.pad_token_id
        hidden = self.qformer(
            text_ids_bl=text_ids_bl,
            with_queries=False,
            attention_mask_bll=masks.text_only_mask(valid),
            rngs=rngs,
        )
        return l2_normalize(self.text_projection(hidden[:, 0]))

    def match_logits(self, encoder_kv: list, frame_mask_bf: jax.Array, text_ids_bl: jax.Array) -> jax.Array:
        """The matching head's [no-match, match] logits for (clip, text) pairs, averaged over queries:
        (batch, 2).

        encoder_kv: `qformer.encoder_kv(features)` of each pair's clip; queries and text see each other.
        The match logit ([:, 1]) is BLIP-2's re-ranking score (added to the contrastive similarity).
        """
        hidden = self.qformer(
            text_ids_bl=text_ids_bl,
            attention_mask_bll=masks.bidirectional_mask(
                self.config.qformer.num_queries, text_ids_bl != self.config.pad_token_id
            ),
            encoder_kv=encoder_kv,
            encoder_mask_bf=frame_mask_bf,
            rngs=None,
        )
        return self.itm_head(hidden[:, : self.config.qformer.num_queries]).mean(axis=1)

    def __call__(
        self, batch: Stage1Batch, *, rngs: nnx.Rngs | None, negatives_key: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Computes the stage-one loss on one global batch. Returns (loss, metrics)."""
        c = self.config
        num_queries = c.qformer.num_queries
        text_ids = batch.text_ids
        text_valid = text_ids != c.pad_token_id
        features, frame_mask = self.batch_features(batch)
        # Cross-attention keys/values, computed once per clip and shared by the three objectives.
        encoder_kv = self.qformer.encoder_kv(features)

        # Contrastive: queries and text in two separate passes.
        query_out, query_self_kv = self.query_outputs(features, frame_mask, rngs, encoder_kv, True)
        audio_emb = self.audio_embeddings(query_out)
        text_emb = self.text_embeddings(text_ids, rngs)
        temperature = self.clamped_temperature()
        itc_loss, sim_a2t = losses.contrastive_loss(audio_emb, text_emb, temperature, c.label_smoothing)

        # Matching: [positives; (negative audio, text); (audio, negative text)].
        same_text = jnp.all(text_ids[:, None, :] == text_ids[None, :, :], axis=-1)
        neg_text_idx, neg_audio_idx = losses.sample_hard_negatives(negatives_key, sim_a2t, same_text)
        b = text_ids.shape[0]
        itm_text = jnp.concatenate([text_ids, text_ids, text_ids[neg_text_idx]], axis=0)
        order = jnp.concatenate([jnp.arange(b), neg_audio_idx, jnp.arange(b)])
        itm_kv = jax.tree.map(lambda x: x[order], encoder_kv)
        itm_frame_mask = frame_mask[order]
        itm_hidden = self.qformer(
            text_ids_bl=itm_text,
            attention_mask_bll=masks.bidirectional_mask(num_queries, itm_text != c.pad_token_id),
            encoder_kv=itm_kv,
            encoder_mask_bf=itm_frame_mask,
            rngs=rngs,
        )
        itm_logits = self.itm_head(itm_hidden[:, :num_queries]).mean(axis=1)
        itm_labels = jnp.concatenate([jnp.ones(b, jnp.int32), jnp.zeros(2 * b, jnp.int32)])
        itm_loss, itm_accuracy = losses.matching_loss(itm_logits, itm_labels)

        # Grounded generation: [DEC] replaces [CLS]; text is causal and sees every query. The queries'
        # rows would see only queries, so they are the contrastive query pass's: the text attends to that
        # pass's keys and values (LAVIS passes its `past_key_values`) instead of recomputing them.
        decoder_ids = text_ids.at[:, 0].set(c.dec_token_id)
        itg_hidden = self.qformer(
            text_ids_bl=decoder_ids,
            with_queries=False,
            attention_mask_bll=masks.grounded_generation_text_mask(num_queries, text_valid),
            prefix_kv=query_self_kv,
            rngs=rngs,
        )
        logits = constrain(
            self.lm_head(itg_hidden[:, :-1], self.qformer.word_embeddings), ("batch", "length", "vocab")
        )
        itg_loss = losses.language_modeling_loss(
            logits, text_ids[:, 1:], text_valid[:, 1:], c.label_smoothing
        )

        loss = itc_loss + itm_loss + itg_loss
        metrics = {
            "loss": loss,
            "itc_loss": itc_loss,
            "itm_loss": itm_loss,
            "itg_loss": itg_loss,
            "itm_accuracy": itm_accuracy,
            "temperature": temperature,
        }
        return loss, metrics
