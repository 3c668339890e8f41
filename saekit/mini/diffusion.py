"""Miniature Stable Diffusion and CLIP for the steering chapter's `mini` profile.

Everything here is a real diffusers / transformers architecture built from a tiny config,
saved with `save_pretrained` and meant to be reloaded with `from_pretrained`, so the steering
code runs the exact path it runs on `CompVis/stable-diffusion-v1-4`. Weights are random: the
images are noise-like and the "attributes" mechanical, but every step executes.

The tokenizer cannot be downloaded, so we train a small byte-level BPE with `tokenizers` on the
generated prompt corpus, using the same normaliser, pre-tokeniser and `</w>` word-end marker as
CLIP's, and hand its vocabulary and merges to `transformers.CLIPTokenizer`.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import (
    CLIPImageProcessorPil,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
)

from saekit.mini.miniatures import clip_text_config, clip_vision_config, tiny_clip

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's own pre-tokeniser pattern, so the trained BPE splits words exactly as CLIPTokenizer does.
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

# Word lists for the generated corpus. Grouped by part of speech so the attribute-discovery
# tests know which words are descriptive (nouns, adjectives, adverbs) and which are not.
SUBJECTS = ["man", "woman", "cat", "dog", "bird", "robot", "castle", "car", "tree", "dragon"]
ADJECTIVES = ["red", "blue", "old", "young", "elderly", "tiny", "giant", "shiny", "neon", "golden"]
ADVERBS = ["brightly", "softly", "quietly", "quickly"]
PARTICIPLES = ["glowing", "sleeping", "running", "flying"]
ACCESSORIES = ["wearing sunglasses", "with a hat", "holding an umbrella", "with a scarf"]
SETTINGS = ["in the desert", "by the sea", "in a forest", "on a mountain", "in the city"]
STYLES = ["anime", "watercolor", "photograph", "cartoon", "oil painting", "abstract art"]
MINI_PROMPT_COUNT = 200


def mini_prompts(n: int = MINI_PROMPT_COUNT, seed: int = 0) -> list[str]:
    """A small, deterministic corpus of Midjourney-like prompts built from the word lists above.

    Example: "a tiny dragon softly glowing wearing sunglasses in the desert, watercolor".
    """
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        adjective = rng.choice(ADJECTIVES)
        words = ["an" if adjective[0] in "aeiou" else "a", adjective, rng.choice(SUBJECTS)]
        if rng.random() < 0.5:
            words += [rng.choice(ADVERBS), rng.choice(PARTICIPLES)]
        if rng.random() < 0.5:
            words.append(rng.choice(ACCESSORIES))
        words.append(rng.choice(SETTINGS))
        prompts.append(" ".join(words) + ", " + rng.choice(STYLES))
    return prompts


def mini_vocabulary() -> list[str]:
    """Candidate attribute words for the CLIP zero-shot describer in the mini profile."""
    return (
        SUBJECTS
        + ADJECTIVES
        + STYLES
        + ["sunglasses", "hat", "umbrella", "scarf", "desert", "sea", "forest", "mountain", "city"]
    )


def train_clip_tokenizer(texts: list[str], vocab_size: int = 512) -> CLIPTokenizer:
    """Train a byte-level BPE on `texts` and wrap it as a `CLIPTokenizer` (max length 77)."""
    bpe = Tokenizer(BPE(unk_token=EOS, end_of_word_suffix="</w>", continuing_subword_prefix=""))
    bpe.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    # The merges are only reachable through the model's JSON form.
    merges = json.loads(bpe.to_str())["model"]["merges"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges]
    # The trainer numbers single symbols in hash-set order, which changes between runs;
    # renumber them sorted so the same corpus always gives the same token ids.
    merged = ["".join(pair) for pair in merges]
    singles = sorted(set(bpe.get_vocab()) - {BOS, EOS} - set(merged))
    vocab = {token: i for i, token in enumerate([BOS, EOS, *singles, *merged])}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def text_config(
    tokenizer: CLIPTokenizer,
    layers: int,
    heads: int,
    *,
    width: int = 32,
    projection_dim: int | None = None,
) -> CLIPTextConfig:
    """A CLIP text tower `width` wide and `layers` deep over `tokenizer`'s vocabulary and special
    tokens; the projection defaults to `width`."""
    return clip_text_config(
        len(tokenizer),
        width,
        layers,
        heads,
        projection_dim=projection_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _vae(
    channels: tuple[int, ...],
    image_size: int,
    latent_channels: int = 4,
    layers: int = 1,
    **overrides: Any,
) -> AutoencoderKL:
    """An `AutoencoderKL` with one block per entry of `channels` (each after the first halves the
    side) for `image_size`-pixel images; SD 1.x's latent scale unless overridden."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=layers,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=image_size,
        **overrides,
    )


