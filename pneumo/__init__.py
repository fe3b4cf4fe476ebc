"""pneumo: MLflow-tracked classifiers that tell NORMAL from PNEUMONIA in pediatric chest X-rays."""

# The one label contract of the project: index 1 is the positive class (pneumonia).
CLASS_NAMES = ("NORMAL", "PNEUMONIA")

__version__ = "0.1.0"
