#!/bin/sh
# Fetch the headers of one Debian -dev package into DEST (DEST/include/SUBDIR/...) without
# installing anything. Used for build-time-only headers the Python wheels do not ship:
#   libonnxruntime-dev  onnxruntime  (the onnxruntime wheel has the library, no headers; the 1.21
#                                    headers work with newer libraries through the versioned C API,
#                                    GetApi(ORT_API_VERSION) of the header)
#   nlohmann-json3-dev  nlohmann     (header-only JSON library of the engine's metadata reader)
# We download that one .deb with a throw-away apt sources list and lists dir (so the system's apt
# state is untouched) and unpack it with dpkg -x.
# Usage: fetch_deb_headers.sh PACKAGE SUBDIR DEST   (DEST/include/SUBDIR/MARKER exists afterwards)
set -eu
pkg=$1
sub=$2
dest=$3
if [ -d "$dest/include/$sub" ] && [ -n "$(ls -A "$dest/include/$sub")" ]; then exit 0; fi
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
apt-get $opts download "$pkg" >&2
dpkg -x "$tmp/${pkg}"_*.deb "$tmp/root"
mkdir -p "$dest/include"
rm -rf "$dest/include/$sub" "$dest/include/$sub.partial"
cp -r "$tmp/root/usr/include/$sub" "$dest/include/$sub.partial"
mv "$dest/include/$sub.partial" "$dest/include/$sub"  # complete or absent: a cut copy is never reused
echo "$pkg headers in $dest/include/$sub" >&2