def _latent_side(image_size: int, vae_channels: tuple[int, ...]) -> int:
    return image_size // 2 ** (len(vae_channels) - 1)


SD_BETAS = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    set_alpha_to_one=False,
)
"""SD 1.x's noise schedule, as its scheduler configs store it."""


@dataclass(frozen=True)
class SDShape:
    """The sizes of a Stable Diffusion 1.x miniature; the defaults are the mini profile's."""

    text_layers: int = 3
    """Blocks of the 32-wide CLIP text encoder."""
    text_heads: int = 4
    """Attention heads of the text encoder."""
    image_size: int = 32
    """Side of the generated images in pixels."""
    unet_channels: tuple[int, ...] = (16, 32)
    """Channels per UNet block; every block but the deepest cross-attends to the text."""
    unet_layers: int = 1
    """ResNet layers per UNet block."""
    unet_heads: int = 4
    """The UNet's ``attention_head_dim``, which diffusers reads as SD 1.x's number of heads."""
    vae_channels: tuple[int, ...] = (8, 16)
    """Channels per VAE block; each block after the first halves the side."""
    vae_layers: int = 1
    """ResNet layers per VAE block."""


def _build_sd(
    path: Path, seed: int, shape: SDShape, scheduler: Any, feature_extractor: Any = None
) -> None:
    """Save a `StableDiffusionPipeline` of `shape` (no safety checker) to `path`."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer = train_clip_tokenizer(mini_prompts())
    text_encoder = CLIPTextModel(text_config(tokenizer, shape.text_layers, shape.text_heads))
    n = len(shape.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=_latent_side(shape.image_size, shape.vae_channels),
        in_channels=4,
        out_channels=4,
        block_out_channels=shape.unet_channels,
        layers_per_block=shape.unet_layers,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=32,
        attention_head_dim=shape.unet_heads,
        norm_num_groups=8,
    )
    vae = _vae(shape.vae_channels, shape.image_size, layers=shape.vae_layers)
    StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=feature_extractor,
        requires_safety_checker=False,
    ).save_pretrained(path)


def build_mini_sd(path: str | Path, seed: int = 0) -> Path:
    """Save a tiny `StableDiffusionPipeline` (32x32 images, 32-wide text encoder) to `path`.

    Reload it with `saekit.analysis.steering.load_pipeline(path)` or
    `StableDiffusionPipeline.from_pretrained(path)`. No safety checker.
    """
    from diffusers import DDIMScheduler

    path = Path(path)
    _build_sd(path, seed, SDShape(), DDIMScheduler(clip_sample=False, **SD_BETAS))
    return path


def build_mini_clip(path: str | Path, seed: int = 0) -> Path:
    """Save a tiny `CLIPModel` + `CLIPProcessor` (32x32 images) to `path` for validation."""
    path = Path(path)
    torch.manual_seed(seed)
    tokenizer = train_clip_tokenizer(mini_prompts() + mini_vocabulary())
    model = tiny_clip(
        text_config(tokenizer, 3, 4, projection_dim=16),
        clip_vision_config(32, 2, 4, image_size=32, patch_size=8, projection_dim=16),
        projection_dim=16,
        seed=seed,
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    model.save_pretrained(path)
    return path


def _t5_tokenizer(texts: list[str]):
    """A T5 (Unigram) tokenizer whose pieces are the corpus's words plus single characters.

    Scores are log word frequencies, so known words stay whole and anything else falls back
    to characters; no SentencePiece model is needed.
    """
    from collections import Counter

    from transformers import T5Tokenizer

    words = Counter(w for text in texts for w in text.lower().replace(",", " ,").split())
    chars = sorted({c for text in texts for c in text.lower() if not c.isspace()})
    total = sum(words.values())
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{w}", math.log(n / total)) for w, n in sorted(words.items())]
    pieces += [(c, -20.0) for c in chars] + [(f"▁{c}", -21.0) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


@dataclass(frozen=True)
class SD3Shape:
    """The sizes of a Stable Diffusion 3 miniature; the defaults are the mini profile's."""

    clip_layers: tuple[int, int] = (3, 3)
    """Blocks of the two 32-wide CLIP text encoders (CLIP-L's and CLIP-bigG's places)."""
    clip_heads: int = 4
    """Attention heads of the CLIP text encoders."""
    t5_layers: int = 1
    """Blocks of the 64-wide T5 text encoder (at least the two CLIPs side by side, as SD 3
    pads them to T5's width)."""
    t5_ff: int = 64
    """T5's feed-forward width."""
    t5_activation: str = "relu"
    """T5's ``feed_forward_proj`` (T5 v1.1 uses "gated-gelu")."""
    image_size: int = 32
    """Side of the generated images in pixels."""
    latent_channels: int = 4
    """Latent channels of the VAE, which the MMDiT denoises."""
    mmdit_layers: int = 1
    """Joint-attention blocks of the MMDiT."""
    head_dim: int = 8
    """Width of an MMDiT attention head."""
    heads: int = 2
    """MMDiT attention heads."""
    pos_embed_max_size: int = 16
    """Side of the MMDiT's position-embedding grid (cropped to the latent's patch grid)."""
    qk_norm: str | None = None
    """Normalisation of the MMDiT's queries and keys."""
    vae_channels: tuple[int, ...] = (8, 16)
    """Channels per VAE block; each block after the first halves the side."""
    vae_layers: int = 1
    """ResNet layers per VAE block."""
    vae_scale: float = 1.5035
    """The VAE's latent ``scaling_factor``."""
    flow_shift: float = 1.0
    """Timestep shift of the flow-matching scheduler."""


