#!/bin/sh
# Install an xray-edge bundle on a 64-bit Raspberry Pi OS (Debian 12, Python 3.11) as a service.
#
#   sudo ./install.sh                   system install: /opt/xray-edge, user xray-edge, systemd unit
#   ./install.sh --prefix DIR --no-systemd   a test install into DIR (no user, no unit), as anyone
#
# Options: --runtime litert|tflite|onnx (default litert), --args "..." (the service's options,
# written to /etc/default/xray-edge; default: --dicom-port 11112).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
prefix=/opt/xray-edge
systemd=1
runtime=litert
args="--dicom-port 11112"
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix=$2; shift 2 ;;
    --no-systemd) systemd=0; shift ;;
    --runtime) runtime=$2; shift 2 ;;
    --args) args=$2; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$runtime" in litert|tflite|onnx) ;; *) echo "install.sh: --runtime is litert, tflite or onnx" >&2; exit 2 ;; esac

python=${PYTHON:-python3}
"$python" -c 'import sys; assert sys.version_info >= (3, 9)' 2>/dev/null ||
  { echo "install.sh: needs Python 3.9 or newer ($python)" >&2; exit 1; }
"$python" -m venv --help >/dev/null 2>&1 ||
  { echo "install.sh: needs the venv module: apt-get install python3-venv" >&2; exit 1; }
wheel=$(ls "$here"/xray_edge-*.whl 2>/dev/null | head -n 1)
[ -n "$wheel" ] || { echo "install.sh: no xray_edge wheel beside this script" >&2; exit 1; }
[ -f "$here/model/manifest.json" ] || { echo "install.sh: no model/manifest.json beside this script" >&2; exit 1; }

if [ "$systemd" = 1 ] && [ "$(id -u)" != 0 ]; then
  echo "install.sh: a system install needs root (sudo ./install.sh), or use --prefix DIR --no-systemd" >&2; exit 1
fi

echo "installing into $prefix (runtime: $runtime)"
mkdir -p "$prefix"
# a venv cannot be moved (its scripts name their own path): rebuilt in place
rm -rf "$prefix/venv"
"$python" -m venv "$prefix/venv"
"$prefix/venv/bin/pip" install -q --disable-pip-version-check "$wheel[serve,$runtime]"
rm -rf "$prefix/model.new" && cp -R "$here/model" "$prefix/model.new"
rm -rf "$prefix/model" && mv "$prefix/model.new" "$prefix/model"
# the model is checked against its manifest now, not at the first film
"$prefix/venv/bin/xray-edge" info "$prefix/model"

if [ "$systemd" = 0 ]; then
  echo "installed. Run: $prefix/venv/bin/xray-edge serve --model $prefix/model --spool SPOOL $args"
  exit 0
fi
chmod -R a+rX,go-w "$prefix"
id xray-edge >/dev/null 2>&1 || useradd --system --no-create-home --home-dir /var/lib/xray-edge \
  --shell /usr/sbin/nologin xray-edge
install -d -o xray-edge -g xray-edge -m 0750 /var/lib/xray-edge
[ -f /etc/default/xray-edge ] || printf '# Options of xray-edge serve (see: xray-edge serve --help)\nXRAY_EDGE_ARGS="%s"\n' "$args" > /etc/default/xray-edge
install -m 0644 "$here/xray-edge.service" /etc/systemd/system/xray-edge.service
systemctl daemon-reload
systemctl enable --now xray-edge.service
echo "xray-edge is running: systemctl status xray-edge; xray-edge status --spool /var/lib/xray-edge"
