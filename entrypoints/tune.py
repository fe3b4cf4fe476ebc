"""tune: Optuna search over learning rate and augmentation ranges, each trial a nested MLflow run."""

from pneumo.cli import main

if __name__ == "__main__":
    main("tune")
