"""`slit import-pengi`: a small Pengi-shaped checkpoint (Pengi's key names, `torch.save({"model": sd})`)
is converted with `slit convert-torch`, imported, and each part is checked against its source:

- the bridge: slit's `PengiBridge` from bridge.safetensors (prompt tower from clip/) gives the prefix of a
  PyTorch reference of Pengi's `Projection` / `TransformerMapper` / `generate_prefix_inference`;
- clap/, clip/, gpt2/ load in transformers and answer as the tiny models they were made from;
- a one-step stage-two run with the printed overrides starts from the imported bridge (`bridge.init`);
- a missing tensor, an unknown one and a .pt input are one-line UserErrors.

The reference below is written from Pengi's models/pengi.py and models/decoder.py: `Projection` (two
bias-free linears, GELU, dropout, LayerNorm of their sum), `MultiHeadAttention` (bias-free `to_queries`
and `to_keys_values`, whose output is reshaped to (B, M, 2, heads, head_dim): keys first), pre-LN
`TransformerLayer` with a ReLU MLP of ratio 2, `TransformerMapper` (8 heads) and `DecoderModel`'s
`generate_prefix_inference` (L2-normalised inputs, audio prefix then text prefix).
"""

from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx, traverse_util  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from torch import nn  # noqa: E402

from slit import cli, runs  # noqa: E402
from slit.errors import UserError  # noqa: E402
from slit.interop import hf_clip  # noqa: E402
from slit.interop.pengi import PengiFrontend, import_pengi  # noqa: E402
from slit.models.bridges.pengi import PengiBridge, PengiBridgeConfig  # noqa: E402
from slit.train import stage2  # noqa: E402
from tests.test_parity_htsat import TINY_AUDIO, TINY_EXTRACTOR, write_clap_audio  # noqa: E402
from tests.test_pengi_published import write_clip, write_gpt2  # noqa: E402
from tests.test_train_stage2 import stage2_config  # noqa: E402

PROJECTION, PREFIX, CLIP_LENGTH, NUM_LAYERS = 24, 3, 2, 4  # Pengi: 1024, 40, 40, 8 (4 mapper layers)
FRONTEND = PengiFrontend(  # the tiny HTSAT's (tests/test_parity_htsat.py), in place of Pengi's 44.1 kHz
    sample_rate=TINY_EXTRACTOR["sampling_rate"],
    n_fft=TINY_EXTRACTOR["fft_window_size"],
    hop_length=TINY_EXTRACTOR["hop_length"],
    num_mel_bins=TINY_EXTRACTOR["feature_size"],
    fmin=50.0,
    fmax=TINY_EXTRACTOR["frequency_max"],
    max_length_s=TINY_EXTRACTOR["max_length_s"],
)


# ---------------------------------------------------------------------------------------------------------
# A PyTorch reference of Pengi's bridge (models/pengi.py, models/decoder.py).


class Projection(nn.Module):
    """Pengi's `Projection`: LayerNorm(e1 + dropout(linear2(gelu(e1)))), e1 = linear1(x), no biases."""

    def __init__(self, d_in: int, d_out: int, p: float = 0.5):
        super().__init__()
        self.linear1 = nn.Linear(d_in, d_out, bias=False)
        self.linear2 = nn.Linear(d_out, d_out, bias=False)
        self.layer_norm = nn.LayerNorm(d_out)
        self.drop = nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.linear1(x)
        return self.layer_norm(e1 + self.drop(self.linear2(nn.functional.gelu(e1))))


