"""GenEval's detector and colour model, through transformers: "GenEval (transformers detector)".

Official GenEval runs mmdet 2.x Mask2Former Swin-S (OpenMMLab's COCO checkpoint) and open_clip ViT-L-14 ``openai``
(``notes/wave2_anchors.md`` §A). Neither runs here (mmcv-full, CUDA-only, torch 1.12), so this is a port:

* detector: ``Mask2FormerForUniversalSegmentation`` from a local folder, e.g. ``facebook/mask2former-swin-small-coco-
  instance`` (the same architecture; weights converted from Detectron2's training, **not** OpenMMLab's, so figures
  are close to official GenEval, not equal). Its image processor prepares the input. The outputs are post-processed
  as mmdet's ``MaskFormerFusionHead.instance_postprocess`` does, at the original image size: top-``max_per_image``
  (100) (query, class) pairs by class probability (softmax without the no-object class), mask = logits > 0 after
  bilinear upsampling to the padded input, cropping the padding and resizing to the image; score = class
  probability x mean sigmoid over the mask; box = the mask's extent (``mask2bbox``: exclusive end).
* colours: ``CLIPModel`` from a local folder (``openai/clip-vit-large-patch14``, the weights open_clip calls
  ``ViT-L-14/openai``), zero-shot over GenEval's 10 colours with its three templates (class embedding = normalised
  mean of the normalised template embeddings), on the object's mask composited over ``#999`` grey and cropped to
  its box, logits = 100 x cosine (GenEval computes them under fp16 autocast; here in the model's dtype).

The rules (thresholds 0.3 / 0.9, 16 per class, position margin) are ``eval/geneval.py``'s, shared with the shapes
world's detector.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from metrics.geneval import COLORS

__all__ = ["Candidate", "Mask2FormerDetector", "instance_postprocess", "mask_boxes", "masked_crop", "COLOR_TEMPLATES"]

COLOR_TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")
BACKGROUND = "#999"


@dataclass
class Candidate:
    bbox: tuple[float, float, float, float]  # (x1, y1, x2, y2), exclusive end, pixels of the image
    score: float
    mask: np.ndarray  # bool [H, W]


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """mmdet's ``mask2bbox``: ``[N, H, W]`` bool -> ``[N, 4]`` ``(x1, y1, x2 + 1, y2 + 1)``; zeros for an empty mask."""
    boxes = torch.zeros(masks.shape[0], 4)
    x_any, y_any = masks.any(dim=1), masks.any(dim=2)
    for i in range(masks.shape[0]):
        x, y = torch.where(x_any[i])[0], torch.where(y_any[i])[0]
        if len(x) and len(y):
            boxes[i] = torch.tensor([x[0], y[0], x[-1] + 1, y[-1] + 1], dtype=torch.float32)
    return boxes


