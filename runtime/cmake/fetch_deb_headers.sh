#!/bin/sh
# Fetch the ONNX Runtime C headers into DEST (DEST/include/onnxruntime/*.h) without installing
# anything: the onnxruntime wheel ships only the library, Debian's libonnxruntime-dev has the
# headers. We download that one .deb with a throw-away apt sources list and lists dir (so the
# system's apt state is untouched) and unpack it with dpkg -x. The 1.21 headers work with newer
# libraries through the versioned C API (GetApi(ORT_API_VERSION) of the header).
# Usage: fetch_ort_headers.sh DEST
set -eu
dest=$1
if [ -f "$dest/include/onnxruntime/onnxruntime_c_api.h" ]; then exit 0; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/lists/partial" "$tmp/archives/partial"
echo "deb http://deb.debian.org/debian trixie main" > "$tmp/trixie.list"
opts="-o Dir::Etc::SourceList=$tmp/trixie.list -o Dir::Etc::SourceParts=/dev/null -o Dir::State::Lists=$tmp/lists
      -o Dir::Cache::Archives=$tmp/archives -o Debug::NoLocking=1 -o APT::Sandbox::User=root -qq"
# shellcheck disable=SC2086
apt-get $opts update >&2
cd "$tmp"
# shellcheck disable=SC2086
apt-get $opts download libonnxruntime-dev >&2
dpkg -x "$tmp"/libonnxruntime-dev_*.deb "$tmp/root"
mkdir -p "$dest/include"
rm -rf "$dest/include/onnxruntime"
cp -r "$tmp/root/usr/include/onnxruntime" "$dest/include/onnxruntime"
echo "ONNX Runtime headers in $dest/include/onnxruntime" >&2
