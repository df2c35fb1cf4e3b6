"""Trainable tokens: train the embedding rows of a few (new or existing) tokens, and nothing else."""

from oxpeft.tuners.trainable_tokens.config import TrainableTokensConfig
from oxpeft.tuners.trainable_tokens.layer import TrainableTokensLayer, TrainableTokensWrapper
from oxpeft.tuners.trainable_tokens.model import TrainableTokensModel
from oxpeft.utils.peft_types import register_peft_method

__all__ = ["TrainableTokensConfig", "TrainableTokensLayer", "TrainableTokensModel", "TrainableTokensWrapper"]

register_peft_method(
    name="trainable_tokens", config_cls=TrainableTokensConfig, model_cls=TrainableTokensModel, prefix="trainable_tokens_"
)
