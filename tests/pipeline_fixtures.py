"""Tiny random-weight text-to-image pipeline folders (SD 1.x/2.x, SDXL, SD3) built from configs, never downloaded.

Each is what `save_pretrained` writes for the real thing: model_index.json, unet/ or transformer/, vae/,
text_encoder*/ + tokenizer*/ (a CLIP BPE vocabulary of single characters, written here) and scheduler/.
8×8 latents of 4 channels (a 16×16 image: the VAE has two blocks, one 2× downsampling).
"""

from __future__ import annotations

import json
import os

import torch

LATENT = 8
SEQ = 77


def write_clip_vocab(d: str) -> tuple[str, str, dict]:
    """A CLIP BPE vocabulary with no merges: every word is its characters, the last one with </w>."""
    os.makedirs(d, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab: dict[str, int] = {}
    for c in "!\"#$%&'()*+,-./0123456789:;<=>?@[\\]^_`{|}~" + letters:
        vocab.setdefault(c, len(vocab))
    for c in letters + "0123456789.,!?":
        vocab.setdefault(c + "</w>", len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with open(os.path.join(d, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(d, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"), vocab


def _tokenizer(tmp: str):
    import transformers

    vocab_file, merges, vocab = write_clip_vocab(os.path.join(tmp, "_vocab"))
    return transformers.CLIPTokenizer(vocab_file, merges, model_max_length=SEQ), vocab


def _clip(vocab: dict, hidden: int, projection: bool, seed: int):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=SEQ,
                                      projection_dim=hidden, bos_token_id=vocab["<|startoftext|>"],
                                      eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(cfg).eval()


def _vae(seed: int, **kw):
    import diffusers

    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                                   down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                                   sample_size=2 * LATENT, **kw).eval()


def _unet(seed: int, cross: int, **kw):
    import diffusers

    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(
        sample_size=LATENT, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=4, cross_attention_dim=cross, attention_head_dim=2, **kw).eval()


def sd_scheduler(prediction: str = "epsilon"):
    import diffusers

    # Stable Diffusion's training table (scaled_linear 0.00085 → 0.012) and its DDIM config
    return diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   prediction_type=prediction, clip_sample=False, set_alpha_to_one=False,
                                   steps_offset=1)


def build_sd(path: str, prediction: str = "epsilon") -> str:
    import diffusers

    tok, vocab = _tokenizer(path)
    pipe = diffusers.StableDiffusionPipeline(
        vae=_vae(1), text_encoder=_clip(vocab, 16, False, 2), tokenizer=tok, unet=_unet(3, 16),
        scheduler=sd_scheduler(prediction), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


def build_sdxl(path: str) -> str:
    import diffusers

    tok, vocab = _tokenizer(path)
    # text_embeds (the second encoder's 16-d projection) + 6 time ids × 4-d embeddings = 40
    unet = _unet(4, 32, addition_embed_type="text_time", addition_time_embed_dim=4,
                 projection_class_embeddings_input_dim=16 + 6 * 4)
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=_vae(5), text_encoder=_clip(vocab, 16, False, 6), text_encoder_2=_clip(vocab, 16, True, 7),
        tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=sd_scheduler())
    pipe.save_pretrained(path)
    return path


def build_sd3(path: str) -> str:
    import diffusers

    tok, vocab = _tokenizer(path)
    torch.manual_seed(8)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=LATENT, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
        pos_embed_max_size=LATENT).eval()
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(9, shift_factor=0.0609, scaling_factor=1.5305), text_encoder=_clip(vocab, 16, True, 10),
        tokenizer=tok, text_encoder_2=_clip(vocab, 16, True, 11), tokenizer_2=tok, text_encoder_3=None,
        tokenizer_3=None)
    pipe.save_pretrained(path)
    return path
