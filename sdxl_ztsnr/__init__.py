"""SDXL fine-tuning with v-prediction and zero terminal SNR (NovelAI Diffusion V3 recipe)."""

__version__ = "0.1.0"
