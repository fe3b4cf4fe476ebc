"""score_pacs: score a PACS's chest X-rays over DICOMweb and store one DICOM SR per image in its study."""

from pneumo.cli import main

if __name__ == "__main__":
    main("score_pacs")
