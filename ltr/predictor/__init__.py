"""Length-ranking predictor: ListMLE on all-MiniLM-L6-v2. Higher score = longer predicted output."""

from ltr.predictor.losses import listmle_loss
from ltr.predictor.model import PredictorConfig, RankPredictor, fit_calibration, load_shipped_predictor

__all__ = ["PredictorConfig", "RankPredictor", "fit_calibration", "listmle_loss", "load_shipped_predictor"]
