"""The shapes world: a procedural toy world (``world``: scenes, rendering, captions, questions, prompts), its exact
detector (``detect``), that detector under GenEval's rules (``geneval``) and its evaluation suite (``suite``). The
data world at the bottom of the stack: training and evaluation both read it. Loads numpy/PIL (scipy to detect)."""
from .world import (COLOR_NAMES, COLORS, DEFAULT_CONFIG, GENEVAL_TAGS, QUESTION_TYPES, RELATIONS, SHAPES, SIZES,
                    SPLITS, Background, Obj, Scene, WorldConfig, captions, enumerate_prompts, generate_split,
                    geneval_prompts, make_scene, questions, relative_position, render, scene_for_prompt,
                    scene_record, scene_split, t2i_prompts)
from .detector import DEFAULT_DETECTOR, Detection, DetectorConfig, detect
from .geneval import ShapesDetector, score_image, summarize
from .suite import VQA_SUFFIX, test_scenes

__all__ = [
    "COLOR_NAMES", "COLORS", "DEFAULT_CONFIG", "GENEVAL_TAGS", "QUESTION_TYPES", "RELATIONS", "SHAPES", "SIZES",
    "SPLITS", "Background", "Obj", "Scene", "WorldConfig", "captions", "enumerate_prompts", "generate_split",
    "geneval_prompts", "make_scene", "questions", "relative_position", "render", "scene_for_prompt", "scene_record",
    "scene_split", "t2i_prompts", "DEFAULT_DETECTOR", "Detection", "DetectorConfig", "detect", "ShapesDetector",
    "score_image", "summarize", "VQA_SUFFIX", "test_scenes",
]
