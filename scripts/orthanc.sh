#!/usr/bin/env bash
# Start a private Orthanc PACS with its DICOMweb plugin, for OHIF / MONAI Label over DICOMweb and for
# the tests. Everything lives in one folder: the config, the storage and the log.
#   bash scripts/orthanc.sh                      # a new temp folder, free HTTP and DICOM ports
#   bash scripts/orthanc.sh /data/pacs           # a folder of yours (kept: storage survives restarts)
#   ORTHANC_HTTP_PORT=8042 ORTHANC_DICOM_PORT=4242 bash scripts/orthanc.sh /data/pacs
#   bash scripts/orthanc.sh --locate             # print the Orthanc binary and DICOMweb plugin, or exit 3
# Orthanc runs in the foreground (Ctrl-C stops it). The folder gets orthanc.env with ORTHANC_URL and
# DICOMWEB_URL (http://127.0.0.1:<port>/dicom-web), written before Orthanc starts.
# Installing: apt-get install orthanc orthanc-dicomweb (scripts/install.sh does it when root on Debian).
# Orthanc 1.10 has no listen-address option: scripts/bind_loopback.c (built here with cc, preloaded) makes
# it listen on 127.0.0.1 only. Without a C compiler it listens on all interfaces, but HTTP still answers
# loopback clients only (RemoteAccessAllowed false) and DICOM only the MONAILABEL AET from 127.0.0.1.
set -euo pipefail

locate() {
    local bin="${ORTHANC_BIN:-}" plugin="${ORTHANC_DICOMWEB_PLUGIN:-}" p
    if [ -z "$bin" ]; then
        for p in "$(command -v Orthanc || true)" /usr/sbin/Orthanc /usr/bin/Orthanc /usr/local/bin/Orthanc \
                 /usr/local/sbin/Orthanc; do
            if [ -n "$p" ] && [ -x "$p" ]; then bin=$p; break; fi
        done
    fi
    if [ -z "$plugin" ]; then
        # Debian's orthanc-dicomweb: /usr/share/orthanc/plugins/libOrthancDicomWeb.so -> /usr/lib/orthanc/...
        for p in /usr/share/orthanc/plugins/libOrthancDicomWeb.so /usr/lib/orthanc/libOrthancDicomWeb.so* \
                 /usr/local/share/orthanc/plugins/libOrthancDicomWeb.so /usr/lib/x86_64-linux-gnu/orthanc/libOrthancDicomWeb.so*; do
            if [ -e "$p" ]; then plugin=$p; break; fi
        done
    fi
    if [ -z "$bin" ] || [ ! -x "$bin" ]; then
        echo "Orthanc not found (apt-get install orthanc orthanc-dicomweb, or set ORTHANC_BIN)" >&2; return 3
    fi
    if [ -z "$plugin" ] || [ ! -e "$plugin" ]; then
        echo "Orthanc DICOMweb plugin not found (apt-get install orthanc-dicomweb, or set ORTHANC_DICOMWEB_PLUGIN)" >&2
        return 3
    fi
    ORTHANC_BIN=$bin
    ORTHANC_DICOMWEB_PLUGIN=$plugin
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

if [ "${1:-}" = "--locate" ]; then
    locate || exit 3
    echo "ORTHANC_BIN=$ORTHANC_BIN"
    echo "ORTHANC_DICOMWEB_PLUGIN=$ORTHANC_DICOMWEB_PLUGIN"
    exit 0
fi

locate || exit 3
dir=${1:-$(mktemp -d -t orthanc.XXXXXX)}
mkdir -p "$dir/db"
dir=$(cd "$dir" && pwd)
http_port=${ORTHANC_HTTP_PORT:-$(free_port)}
dicom_port=${ORTHANC_DICOM_PORT:-$(free_port)}
while [ "$dicom_port" = "$http_port" ]; do dicom_port=$(free_port); done

cat > "$dir/orthanc.json" <<EOF
{
  "Name": "xray_textseg PACS",
  "StorageDirectory": "$dir/db",
  "IndexDirectory": "$dir/db",
  "StorageCompression": false,
  "Plugins": ["$ORTHANC_DICOMWEB_PLUGIN"],
  "ConcurrentJobs": 1,
  "SaveJobs": false,
  "HttpServerEnabled": true,
  "HttpPort": $http_port,
  "RemoteAccessAllowed": false,
  "AuthenticationEnabled": false,
  "OrthancExplorerEnabled": true,
  "WebDavEnabled": false,
  "HttpThreadsCount": 8,
  "DicomServerEnabled": true,
  "DicomAet": "ORTHANC",
  "DicomPort": $dicom_port,
  "DicomCheckCalledAet": false,
  "DicomCheckModalityHost": true,
  "DicomAlwaysAllowEcho": false,
  "DicomAlwaysAllowFind": false,
  "DicomAlwaysAllowGet": false,
  "DicomAlwaysAllowMove": false,
  "DicomAlwaysAllowStore": false,
  "DicomModalities": { "monailabel": ["MONAILABEL", "127.0.0.1", 11112] },
  "DicomWeb": {
    "Enable": true,
    "Root": "/dicom-web/",
    "EnableWado": true,
    "WadoRoot": "/wado",
    "Ssl": false,
    "StudiesMetadata": "Full",
    "SeriesMetadata": "Full"
  }
}
EOF
cat > "$dir/orthanc.env" <<EOF
ORTHANC_DIR=$dir
ORTHANC_HTTP_PORT=$http_port
ORTHANC_DICOM_PORT=$dicom_port
ORTHANC_URL=http://127.0.0.1:$http_port
DICOMWEB_URL=http://127.0.0.1:$http_port/dicom-web
EOF
# listen on 127.0.0.1 only (see the header)
preload=""
here=$(cd "$(dirname "$0")" && pwd)
if cc -shared -fPIC -O2 -o "$dir/bind_loopback.so" "$here/bind_loopback.c" -ldl 2>"$dir/bind_loopback.log"; then
    preload="$dir/bind_loopback.so${LD_PRELOAD:+:$LD_PRELOAD}"
else
    echo "[orthanc] warning: no C compiler, Orthanc listens on all interfaces (remote HTTP clients get 403)" >&2
fi
echo "[orthanc] folder $dir, DICOMweb http://127.0.0.1:$http_port/dicom-web, DICOM AET ORTHANC port $dicom_port" >&2
if [ -n "$preload" ]; then export LD_PRELOAD=$preload; fi
exec "$ORTHANC_BIN" --logdir="$dir" "$dir/orthanc.json"
