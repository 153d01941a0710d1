"""The MLflow pyfunc form of a recengine ranker, logged with models-from-code: nothing is pickled.

MLflow copies this file into the logged model and runs it at load time; `set_model` names the model.
It needs only lightgbm, numpy and pandas, so a service can load the model without recengine:

    model = mlflow.pyfunc.load_model("models:/recengine-movielens@champion")
    scores = model.predict(feature_rows)   # a DataFrame with the spec's feature columns

The artifact `ranker` is the model folder recengine wrote (model.txt + spec.json).
"""

import hashlib
import json
from pathlib import Path

import lightgbm as lgb
import mlflow
import numpy as np
import pandas as pd

try:  # where recengine is installed, its checks of the folder: spec.json's schema and digest, model.txt's structure
    from recengine.learning.model import read_model_files
except ImportError:  # LightGBM alone: the digest check below
    read_model_files = None


class LightGBMRanker(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        folder = Path(context.artifacts["ranker"])
        if read_model_files is not None:
            self.spec, text = read_model_files(folder)
            self.booster = lgb.Booster(model_str=text)
            return
        self.spec = json.loads((folder / "spec.json").read_text())
        text = (folder / "model.txt").read_bytes()
        # The digest recengine recorded: a truncated or swapped model.txt must not score (LightGBM
        # may read a damaged file without complaint, or crash the process).
        expected = self.spec.get("files", {}).get("model.txt")
        if expected is not None and hashlib.sha256(text).hexdigest() != expected:
            raise ValueError(f"{folder / 'model.txt'}: its content does not match the sha256 in spec.json; the logged "
                             "model is damaged: log it again (recengine train) or download it again.")
        self.booster = lgb.Booster(model_str=text.decode())

    # The DataFrame hint tells MLflow not to infer a schema from it (the logged signature serves) and
    # keeps it from warning "Add type hints" at every log and load.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        features = self.spec["features"]
        missing = [name for name in features if name not in model_input.columns]
        if missing:
            raise ValueError(f"input lacks the model's feature columns {missing}; the spec lists them under 'features'.")
        matrix = model_input[features].astype(np.float64).to_numpy()
        scores = self.booster.predict(matrix, num_iteration=self.spec.get("best_iteration") or None)
        return pd.DataFrame({"score": scores}, index=model_input.index)


mlflow.models.set_model(LightGBMRanker())
