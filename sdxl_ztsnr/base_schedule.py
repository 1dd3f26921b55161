"""What an SDXL base predicts and on which schedule, read from a single file's marker tensors and metadata.

Marker tensors: the empty `v_pred` / `ztsnr` that ComfyUI, A1111 and Forge read (ComfyUI's SDXL model_type
check; NoobAI-XL v-pred and our export ship both). Metadata: Stability's ModelSpec `modelspec.prediction_type`
("v" / "epsilon"; our export and kohya sd-scripts), ComfyUI's `modelspec.predict_key`, a plain
`prediction_type`, and kohya's training flags `ss_v_parameterization` / `ss_zero_terminal_snr` ("True").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from sdxl_ztsnr.export import V_PRED_KEY, ZTSNR_KEY


@dataclass(frozen=True)
class BaseSchedule:
    """What a base was trained to predict, on which schedule, and which marker or metadata key said so."""

    prediction_type: Literal["epsilon", "v_prediction"]
    zero_terminal_snr: bool
    source: str

    @property
    def label(self) -> str:
        """'ε', 'v-pred' or 'v-pred ZTSNR', for log lines."""
        if self.prediction_type == "epsilon":
            return "ε"
        return "v-pred ZTSNR" if self.zero_terminal_snr else "v-pred"


# Metadata keys naming the prediction type, in the order they are trusted: Stability's ModelSpec (our export,
# kohya), ComfyUI's checkpoint save, plain, and kohya's training flag.
_PREDICTION_METADATA = (
    "modelspec.prediction_type",
    "modelspec.predict_key",
    "prediction_type",
    "ss_v_parameterization",
)
_V_VALUES = {"v", "v_prediction", "v-prediction", "vpred", "v_pred", "true", "1"}
_EPSILON_VALUES = {"epsilon", "eps", "ε", "false", "0"}


def _metadata_prediction(metadata: Mapping[str, str]) -> tuple[str, str] | None:
    """(prediction_type, 'key=value') from the first metadata key whose value is understood, else None."""
    for key in _PREDICTION_METADATA:
        value = str(metadata.get(key, "")).strip().lower()
        if value in _V_VALUES:
            return "v_prediction", f"{key}={metadata[key]}"
        if value in _EPSILON_VALUES:
            return "epsilon", f"{key}={metadata[key]}"
    return None


def read_base_schedule(keys: Sequence[str] | set[str], metadata: Mapping[str, str] | None) -> BaseSchedule:
    """The base's prediction type and schedule from its marker tensors, else its metadata, else SDXL's ε.

    The empty `v_pred` / `ztsnr` tensors are what ComfyUI, A1111 and Forge read, so they win over metadata.
    ZTSNR also comes from kohya's `ss_zero_terminal_snr`; it is ignored on an ε base, as ComfyUI does.
    """
    keys, metadata = set(keys), dict(metadata or {})
    from_metadata = _metadata_prediction(metadata)
    if V_PRED_KEY in keys:
        prediction, source = "v_prediction", f"marker tensor {V_PRED_KEY}"
        if from_metadata and from_metadata[0] != prediction:
            source += f" (over metadata {from_metadata[1]})"
    elif from_metadata:
        prediction, source = from_metadata[0], f"metadata {from_metadata[1]}"
    else:
        prediction, source = "epsilon", "no prediction-type marker or metadata: SDXL's default"
    ztsnr = prediction == "v_prediction" and ZTSNR_KEY in keys
    if ztsnr:
        source += f", marker tensor {ZTSNR_KEY}"
    elif prediction == "v_prediction" and str(metadata.get("ss_zero_terminal_snr", "")).lower() in (
        "true",
        "1",
    ):
        ztsnr, source = True, source + ", metadata ss_zero_terminal_snr=True"
    elif ZTSNR_KEY in keys:
        source += f" ({ZTSNR_KEY} marker ignored without v-prediction)"
    return BaseSchedule(prediction, ztsnr, source)


def scheduler_config_for(scheduler_config: Mapping, schedule: BaseSchedule) -> dict:
    """A copy of a scheduler config set to the base's prediction type and schedule (trailing spacing for ZTSNR,
    Lin et al. 2023 §3.3; SDXL's own "leading" when a ZTSNR config is turned back to SDXL's schedule)."""
    config = dict(scheduler_config)
    config["prediction_type"] = schedule.prediction_type
    if schedule.zero_terminal_snr:
        config["timestep_spacing"] = "trailing"
    elif config.get("rescale_betas_zero_snr", False):
        config["timestep_spacing"] = "leading"
    config["rescale_betas_zero_snr"] = schedule.zero_terminal_snr
    return config
