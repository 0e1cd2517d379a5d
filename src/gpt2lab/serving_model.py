"""MLflow "models from code" file for the spam classifier: MLflow runs it when it loads the model.

Logged by :func:`gpt2lab.serving.log_model`; the library never imports it.
"""

import mlflow
from mlflow.pyfunc import PythonModel

from gpt2lab.serving import SpamPyfunc


class SpamClassifierModel(SpamPyfunc, PythonModel):
    """gpt2lab's spam classifier behind MLflow's pyfunc interface (see :class:`gpt2lab.serving.SpamPyfunc`)."""


mlflow.models.set_model(SpamClassifierModel())
