"""MLLM training: recipes (config), the accelerate/DeepSpeed train loop, LoRA and its merge."""
