"""epic-sglang: Position-Independent Caching (EPIC / LegoLink) for RAG serving."""
from epic_sglang.engine import Engine, GenerateResult, GenerateStats, Request
from epic_sglang.policies import parse_policy
from epic_sglang.sampling import SamplingParams

__all__ = ["Engine", "GenerateResult", "GenerateStats", "Request", "SamplingParams", "parse_policy"]
__version__ = "0.1.0"
