#!/usr/bin/env bash
# gather-prefix.sh: on a Debian machine, gathers pdserve's Debian library
# dependencies into a prefix folder (default .deps/prefix, git-ignored) with
# `apt-get download` + `dpkg-deb -x`, so the same sources build on a machine where
# nothing can be installed (the GPU machine: Ubuntu, no registry):
#
#   scripts/gather-prefix.sh [PREFIX]
#   cmake -S . -B build -DPDSERVE_PREFIX=.deps/prefix && cmake --build build
#
# Static archives are used where Debian ships them (microhttpd, pcre2, utf8proc,
# uring, sqlite3, openblas); cJSON ships only a shared object, found through the
# build's rpath. libcurl and OpenBLAS are taken from the target system (only their
# headers come from here): curl's static archive drags in a dozen TLS and
# compression libraries, and OpenBLAS's archive alone is 56 MB, more than a device
# call may carry.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
prefix=${1:-$here/.deps/prefix}
debs=$here/.deps/debs
mkdir -p "$prefix" "$debs"

PKGS=(
  libmicrohttpd-dev libmicrohttpd12
  libcjson-dev libcjson1
  libpcre2-dev libpcre2-8-0
  libutf8proc-dev libutf8proc2
  liburing-dev liburing2
  libsqlite3-dev libsqlite3-0
  libopenblas-pthread-dev
  libcurl4-openssl-dev
)

if ! ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1; then apt-get update -qq; fi
cd "$debs"
for p in "${PKGS[@]}"; do
  if ! ls "${p}"_*.deb >/dev/null 2>&1; then
    apt-get download -qq "$p" 2>/dev/null || { echo "gather-prefix: cannot download $p" >&2; exit 1; }
  fi
done
for f in "$debs"/*.deb; do dpkg-deb -x "$f" "$prefix"; done

lib=$prefix/usr/lib/x86_64-linux-gnu
# Only the headers of curl: link against the target's own libcurl.so.4.
rm -f "$lib"/libcurl.a "$lib"/libcurl.so "$lib"/libcurl.la
# Only the headers of OpenBLAS (see above).
rm -rf "$lib"/openblas-pthread/*.a "$lib"/openblas-pthread/*.so* "$lib"/libgfortran* "$lib"/libquadmath*
# Static archives are linked; their shared twins and unused variants are dropped.
for l in microhttpd pcre2-8 utf8proc uring sqlite3; do rm -f "$lib"/lib$l.so*; done
rm -f "$lib"/libpcre2-16* "$lib"/libpcre2-32* "$lib"/libpcre2-posix* "$lib"/*.la
rm -rf "$prefix"/usr/share "$prefix"/usr/bin
ln -sf libcjson.so.1 "$lib/libcjson.so"
echo "gather-prefix: $(ls "$debs" | wc -l) packages unpacked into $prefix"
