"""prefloop: a self-hosted chat app with an online preference loop."""

import os

__version__ = "0.1.0"

# Nothing leaves the machine unasked: Gradio's analytics and version check, the Hugging Face
# hub's telemetry and vLLM's usage stats are off unless the operator sets these otherwise.
# Set here, before any of those libraries is imported (huggingface_hub reads its variable at
# import), and inherited by every subprocess (vLLM, the trainer).
NO_TELEMETRY = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1",
                "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
for _name, _value in NO_TELEMETRY.items():
    os.environ.setdefault(_name, _value)
