import pytest
import torch

from epic_sglang import Engine
from epic_sglang.data.hotpotqa import load_hotpotqa


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def engine() -> Engine:
    return Engine("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def hf_model(engine):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hotpot():
    return load_hotpotqa()[:40]
