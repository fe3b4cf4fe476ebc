"""Models-from-code definition of the served pyfunc.

MLflow stores this file with the model and runs it at load time, so no pickled Python object is
ever part of a logged model.
"""

import mlflow

from pneumo.serving import PneumoniaClassifier

mlflow.models.set_model(PneumoniaClassifier())
