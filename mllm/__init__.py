"""The unified UniTok MLLM: a Llama decoder reading and writing images as UniTok multi-codebook codes."""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration import IGNORE_INDEX, IMAGE_TOKEN_INDEX, PRESETS, UniTokMLLMConfig
from .conversation import TEMPLATES, ChatTemplate, get_template
from .modeling import UniTokMLLM, UniTokMLLMOutput
from .processing import Encoded, MLLMProcessor, SampleTooLong

AutoConfig.register(UniTokMLLMConfig.model_type, UniTokMLLMConfig, exist_ok=True)
AutoModel.register(UniTokMLLMConfig, UniTokMLLM, exist_ok=True)
AutoModelForCausalLM.register(UniTokMLLMConfig, UniTokMLLM, exist_ok=True)

__all__ = ["UniTokMLLM", "UniTokMLLMConfig", "UniTokMLLMOutput", "MLLMProcessor", "Encoded", "SampleTooLong",
           "ChatTemplate", "TEMPLATES", "get_template", "PRESETS", "IGNORE_INDEX", "IMAGE_TOKEN_INDEX"]