def _build_sd3(path: Path, seed: int, shape: SD3Shape) -> None:
    """Save a `StableDiffusion3Pipeline` of `shape` (two CLIP text encoders + T5) to `path`."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    corpus = mini_prompts()
    tokenizer = train_clip_tokenizer(corpus)
    tokenizer_3 = _t5_tokenizer(corpus)
    text_encoder, text_encoder_2 = (
        CLIPTextModelWithProjection(text_config(tokenizer, layers, shape.clip_heads))
        for layers in shape.clip_layers
    )
    text_encoder_3 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_3),
            d_model=64,
            d_kv=8,
            d_ff=shape.t5_ff,
            num_layers=shape.t5_layers,
            num_heads=4,
            feed_forward_proj=shape.t5_activation,
            pad_token_id=tokenizer_3.pad_token_id,
            eos_token_id=tokenizer_3.eos_token_id,
            decoder_start_token_id=tokenizer_3.pad_token_id,
        )
    )
    transformer = SD3Transformer2DModel(
        sample_size=_latent_side(shape.image_size, shape.vae_channels),
        patch_size=2,
        in_channels=shape.latent_channels,
        out_channels=shape.latent_channels,
        num_layers=shape.mmdit_layers,
        attention_head_dim=shape.head_dim,
        num_attention_heads=shape.heads,
        joint_attention_dim=64,
        caption_projection_dim=16,
        pooled_projection_dim=2 * 32,
        pos_embed_max_size=shape.pos_embed_max_size,
        qk_norm=shape.qk_norm,
    )
    # SD 3's VAE: a latent shift and scale, and no quantisation convolutions.
    vae = _vae(
        shape.vae_channels,
        shape.image_size,
        shape.latent_channels,
        shape.vae_layers,
        scaling_factor=shape.vae_scale,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shape.flow_shift),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    ).save_pretrained(path)


def build_mini_sd3(path: str | Path, seed: int = 0) -> Path:
    """Save a tiny `StableDiffusion3Pipeline` (two CLIP text encoders + T5, 32x32 images).

    Paper 003 Appendix B steers SD 3.5 through the joint output of its three text encoders.
    """
    path = Path(path)
    _build_sd3(path, seed, SD3Shape())
    return path


# --------------------------------------------------------------------------- hub-shaped

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
"""CLIP's pixel statistics, as the hub's CLIP processors store them."""

HUB_SD14 = SDShape(
    text_layers=12,
    text_heads=2,
    image_size=512,
    unet_channels=(16, 16, 32, 32),
    unet_layers=2,
    # One head keeps the 4096-token self-attention of the 64x64 latent affordable on a CPU.
    unet_heads=1,
    vae_channels=(8, 8, 16, 16),
    vae_layers=2,
)
"""CompVis/stable-diffusion-v1-4's depths at toy width."""

