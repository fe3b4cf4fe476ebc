"""resnet: ResNet50 (ImageNet weights by default) with a small head, optionally fine-tuned."""

from pneumo.cli import main

if __name__ == "__main__":
    main("resnet")
