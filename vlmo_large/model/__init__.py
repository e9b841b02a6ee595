from vlmo_large.model.backbone import MoMEBackbone
from vlmo_large.model.vlmo import VLMo, build_model, count_parameters

__all__ = ["MoMEBackbone", "VLMo", "build_model", "count_parameters"]
