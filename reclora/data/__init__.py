"""Datasets under the RecLoRA protocol: loaders, splits, text, prompts, item embeddings.

Start with ``load_dataset`` and ``RecDataset`` (base.py holds the contract); the retriever
that works on them is ``reclora.retriever.LongShortRetriever``.
"""

from reclora.data.base import (
    DATASETS,
    DEFAULT_MIN_HISTORY,
    DataError,
    HistoryBatch,
    RecDataset,
    default_data_dir,
    load_dataset,
)
from reclora.data.embeddings import embedding_cache_path, item_embeddings
from reclora.data.prompts import ANSWERS, PromptBuilder, answer_text, build_prompt

__all__ = [
    "ANSWERS",
    "DATASETS",
    "DEFAULT_MIN_HISTORY",
    "DataError",
    "HistoryBatch",
    "PromptBuilder",
    "RecDataset",
    "answer_text",
    "build_prompt",
    "default_data_dir",
    "embedding_cache_path",
    "item_embeddings",
    "load_dataset",
]
