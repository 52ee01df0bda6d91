"""Classifiers: the registry, the built-in architectures, pretrained weights and param groups.

Example:
    >>> from imagerec.models import create_model, list_models
    >>> model = create_model("cnn", num_classes=10, in_chans=1, img_size=28)
"""

# Importing the architecture modules registers their entrypoints.
from imagerec.models import airbench, cnn, mlp, resnet, rnn, vit  # noqa: F401
from imagerec.models._registry import count_parameters, create_model, describe_model, list_models, register_model
from imagerec.models.base import Classifier
from imagerec.models.pretrained import classifier_parameter_names, create_param_groups, load_pretrained

__all__ = [
    "Classifier",
    "classifier_parameter_names",
    "count_parameters",
    "create_model",
    "create_param_groups",
    "describe_model",
    "list_models",
    "load_pretrained",
    "register_model",
]
