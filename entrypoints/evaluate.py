"""evaluate: clinical metrics, figures and Grad-CAM gallery for a model; optionally register it."""

from pneumo.cli import main

if __name__ == "__main__":
    main("evaluate")
