"""SDXL base 1.0's UNet architecture without a download: for benchmarks and memory estimates at full size."""

from __future__ import annotations

from typing import Any

import torch

# unet/config.json of stabilityai/stable-diffusion-xl-base-1.0: 2,567,463,684 parameters.
SDXL_UNET: dict[str, Any] = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    # Heads per block (diffusers' historical name for it), 64 channels each.
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,  # CLIP ViT-L (768) + OpenCLIP bigG (1280) hidden states
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # pooled bigG (1280) + 6 size numbers × 256
    norm_num_groups=32,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
)
SDXL_UNET_PARAMETERS = 2_567_463_684
PROMPT_CHUNK = 77  # tokens per CLIP prompt chunk


def pooled_dim(config: dict[str, Any]) -> int:
    """Width of the pooled text embedding a UNet config expects (SDXL: 1280)."""
    return config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]


def build_unet(config: dict[str, Any], device: torch.device | str = "cpu", seed: int = 0):
    """A random-weight ``UNet2DConditionModel`` of ``config`` built directly on ``device``, in train mode."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**config)
    return unet.train()


def unet_inputs(
    config: dict[str, Any], batch_size: int, resolution: int, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Random inputs of one training batch at resolution² for a UNet of ``config`` (one prompt chunk)."""
    side = resolution // 8  # the VAE downsamples 8x
    size = float(resolution)
    return {
        "latents": torch.randn(batch_size, 4, side, side, device=device),
        "timesteps": torch.randint(0, 1000, (batch_size,), device=device),
        "prompt_embeds": torch.randn(batch_size, PROMPT_CHUNK, config["cross_attention_dim"], device=device),
        "pooled_prompt_embeds": torch.randn(batch_size, pooled_dim(config), device=device),
        # (original H, W, crop top, left, target H, W), height first as SDXL was trained
        "time_ids": torch.tensor([[size, size, 0.0, 0.0, size, size]] * batch_size, device=device),
    }


# text_encoder/config.json and text_encoder_2/config.json of stabilityai/stable-diffusion-xl-base-1.0: CLIP ViT-L/14
# (123,060,480 parameters) and OpenCLIP ViT-bigG/14 with its projection (694,659,840).
SDXL_TEXT_ENCODER: dict[str, Any] = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)
SDXL_TEXT_ENCODER_2: dict[str, Any] = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=1280,
)


def build_text_encoders(
    configs: tuple[dict[str, Any], dict[str, Any]], device: torch.device | str = "cpu", seed: int = 0
) -> list[torch.nn.Module]:
    """SDXL's two random-weight text encoders (CLIPTextModel, CLIPTextModelWithProjection) built on ``device``."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    with torch.device(device):
        return [
            CLIPTextModel(CLIPTextConfig(**configs[0])),
            CLIPTextModelWithProjection(CLIPTextConfig(**configs[1])),
        ]
