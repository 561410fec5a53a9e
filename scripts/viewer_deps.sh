#!/usr/bin/env bash
# What the napari viewer tests need from Debian: Xvfb (a display without a screen) and the libraries
# Qt's xcb platform and OpenGL load. Installs what is missing when run as root with apt-get; else
# fails in one line naming the packages.
set -euo pipefail
need=(xvfb xauth libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0
      libxcb-render-util0 libxcb-shape0 libxcb-xinerama0 libxcb-cursor0 libxcb-xfixes0 libegl1 libgl1
      libgl1-mesa-dri libfontconfig1 libdbus-1-3)
missing=()
for package in "${need[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "lora-sam3d: the viewer tests need these Debian packages: ${missing[*]} (apt-get install ${missing[*]})" >&2
  exit 1
fi