HUB_SD35 = SD3Shape(
    clip_layers=(12, 32),
    clip_heads=2,
    t5_layers=24,
    t5_ff=128,
    t5_activation="gated-gelu",
    image_size=1024,
    latent_channels=16,
    mmdit_layers=38,
    head_dim=16,
    heads=1,
    pos_embed_max_size=192,
    qk_norm="rms_norm",
    vae_channels=(8, 8, 16, 16),
    vae_layers=2,
    vae_scale=1.5305,
    flow_shift=3.0,
)
"""stabilityai/stable-diffusion-3.5-large's depths at toy width."""


def build_hub_sd14(path: Path, seed: int = 0) -> None:
    """Hub-shaped CompVis/stable-diffusion-v1-4: SD 1.x's UNet (four blocks, three with cross-attention,
    64-latent / 512-pixel images), a four-block VAE (8x down), CLIP ViT-L/14's 12-layer text
    encoder, the PNDM scheduler; no safety checker (the steering code loads none)."""
    from diffusers import PNDMScheduler

    feature_extractor = CLIPImageProcessorPil(
        crop_size={"height": 224, "width": 224}, image_mean=CLIP_MEAN, image_std=CLIP_STD
    )
    scheduler = PNDMScheduler(skip_prk_steps=True, **SD_BETAS)
    _build_sd(path, seed, HUB_SD14, scheduler, feature_extractor)


def build_hub_sd35(path: Path, seed: int = 0) -> None:
    """Hub-shaped stabilityai/stable-diffusion-3.5-large: the 38-block MMDiT (patch 2, 128-latent /
    1024-pixel images, RMS q/k norm), a 16-channel VAE, CLIP-L (12 layers), CLIP-bigG (32) and
    T5 v1.1 XXL (24) text encoders, flow-matching Euler scheduler."""
    _build_sd3(path, seed, HUB_SD35)


def mini_models(folder: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """The mini profile's Stable Diffusion pipeline and CLIP under `folder`, built on first use.

    Returns (pipeline folder, CLIP folder). Each is built in a scratch folder and renamed into
    place when complete, so an interrupted build is redone rather than half-loaded.
    """
    folder = Path(folder)
    paths = []
    for name, build in (("mini-sd", build_mini_sd), ("mini-clip", build_mini_clip)):
        target = folder / name
        if not target.is_dir():
            scratch = folder / f".{name}.partial"
            shutil.rmtree(scratch, ignore_errors=True)
            build(scratch, seed=seed)
            scratch.rename(target)
        paths.append(target)
    return paths[0], paths[1]


def mini_prompt_file() -> Path:
    """The mini profile's generated prompt corpus shipped with the package."""
    return Path(__file__).parent / "assets" / "prompts_mini.txt"
