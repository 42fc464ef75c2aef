"""epic-sglang's HTTP server (FastAPI on uvicorn): SGLang native API, OpenAI API, RAG."""
from epic_sglang.server.app import create_app, create_sglang_front, freeze_startup_objects
from epic_sglang.server.config import ServerConfig

__all__ = ["ServerConfig", "create_app", "create_sglang_front", "freeze_startup_objects"]
