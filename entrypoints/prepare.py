"""prepare: find, validate and split the chest X-rays (patient-grouped) into a logged manifest."""

from pneumo.cli import main

if __name__ == "__main__":
    main("prepare")
