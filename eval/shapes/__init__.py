"""The shapes world: a procedural toy world (``world``), its exact detector (``detect``), GenEval-rule scorer
(``geneval``) and VQA scorer (``vqa``). ``from eval.shapes import ...`` loads numpy/PIL (and scipy for detection)."""
from .world import (COLOR_NAMES, COLORS, DEFAULT_CONFIG, GENEVAL_TAGS, QUESTION_TYPES, RELATIONS, SHAPES, SIZES,
                    SPLITS, Background, Obj, Scene, WorldConfig, captions, enumerate_prompts, generate_split,
                    geneval_prompts, make_scene, questions, relative_position, render, scene_for_prompt,
                    scene_record, scene_split, t2i_prompts)
from .detector import DEFAULT_DETECTOR, Detection, DetectorConfig, detect
from .geneval import score_folder, score_image, summarize
from .vqa import score_vqa

__all__ = [
    "COLOR_NAMES", "COLORS", "DEFAULT_CONFIG", "GENEVAL_TAGS", "QUESTION_TYPES", "RELATIONS", "SHAPES", "SIZES",
    "SPLITS", "Background", "Obj", "Scene", "WorldConfig", "captions", "enumerate_prompts", "generate_split",
    "geneval_prompts", "make_scene", "questions", "relative_position", "render", "scene_for_prompt", "scene_record",
    "scene_split", "t2i_prompts", "DEFAULT_DETECTOR", "Detection", "DetectorConfig", "detect", "score_folder",
    "score_image", "summarize", "score_vqa",
]
