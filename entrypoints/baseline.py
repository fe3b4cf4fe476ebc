"""baseline: the notebook's dense network (Dense 32-8-1) on oversampled 64x64 RGB pixels."""

from pneumo.cli import main

if __name__ == "__main__":
    main("baseline")
