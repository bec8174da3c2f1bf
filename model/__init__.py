"""The GLM-130B network, its tensor-parallel layers and the SAT checkpoint format."""
from model.config import GLMConfig
from model.glm import GLM130B, KVCache

__all__ = ["GLMConfig", "GLM130B", "KVCache"]
