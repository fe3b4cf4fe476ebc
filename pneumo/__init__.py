"""pneumo: MLflow-tracked classifiers that tell NORMAL from PNEUMONIA in pediatric chest X-rays.

"The notebook", in docstrings and comments throughout, is the Kaggle-style notebook this project
started from; README.md ("Where this comes from") says what it built and what it got wrong.
"""

# The one label contract of the project: index 1 is the positive class (pneumonia).
CLASS_NAMES = ("NORMAL", "PNEUMONIA")
# The served label of an image the model's input gate says it was not made for (pneumo.ood): it
# still gets a probability, but neither class name.
UNCERTAIN = "UNCERTAIN"

__version__ = "0.1.0"
