"""`naslung predict`: malignancy of nodules in a CT by a deployed model, with the attention
maps that show where it looked (`run_predict`; the command line in `naslung.cli.predict`)."""

from naslung.predict.run import PredictError, Prediction, run_predict

__all__ = ["PredictError", "Prediction", "run_predict"]
