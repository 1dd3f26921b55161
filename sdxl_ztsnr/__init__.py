"""SDXL fine-tuning with v-prediction and zero terminal SNR (NovelAI Diffusion V3 recipe)."""

__version__ = "0.1.0"

from sdxl_ztsnr.optional_packages import defer_bitsandbytes  # noqa: E402

# Before anything imports diffusers or peft: they would import bitsandbytes (and its Hub lookup) on every run.
defer_bitsandbytes()
