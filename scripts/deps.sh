#!/usr/bin/env bash
# Installs what kiln needs on Debian 12 (run as root, or with sudo available).
set -euo pipefail
# The second line builds kiln's own guest kernel (kiln kernel build) from
# Debian's linux-source, which kiln downloads but never installs.
pkgs=(qemu-system-x86 erofs-utils squashfs-tools python3 python3-numpy python3-pip python3-venv libpython3.11-testsuite
      ca-certificates gcc libc6-dev bubblewrap fuse3 cpio make git
      flex bison bc libelf-dev xz-utils binutils perl)
missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
if [ ${#missing[@]} -gt 0 ]; then
	echo "deps: installing ${missing[*]}"
	$SUDO apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
else
	# kiln downloads the kernel and python3-* packages with apt-get download:
	# the package lists must exist.
	ls /var/lib/apt/lists/*Packages* >/dev/null 2>&1 || $SUDO apt-get update -qq
fi
export PATH=$PATH:/usr/local/go/bin
if ! command -v go >/dev/null; then
	echo "deps: Go 1.26 or newer is needed (https://go.dev/dl/), install it under /usr/local/go" >&2
	exit 1
fi
