"""cnn: the notebook's 3-block CNN, trained without augmentation."""

from pneumo.cli import main

if __name__ == "__main__":
    main("cnn")
