"""lmms-eval model plugin: ``lmms-eval --model unitok_mllm --model_args pretrained=DIR,tokenizer=PATH --tasks pope``.

Registered through lmms-eval's ``lmms_eval.models`` entry point (setup.py points it at :func:`manifest`), so an
installed unitok-mllm is found without patching lmms-eval. lmms-eval's own dependency set pins torchvision, which
must not enter a CPU environment of ours (its only wheel is a CUDA build that breaks transformers and peft): install
it without its dependencies, plus what its evaluator imports (``.ci/lmms-eval-deps`` lists them).

The adapter is a "simple" lmms-eval model: ``generate_until`` puts the request's images (``doc_to_visual``) before
its text as ``<image>\\n`` placeholders when the text has none, applies the model's chat template, and decodes in
left-padded batches of equal generation settings (greedy unless the task samples), cutting each answer at the
task's ``until`` strings; answers come back in request order. ``loglikelihood`` returns the continuation's summed
log-probability and whether greedy decoding would produce it. lmms-eval's task metrics are not the LLaVA protocol's
(``eval_spec.md`` §11): report which protocol a number used; ``unitok eval vqa`` gives the LLaVA-protocol figures.
"""
from __future__ import annotations

import json

import torch
from lmms_eval.api.model import lmms

MODEL_ID = "unitok_mllm"


def manifest():
    """The entry point's payload (lmms-eval >= 0.6)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.UniTokLMMS")


class UniTokLMMS(lmms):
    def __init__(self, pretrained: str, tokenizer: str, batch_size: int | str = 1, device: str | None = None,
                 dtype: str | None = None, max_new_tokens: int = 128, **kwargs) -> None:
        super().__init__()
        from mllm.cli import load_mllm, load_unitok

        self.model, self.processor = load_mllm(pretrained, device, dtype)
        self.unitok = load_unitok(tokenizer, self.model, self.model.device)
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        dist = torch.distributed
        self._rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self._world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    # ------------------------------------------------------------------ pieces
    def _prompt(self, context: str, n_images: int) -> list[int]:
        from mllm.conversation import IMAGE_PLACEHOLDER

        if IMAGE_PLACEHOLDER not in context:
            context = f"{IMAGE_PLACEHOLDER}\n" * n_images + context
        return self.processor.chat_prompt([{"role": "user", "content": context}])

    def _codes(self, images: list) -> torch.Tensor | None:
        from tokenizer.image import preprocess_padded

        if not images:
            return None
        pixels = torch.stack([preprocess_padded(im.convert("RGB"), self.unitok.config.image_size) for im in images])
        with torch.inference_mode():
            return self.unitok.encode(pixels.to(self.model.device))

    def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        return [v for v in (visuals or []) if v is not None]

    # ------------------------------------------------------------------ lmms-eval API
    def generate_until(self, requests) -> list[str]:
        from mllm.generation import TextSampling, generate_replies

        answers: list[str | None] = [None] * len(requests)
        by_settings: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            by_settings.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        proc = self.processor
        for members in by_settings.values():
            settings = dict(requests[members[0]].args[1])
            until = settings.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            sampled = settings.get("do_sample", False) and settings.get("temperature", 0) > 0
            sampling = TextSampling(max_new_tokens=int(settings.get("max_new_tokens", self.max_new_tokens)),
                                    temperature=float(settings.get("temperature", 0)) if sampled else 0.0,
                                    top_p=float(settings.get("top_p") or 1.0) if sampled else 1.0)
            for start in range(0, len(members), self.batch_size_per_gpu):
                batch = members[start:start + self.batch_size_per_gpu]
                rows, images = [], []
                for i in batch:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    visuals = self._visuals(doc_to_visual, doc_id, task, split)
                    rows.append(self._prompt(context, len(visuals)))
                    images += visuals
                for i, text in zip(batch, generate_replies(self.model, proc, rows, self._codes(images), sampling)):
                    for stop in until:
                        if stop:
                            text = text.split(stop)[0]
                    answers[i] = text
        return answers

    @torch.no_grad()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        out = []
        for request in requests:
            context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            continuation = doc_to_target(doc) if callable(doc_to_target) else doc_to_target
            visuals = self._visuals(doc_to_visual, doc_id, task, split)
            prompt = self._prompt(context, len(visuals))
            target = self.processor.tokenizer(str(continuation), add_special_tokens=False).input_ids
            ids = torch.tensor([prompt + target], device=self.model.device)
            logits = self.model(input_ids=ids, image_codes=self._codes(visuals)).logits[0, len(prompt) - 1:-1]
            logprobs = logits.float().log_softmax(-1)
            wanted = torch.tensor(target, device=logits.device)
            out.append((float(logprobs.gather(-1, wanted[:, None]).sum()),
                        bool((logprobs.argmax(-1) == wanted).all())))
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("multi-round generation is not supported by the unitok_mllm adapter")
