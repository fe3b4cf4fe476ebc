"""cv: k-fold cross-validation (patient-grouped, stratified) of the L2 dense baseline via SciKeras."""

from pneumo.cli import main

if __name__ == "__main__":
    main("cv")