class Attention(nn.Module):
    """Pengi's `MultiHeadAttention` (self-attention use): queries (B, N, H, d); keys and values from one
    linear reshaped to (B, N, 2, H, d); softmax over the key axis; `project` has a bias."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_queries = nn.Linear(dim, dim, bias=False)
        self.to_keys_values = nn.Linear(dim, 2 * dim, bias=False)
        self.project = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = self.to_queries(x).reshape(b, n, self.heads, c // self.heads)
        kv = self.to_keys_values(x).reshape(b, n, 2, self.heads, c // self.heads)
        k, v = kv[:, :, 0], kv[:, :, 1]
        att = (torch.einsum("bnhd,bmhd->bnmh", q, k) * (c // self.heads) ** -0.5).softmax(dim=2)
        return self.project(torch.einsum("bnmh,bmhd->bnhd", att, v).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class Layer(nn.Module):
    """Pengi's `TransformerLayer`: x + attn(norm1(x)), then + mlp(norm2(x)); MLP ratio 2."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, dim: int, heads: int, layers: int):
        super().__init__()
        self.layers = nn.ModuleList([Layer(dim, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class TransformerMapper(nn.Module):
    """Pengi's `TransformerMapper`: linear -> (B, clip_length, D), then learned constants; 8 heads."""

    def __init__(self, dim_clip: int, dim: int, prefix_length: int, clip_length: int, num_layers: int):
        super().__init__()
        self.clip_length = clip_length
        self.transformer = Transformer(dim, 8, num_layers)
        self.linear = nn.Linear(dim_clip, clip_length * dim)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x).view(x.shape[0], self.clip_length, -1)
        prefix = self.prefix_const.unsqueeze(0).expand(x.shape[0], *self.prefix_const.shape)
        return self.transformer(torch.cat((x, prefix), dim=1))[:, self.clip_length :]


class ReferenceBridge(nn.Module):
    """The trainable parts of Pengi's `PENGI` under its attribute names, so that `state_dict` has its keys."""

    def __init__(self, audio_width: int, prompt_width: int, llm_width: int):
        super().__init__()
        self.audio_projection = Projection(audio_width, PROJECTION)
        self.caption_projection = Projection(prompt_width, PROJECTION)
        args = (PROJECTION, llm_width, PREFIX, CLIP_LENGTH, NUM_LAYERS // 2)  # DecoderModel: num_layers / 2
        self.audio_project, self.text_project = TransformerMapper(*args), TransformerMapper(*args)
        self.llm_width = llm_width

    def pengi_state_dict(self) -> dict[str, torch.Tensor]:
        sd = {}
        for name, tensor in self.state_dict().items():
            head, _, rest = name.partition(".")
            prefix = {
                "audio_projection": "audio_encoder.projection.",
                "caption_projection": "caption_encoder.projection.",
                "audio_project": "caption_decoder.audio_project.",
                "text_project": "caption_decoder.text_project.",
            }[head]
            sd[prefix + rest] = tensor
        return sd

    def generate_prefix_inference(self, audio_embed: torch.Tensor, text_embed: torch.Tensor) -> torch.Tensor:
        """`PENGI.generate_prefix_inference` from the pooled HTSAT output and CLIP's projected embedding:
        project, L2-normalise, map; (B, 2 * prefix_length, D)."""
        a, t = self.audio_projection(audio_embed), self.caption_projection(text_embed)
        a, t = a / a.norm(2, -1).reshape(-1, 1), t / t.norm(2, -1).reshape(-1, 1)
        shape = (-1, PREFIX, self.llm_width)
        return torch.cat((self.audio_project(a).view(shape), self.text_project(t).view(shape)), dim=1)


# ---------------------------------------------------------------------------------------------------------
# transformers' HTSAT under Pengi's names (the inverse of the import's mapping).

HTSAT_NAMES = {  # transformers' name in a block -> Pengi's (models/htsat.py SwinTransformerBlock)
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.self.relative_position_bias_table": "attn.relative_position_bias_table",
    "attention.self.relative_position_index": "attn.relative_position_index",
    "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}


def pengi_htsat(clap: transformers.ClapAudioModel) -> dict[str, torch.Tensor]:
    """A ClapAudioModel's weights under Pengi's `audio_encoder.base.htsat.` names, with the tensors Pengi
    has and transformers lacks: fused qkv, shifted-window masks, the tscam head and torchlibrosa's
    frontend constants (melW: librosa's Slaney filters for FRONTEND, via transformers' equal function)."""
    sd, out = clap.state_dict(), {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in sd.items():
        name = name.removeprefix("audio_encoder.")
        if name.startswith("batch_norm."):
            out["bn0." + name.removeprefix("batch_norm.")] = tensor
            continue
        parts = name.split(".")
        if parts[0] == "layers" and parts[2] == "blocks":
            block, rest = ".".join(parts[:4]), ".".join(parts[4:])
            if rest.startswith("attention.self.") and rest.split(".")[2] in ("query", "key", "value"):
                fused.setdefault(f"{block}.attn.qkv.{parts[-1]}", {})[rest.split(".")[2]] = tensor
                continue
            for hf, pengi in HTSAT_NAMES.items():
                if rest.startswith(hf):
                    out[f"{block}.{pengi}{rest[len(hf) :]}"] = tensor
                    break
            else:
                raise AssertionError(name)
            continue
        out[name] = tensor  # patch_embed.*, layers.i.downsample.*, norm.*
    for key, qkv in fused.items():
        out[key] = torch.cat([qkv["query"], qkv["key"], qkv["value"]])
    c = clap.config
    for i, depth in enumerate(c.depths):  # masks of the shifted (odd) blocks: (windows, w*w, w*w)
        resolution = c.spec_size // c.patch_size // 2**i
        if resolution > c.window_size:
            windows = (resolution // c.window_size) ** 2
            for j in range(1, depth, 2):
                out[f"layers.{i}.blocks.{j}.attn_mask"] = torch.zeros(
                    windows, c.window_size**2, c.window_size**2
                )
    classes = 5
    out["tscam_conv.weight"] = torch.randn(classes, c.hidden_size, 2, 3)
    out["tscam_conv.bias"] = torch.randn(classes)
    out["head.weight"], out["head.bias"] = torch.randn(classes, classes), torch.randn(classes)
    bins = FRONTEND.n_fft // 2 + 1
    out["spectrogram_extractor.stft.conv_real.weight"] = torch.randn(bins, 1, FRONTEND.n_fft)
    out["spectrogram_extractor.stft.conv_imag.weight"] = torch.randn(bins, 1, FRONTEND.n_fft)
    from transformers.audio_utils import mel_filter_bank

    mel = mel_filter_bank(
        num_frequency_bins=bins,
        num_mel_filters=FRONTEND.num_mel_bins,
        min_frequency=FRONTEND.fmin,
        max_frequency=FRONTEND.fmax,
        sampling_rate=FRONTEND.sample_rate,
        norm="slaney",
        mel_scale="slaney",
    )
    out["logmel_extractor.melW"] = torch.from_numpy(mel.astype(np.float32))
    return {"audio_encoder.base.htsat." + k: v for k, v in out.items()}


class Tiny:
    """The tiny models, the Pengi-shaped checkpoint made from them and its import."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        self.clap = write_clap_audio(root / "clap_src")
        self.clip = write_clip(root / "clip_src")  # (the directory also holds the tokenizer)
        write_gpt2(root / "gpt2_src")
        self.gpt2 = transformers.GPT2LMHeadModel.from_pretrained(str(root / "gpt2_src")).eval()
        torch.manual_seed(1)
        llm_width = self.gpt2.config.n_embd
        self.bridge = ReferenceBridge(
            self.clap.config.hidden_size, self.clip.config.projection_dim, llm_width
        )
        with torch.no_grad():  # non-trivial norms, biases and constants
            for p in self.bridge.parameters():
                if p.ndim == 1:
                    p.add_(0.2 * torch.randn_like(p))
        self.bridge.eval()
        sd = pengi_htsat(self.clap) | self.bridge.pengi_state_dict()
        for name, tensor in self.clip.state_dict().items():
            if name == "text_projection.weight":
                sd["caption_encoder.clip_text_projection.weight"] = tensor
            else:
                sd["caption_encoder.base." + name.removeprefix("text_model.")] = tensor
        sd["caption_encoder.base.embeddings.position_ids"] = torch.arange(
            self.clip.config.max_position_embeddings
        )[None]
        for name, tensor in self.gpt2.state_dict().items():
            sd["caption_decoder.gpt." + name] = tensor
        sd["caption_decoder.gpt.transformer.h.0.attn.bias"] = torch.ones(1, 1, 8, 8)  # older transformers'
        sd["caption_decoder.gpt.transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)  # mask buffers
        self.state_dict = {k: v.detach().clone().contiguous() for k, v in sd.items()}
        self.pt = root / "base.pth"
        torch.save({"model": self.state_dict, "epoch": 3}, self.pt)
        self.safetensors = root / "base.safetensors"
        assert cli.main(["convert-torch", str(self.pt), str(self.safetensors)]) == 0
        self.out = root / "imported"
        self.result = import_pengi(
            self.safetensors,
            self.out,
            clip_tokenizer=root / "clip_src",
            gpt2_tokenizer=root / "gpt2_src",
            frontend=FRONTEND,
        )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    return Tiny(tmp_path_factory.mktemp("pengi_import"))


def test_pengi_names_are_pengis(tiny):
    """A few of Pengi's names written out by hand from models/htsat.py, pengi.py and decoder.py (so that
    the inverse mapping above is not the only witness)."""
    h = "audio_encoder.base.htsat."
    for key in (
        h + "bn0.running_var",
        h + "patch_embed.proj.weight",
        h + "layers.0.blocks.0.norm1.weight",
        h + "layers.0.blocks.0.attn.qkv.weight",
        h + "layers.0.blocks.0.attn.relative_position_bias_table",
        h + "layers.0.blocks.1.attn.proj.bias",
        h + "layers.0.blocks.1.attn_mask",
        h + "layers.1.blocks.1.mlp.fc2.bias",
        h + "layers.0.downsample.reduction.weight",
        h + "norm.weight",
        h + "tscam_conv.weight",
        h + "logmel_extractor.melW",
        "audio_encoder.projection.layer_norm.weight",
        "caption_encoder.clip_text_projection.weight",
        "caption_encoder.base.encoder.layers.0.self_attn.q_proj.weight",
        "caption_encoder.projection.linear2.weight",
        "caption_decoder.gpt.transformer.h.1.attn.c_attn.weight",
        "caption_decoder.audio_project.prefix_const",
        "caption_decoder.text_project.transformer.layers.1.attn.to_keys_values.weight",
        "caption_decoder.audio_project.transformer.layers.0.mlp.fc1.bias",
    ):
        assert key in tiny.state_dict, key
    qkv = tiny.state_dict[h + "layers.0.blocks.0.attn.qkv.weight"]
    dim = TINY_AUDIO["patch_embeds_hidden_size"]
    assert qkv.shape == (3 * dim, dim)


def bridge_from_import(out: pathlib.Path) -> PengiBridge:
    """slit's PengiBridge of bridge.json's sizes: bridge.safetensors, prompt tower from clip/."""
    sizes = json.loads((out / "bridge.json").read_text())
    clip_config, clip_tensors = hf_clip.load_clip_text(out / "clip")
    config = PengiBridgeConfig(
        encoder_width=sizes["encoder_width"],
        prompt_encoder=clip_config,
        **{k: sizes[k] for k in ("projection_width", "prefix_length", "clip_length", "mapper_layers")},
        mapper_heads=sizes["mapper_heads"],
        mapper_mlp_ratio=sizes["mapper_mlp_ratio"],
    )
    bridge = PengiBridge(config, sizes["llm_width"], rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(bridge)
    pure = traverse_util.flatten_dict(nnx.to_pure_dict(state))
    by_name = {".".join(map(str, k)): k for k in pure}
    loaded = load_file(str(out / "bridge.safetensors"))
    tower = traverse_util.flatten_dict(hf_clip.clip_text_params(clip_config, clip_tensors))
    loaded |= {"prompt_tower." + ".".join(map(str, k)): v for k, v in tower.items()}
    assert set(loaded) == set(by_name)
    for name, value in loaded.items():
        assert tuple(value.shape) == tuple(pure[by_name[name]].shape), name
        pure[by_name[name]] = jnp.asarray(value)
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(pure))
    return nnx.merge(graphdef, state)


def test_bridge_prefix_equals_pengis(tiny):
    sizes = tiny.result.sizes
    assert sizes["projection_width"] == PROJECTION and sizes["prefix_length"] == PREFIX
    assert sizes["clip_length"] == CLIP_LENGTH and sizes["mapper_layers"] == NUM_LAYERS // 2
    assert sizes["mapper_heads"] == 8 and sizes["mapper_mlp_ratio"] == 2.0
    bridge = bridge_from_import(tiny.out)
    rng = np.random.default_rng(0)
    frames = rng.standard_normal((3, 5, tiny.clap.config.hidden_size)).astype(np.float32)
    mask = np.ones((3, 5), bool)
    tok = transformers.CLIPTokenizerFast.from_pretrained(str(tiny.out / "clip"))
    ids = np.asarray(
        tok(["the cat", "a dog, again", "bird"], padding="max_length", max_length=16, truncation=True)[
            "input_ids"
        ]
    )
    got = np.asarray(bridge(jnp.asarray(frames), jnp.asarray(mask), jnp.asarray(ids), rngs=None))
    with torch.no_grad():
        text = tiny.clip(input_ids=torch.from_numpy(ids)).text_embeds
        want = tiny.bridge.generate_prefix_inference(torch.from_numpy(frames.mean(1)), text).numpy()
    assert got.shape == (3, 2 * PREFIX, tiny.gpt2.config.n_embd)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_parts_load_in_transformers(tiny):
    out = tiny.out
    clap = transformers.ClapAudioModel.from_pretrained(str(out / "clap")).eval()
    features = torch.randn(2, 1, 201, TINY_AUDIO["num_mel_bins"])
    with torch.no_grad():
        want, got = tiny.clap(input_features=features), clap(input_features=features)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=0, atol=1e-6)
    extractor = transformers.ClapFeatureExtractor.from_pretrained(str(out / "clap"))
    assert (extractor.sampling_rate, extractor.hop_length, extractor.feature_size) == (16000, 160, 16)
    assert (extractor.truncation, extractor.padding, extractor.frequency_min) == (
        "rand_trunc",
        "repeat",
        50.0,
    )
    assert tiny.result.frontend.startswith("melW equals")

    clip = transformers.CLIPTextModelWithProjection.from_pretrained(str(out / "clip")).eval()
    ids = torch.tensor([[5, 9, 12, hf_clip_eos(tiny)], [7, hf_clip_eos(tiny), 0, 0]])
    with torch.no_grad():
        torch.testing.assert_close(clip(input_ids=ids).text_embeds, tiny.clip(input_ids=ids).text_embeds)

    gpt2 = transformers.GPT2LMHeadModel.from_pretrained(str(out / "gpt2")).eval()
    ids = torch.tensor([[1, 4, 9, 2, 7]])
    with torch.no_grad():
        torch.testing.assert_close(gpt2(input_ids=ids).logits, tiny.gpt2(input_ids=ids).logits)
    assert transformers.AutoTokenizer.from_pretrained(str(out / "gpt2")).eos_token_id == 1

    summary = json.loads((out / "pengi.json").read_text())
    skipped = summary["skipped"]
    assert "audio_encoder.base.htsat.tscam_conv.weight" in skipped
    assert "caption_decoder.gpt.lm_head.weight" in skipped  # tied to wte
    assert "caption_encoder.base.embeddings.position_ids" in skipped
    # tscam head 4, frontend 3, shifted-window masks 2, position_ids 1, GPT-2 mask buffers 2, tied lm_head 1
    assert len(skipped) == 4 + 3 + 2 + 1 + 2 + 1


def hf_clip_eos(tiny: Tiny) -> int:
    return tiny.clip.config.eos_token_id


def test_stage_two_starts_from_the_imported_bridge(tiny, tiny_data_dir, tmp_path):
    overrides = dict(tiny.result.overrides)
    assert overrides["bridge.init"] == str(tiny.out / "bridge.safetensors")
    assert overrides["data.sample_rate"] == "16000" and overrides["data.max_seconds"] == "2.0"
    config = stage2_config(
        tiny_data_dir,
        tiny.out / "gpt2",
        total_steps=1,
        checkpoint_every_steps=1,
        **{
            **overrides,
            "optimizer.lr_multipliers": "bridge=0",  # held fixed: the step-1 checkpoint keeps step 0's
            "eval.tasks": "()",
            "data.max_qformer_instruction_length": 16,
        },
    )
    stage2.validate(config, 1, 1)
    stage2.train(config, tmp_path)
    params = traverse_util.flatten_dict(runs.load_run(tmp_path).params["bridge"])
    params = {".".join(map(str, k)): np.asarray(v) for k, v in params.items()}
    imported = load_file(str(tiny.out / "bridge.safetensors"))
    assert set(params) == set(imported)
    for name, value in imported.items():
        np.testing.assert_array_equal(params[name], value, err_msg=name)

    config.init_from = str(tmp_path)
    with pytest.raises(Exception, match="bridge.init=.* and init_from=.*drop one"):
        stage2.validate(config, 1, 1)


def test_errors(tiny, tmp_path, capsys):
    with pytest.raises(UserError, match=r"PyTorch pickle; convert it first: slit convert-torch"):
        import_pengi(tiny.pt, tmp_path / "a")
    assert cli.main(["import-pengi", str(tiny.pt), "--out", str(tmp_path / "a")]) != 0

    from safetensors.numpy import save_file

    tensors = load_file(str(tiny.safetensors))
    missing = dict(tensors)
    del missing["caption_decoder.text_project.transformer.layers.1.attn.to_keys_values.weight"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(UserError, match=r"^Pengi checkpoint: missing tensor caption_decoder.text_project"):
        import_pengi(tmp_path / "missing.safetensors", tmp_path / "b", frontend=FRONTEND)
    bad = dict(tensors, **{"audio_encoder.projection.linear2.weight": np.zeros((3, 3), np.float32)})
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(UserError, match=r"audio_encoder.projection.linear2.weight has shape \(3, 3\)"):
        import_pengi(tmp_path / "bad.safetensors", tmp_path / "c", frontend=FRONTEND)
    extra = dict(tensors, **{"caption_decoder.mystery": np.zeros(2, np.float32)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(UserError, match=r"does not know: caption_decoder.mystery"):
        import_pengi(tmp_path / "extra.safetensors", tmp_path / "d", frontend=FRONTEND)

    # Without tokenizers: the directories say so, and head counts are width / 64 (here 1).
    capsys.readouterr()
    assert cli.main(["import-pengi", str(tiny.safetensors), "--out", str(tmp_path / "e")]) != 0
    assert "bn0 has 16 mel bins; the frontend has 64" in capsys.readouterr().err  # (Pengi's frontend)
    result = import_pengi(tiny.safetensors, tmp_path / "e", frontend=FRONTEND)
    assert "has no tokenizer" in result.notes[0] and "--clip-tokenizer" in result.notes[0]
    assert json.loads((tmp_path / "e" / "gpt2" / "config.json").read_text())["n_head"] == 1
    assert "--config.bridge.init=" in result.summary()
    assert "configs/pengi_gpt2.py" not in result.summary()  # (offered for Pengi's published sizes only)
    from slit.interop.pengi import published_sizes

    published = dict(projection_width=1024, prefix_length=40, clip_length=40, mapper_layers=4)
    assert published_sizes({**published, "mapper_mlp_ratio": 2.0})


@pytest.mark.parametrize(
    "sample_rate, fmax, words",
    [
        (44100, 8000.0, "melW equals the preprocessor_config.json filter bank"),
        (32000, 14000.0, "slit's frontend applies the same bank"),
    ],
)
def test_frontend_check_names_the_filter_bank_and_slit_applies_it(sample_rate, fmax, words):
    """Pengi's declared frontend (44.1 kHz, 50-8000 Hz) is recognised, and so is models/config.py's 32 kHz,
    50-14000 Hz filter bank (which HTSATWrapper builds): then the preprocessor_config.json changes make
    slit's CLAP frontend, reading 44.1 kHz audio, apply exactly that bank (transformers' own filters)."""
    from transformers.audio_utils import mel_filter_bank

    from slit.interop.hf_clap import clap_frontend_config_from_hf
    from slit.interop.pengi import HTSAT, _check_frontend, _Source
    from slit.models.audio.clap_frontend import clap_mel_filters

    mel = mel_filter_bank(
        num_frequency_bins=513,
        num_mel_filters=64,
        min_frequency=50.0,
        max_frequency=fmax,
        sampling_rate=sample_rate,
        norm="slaney",
        mel_scale="slaney",
    )
    source = _Source({HTSAT + "logmel_extractor.melW": mel.astype(np.float32)})
    check, changes = _check_frontend(source, PengiFrontend(), 64)
    assert words in check
    assert source.skipped == [HTSAT + "logmel_extractor.melW"]
    frontend = clap_frontend_config_from_hf(PengiFrontend().extractor_config() | changes)
    assert frontend.sample_rate == 44100  # the audio stays at 44.1 kHz
    np.testing.assert_allclose(clap_mel_filters(frontend), mel, atol=1e-9)
