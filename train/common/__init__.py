"""Small, model-agnostic training pieces shared by the tokenizer and MLLM trainers.

* :mod:`.config`     YAML -> typed dataclasses with validation and ``a.b=value`` overrides
* :mod:`.checkpoint` atomic, resumable checkpoints (temp dir + rename, keep-last-N, RNG capture)
* :mod:`.schedule`   warmup + cosine learning-rate factor
* :mod:`.optim`      AdamW parameter groups without weight decay for norms/biases/scalars
* :mod:`.tracking`   TensorBoard + JSONL metrics, tqdm progress with throughput
* :mod:`.images`     PNG image grids written with PIL/numpy
* :mod:`.contrastive` CLIP loss (open_clip ``ClipLoss`` semantics) with a gather that keeps gradients
* :mod:`.datasources` image-text / JSONL / parquet / webdataset / folder readers, bad-record counting
"""
