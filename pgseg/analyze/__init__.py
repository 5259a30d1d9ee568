"""What a trained model's groups do, apart from what it names them: oracle-labelled group mIoU."""
from .oracle import oracle_confusion, oracle_labels, oracle_prediction

__all__ = ["oracle_confusion", "oracle_labels", "oracle_prediction"]
