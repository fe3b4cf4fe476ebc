"""aug_cnn: the main job, a CNN trained on class-balanced, augmented batches with a chosen threshold."""

from pneumo.cli import main

if __name__ == "__main__":
    main("aug_cnn")