def instance_postprocess(class_logits: torch.Tensor, mask_logits: torch.Tensor, max_per_image: int = 100
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mmdet 2.x ``MaskFormerFusionHead.instance_postprocess`` for one image: ``class_logits`` ``[Q, C + 1]``,
    ``mask_logits`` ``[Q, H, W]`` at the image's size. Returns (labels ``[k]``, scores ``[k]``, bool masks
    ``[k, H, W]``), k = min(max_per_image, Q * C)."""
    num_queries, num_classes = class_logits.shape[0], class_logits.shape[1] - 1
    scores = F.softmax(class_logits, dim=-1)[:, :-1]
    labels = torch.arange(num_classes).unsqueeze(0).repeat(num_queries, 1).flatten(0, 1)
    top_scores, top = scores.flatten(0, 1).topk(min(max_per_image, num_queries * num_classes), sorted=False)
    mask_pred = mask_logits[top // num_classes]
    binary = (mask_pred > 0).float()
    mask_scores = (mask_pred.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    return labels[top], top_scores * mask_scores, binary.bool()


def masked_crop(image: Image.Image, mask: np.ndarray, box: Sequence[float], background: str = BACKGROUND
                ) -> Image.Image:
    """GenEval's ``ImageCrops`` item: the object's pixels over a grey background, cropped to its box."""
    blank = Image.new("RGB", image.size, color=background)
    return Image.composite(image, blank, Image.fromarray(mask)).crop(tuple(box[:4]))


class Mask2FormerDetector:
    """:class:`metrics.geneval.Detector`: transformers Mask2Former boxes and masks, CLIP colours."""

    name = "transformers detector"
    calibrated = True

    def __init__(self, detector_path: str | Path, clip_path: str | Path, class_names: str | Path | None = None,
                 device: str | None = None, max_per_image: int = 100):
        from transformers import (AutoImageProcessor, AutoTokenizer, CLIPModel,
                                  Mask2FormerForUniversalSegmentation)

        for what, path in (("detector", detector_path), ("CLIP", clip_path)):
            if not Path(path).is_dir():
                raise FileNotFoundError(f"no {what} folder at {path} (a local transformers checkpoint; see README)")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = Mask2FormerForUniversalSegmentation.from_pretrained(detector_path).to(self.device).eval()
        self.processor = AutoImageProcessor.from_pretrained(detector_path)
        self.clip = CLIPModel.from_pretrained(clip_path).to(self.device).eval()
        self.clip_tokenizer = AutoTokenizer.from_pretrained(clip_path)
        self.clip_processor = AutoImageProcessor.from_pretrained(clip_path)
        n = self.model.config.num_labels
        if class_names is not None:
            names = [line.strip() for line in Path(class_names).read_text(encoding="utf-8").splitlines()
                     if line.strip()]
            if len(names) != n:
                raise ValueError(f"{class_names}: {len(names)} class names, but the detector has {n} classes")
        else:
            names = [self.model.config.id2label[i] for i in range(n)]
        self.class_names = names
        self.max_per_image = max_per_image
        self._classifiers: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def detect(self, image: Image.Image) -> dict[str, list[Candidate]]:
        inputs = self.processor(images=[image], return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device)
        out = self.model(pixel_values=pixels)
        # as mmdet: upsample to the padded input, drop the padding, resize to the image
        logits = F.interpolate(out.masks_queries_logits, size=pixels.shape[-2:], mode="bilinear", align_corners=False)
        if "pixel_mask" in inputs:
            valid = inputs["pixel_mask"][0].bool()
            h, w = int(valid.any(1).sum()), int(valid.any(0).sum())
            logits = logits[..., :h, :w]
        logits = F.interpolate(logits, size=(image.height, image.width), mode="bilinear", align_corners=False)
        labels, scores, masks = instance_postprocess(out.class_queries_logits[0].float().cpu(),
                                                     logits[0].float().cpu(), self.max_per_image)
        boxes = mask_boxes(masks)
        found: dict[str, list[Candidate]] = {}
        for label, score, mask, box in zip(labels.tolist(), scores.tolist(), masks.numpy(), boxes.tolist()):
            found.setdefault(self.class_names[label], []).append(Candidate(tuple(box), float(score), mask))
        return found

    @torch.no_grad()
    def color_classifier(self, classname: str) -> torch.Tensor:
        """``[D, 10]``: per colour, the normalised mean of the normalised embeddings of the three templates
        (clip_benchmark's ``zero_shot_classifier``)."""
        if classname not in self._classifiers:
            columns = []
            for c in COLORS:
                texts = [t.format(c=c, cls=classname) for t in COLOR_TEMPLATES]
                tokens = self.clip_tokenizer(texts, padding=True, return_tensors="pt").to(self.device)
                emb = _features(self.clip.get_text_features(**tokens))
                emb = F.normalize(emb, dim=-1).mean(dim=0)
                columns.append(emb / emb.norm())
            self._classifiers[classname] = torch.stack(columns, dim=1)
        return self._classifiers[classname]

    @torch.no_grad()
    def colors(self, image: Image.Image, objects: Sequence[Candidate], classname: str) -> list[str]:
        if not objects:
            return []
        crops = [masked_crop(image, o.mask, o.bbox) for o in objects]
        pixels = self.clip_processor(images=crops, return_tensors="pt")["pixel_values"].to(self.device)
        feats = F.normalize(_features(self.clip.get_image_features(pixel_values=pixels)), dim=-1)
        logits = 100.0 * feats @ self.color_classifier(classname)
        return [COLORS[i] for i in logits.argmax(1).tolist()]


def _features(out) -> torch.Tensor:
    """transformers 5 returns the projected embeddings as ``pooler_output``; older releases return the tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output
