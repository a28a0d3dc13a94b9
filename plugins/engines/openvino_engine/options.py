"""``plugin_config.openvino``: the OpenVINO engine's options."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from chatstream.recording_engine import RecordingOptions
from chatstream.runtime_sampling import RuntimeSamplingOptions

DEVICES = ("CPU", "GPU", "NPU", "AUTO")


def openvino_device(device: str) -> str:
    """``device`` as OpenVINO names it (upper case); ``ValueError`` when it is not an OpenVINO device."""
    if not isinstance(device, str) or device.split(":", 1)[0].split(".", 1)[0].upper() not in DEVICES:
        raise ValueError(
            f"device={device!r} is not an OpenVINO device: use one of {', '.join(DEVICES)} "
            "(e.g. CHATSTREAM_PLUGIN_CONFIG__OPENVINO__DEVICE=CPU)"
        )
    return device.upper()


class OpenVINOOptions(RuntimeSamplingOptions, RecordingOptions):
    """The device and compile options, the KV cache and prefix caching, the sampling ``pipeline``
    and the recording options."""

    device: str | None = Field(
        None,
        description="CPU, GPU, NPU or AUTO (a device index such as GPU.1 too); unset: the device "
        "setting, else CPU",
    )
    inference_precision: Literal["f32", "bf16", "f16", "default"] = Field(
        "f32",
        description="compute precision; 'default' keeps the device's own choice (bf16 on recent CPUs, "
        "which was slower than f32 with quantized weights, see bench/RESULTS.md)",
    )
    kv_cache_gb: float = Field(
        1.0,
        gt=0,
        le=1024,
        description="KV cache size in GB (whole GB, at least 1); with prefix_cache it also bounds "
        "what is kept of finished turns",
    )
    prefix_cache: bool = Field(
        True,
        description="GenAI's prefix caching: KV blocks of finished turns stay in the KV cache, and a "
        "prompt that starts with their tokens prefills only the rest",
    )
    num_threads: int | None = Field(None, ge=1, description="inference threads; unset: OpenVINO's choice")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str | None) -> str | None:
        return None if value is None else openvino_device(value)

    def properties(self) -> dict[str, Any]:
        """OpenVINO compile properties for these options."""
        props: dict[str, Any] = {}
        if self.inference_precision != "default":
            props["INFERENCE_PRECISION_HINT"] = self.inference_precision
        if self.num_threads is not None:
            props["INFERENCE_NUM_THREADS"] = self.num_threads
        return props
