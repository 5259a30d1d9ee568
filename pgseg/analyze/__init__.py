"""What a trained model's groups do, apart from what it names them: the oracle-labelled group mIoU, the compactness
and richness of the group embeddings (the paper's Figs. 5 and 6) and the model's cost (Table 6)."""
from .cost import ModelCost, model_cost
from .embedding import Compactness, Richness, compactness, projection_2d, richness
from .oracle import WindowGroups, group_classes, image_windows, oracle_confusion, oracle_labels, oracle_prediction
from .report import Analysis, analyze, result_paths

__all__ = ["Analysis", "Compactness", "ModelCost", "Richness", "WindowGroups", "analyze", "compactness",
           "group_classes", "image_windows", "model_cost", "oracle_confusion", "oracle_labels", "oracle_prediction",
           "projection_2d", "result_paths", "richness"]
