"""MLLM training data: sources -> weighted mixture -> samples -> padded / packed batches, resumable.

* :mod:`.config`  ``MLLMDataConfig`` (the ``data`` section) with a list of ``SourceConfig``
* :mod:`.sources` readers of pairs (JSONL / parquet / webdataset / folder), LLaVA chat and text corpora
* :mod:`.samples` record -> ``Sample`` (processor ids/labels, codes or pixels per image, CFG dropout)
* :mod:`.collate` ``MLLMCollator`` (pad / pack), ``encode_pending_images``
* :mod:`.loader`  ``MLLMDataLoader``: deterministic mixture stream with ``state_dict``/``load_state_dict``
* :mod:`.extract` ``unitok extract-codes``
"""
from .collate import MLLMCollator, encode_pending_images, pack_rows
from .config import MLLMDataConfig, SourceConfig
from .loader import DataStats, MLLMDataLoader, build_loader
from .samples import Sample, SampleBuilder, check_codes
from .sources import MixtureSource, Record, build_source, build_sources, load_llava

__all__ = ["MLLMCollator", "encode_pending_images", "pack_rows", "MLLMDataConfig", "SourceConfig", "DataStats",
           "MLLMDataLoader", "build_loader", "Sample", "SampleBuilder", "check_codes", "MixtureSource", "Record",
           "build_source", "build_sources", "load_llava"]
