"""adapt: fine-tune a registered model on a hospital's own labelled X-rays, with out-of-fold figures."""

from pneumo.cli import main

if __name__ == "__main__":
    main("adapt")
