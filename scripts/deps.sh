#!/usr/bin/env bash
# Install the Debian packages a make target needs, only when some are missing.
# Usage: scripts/deps.sh GROUP...   (groups: build test lab bench)
# Idempotent: when everything is present it changes nothing and needs no network.
set -euo pipefail

declare -A GROUPS_PKGS=(
  # Compile the tool: libvirt bindings, libssh2/openssl for ssh2, a C toolchain.
  [build]="build-essential pkg-config libvirt-dev libssl-dev libssh2-1-dev cmake"
  # Everything the tests drive for real: libvirt + qemu (TCG), image building,
  # seed inspection, netlink/nft in namespaces, TLS/kubeconfig checks, etcd, LB baselines,
  # `systemd-analyze verify` of the rendered units. Every package a test names in
  # support::require() is here (tests/suite.rs checks it): a missing tool fails the test.
  [test]="libvirt-daemon-system libvirt-clients libxml2-utils qemu-system-x86 qemu-utils mmdebstrap debian-archive-keyring e2fsprogs util-linux dosfstools mtools nftables iproute2 iputils-ping conntrack procps openssl openssh-server openssh-client etcd-server etcd-client tar systemd"
  # What a lab host needs at run time.
  [lab]="libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils mmdebstrap debian-archive-keyring e2fsprogs nftables iproute2 openssh-client"
  # Baselines the benchmarks compare against: HAProxy and nginx beside the balancer;
  # the tutorial way (genisoimage) and virt-lightning (a venv from PyPI built against
  # libvirt-dev; its libvirt network needs dnsmasq; the image made disk-bootable with
  # syslinux on a FAT partition) beside kthw-lab.
  [bench]="haproxy nginx libnginx-mod-stream genisoimage python3-venv python3-dev dnsmasq-base fdisk dosfstools mtools syslinux syslinux-common"
)

want=()
for g in "$@"; do
  [[ -n "${GROUPS_PKGS[$g]+x}" ]] || { echo "deps.sh: unknown group '$g' (build test lab bench)" >&2; exit 2; }
  # shellcheck disable=SC2206
  want+=(${GROUPS_PKGS[$g]})
done
# kubectl checks kubeconfigs in tests; any kubectl on PATH will do (Debian ships one
# as kubernetes-client).
if [[ " $* " == *" test "* ]] && ! command -v kubectl >/dev/null 2>&1; then
  want+=(kubernetes-client)
fi

not_installed() {
  local p
  for p in "$@"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
      echo "$p"
    fi
  done
}

mapfile -t missing < <(not_installed "${want[@]}")
if [[ ${#missing[@]} -eq 0 ]]; then
  exit 0
fi
echo "deps.sh: installing ${missing[*]}" >&2
if [[ $(id -u) -ne 0 ]]; then
  echo "deps.sh: need root to install packages (run with sudo)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# apt may resolve a conflict by removing a package we want that was installed from
# elsewhere (a backported qemu-utils goes when Debian 12's qemu-system-x86 comes in):
# check the whole list again and put back what went.
mapfile -t gone < <(not_installed "${want[@]}")
if [[ ${#gone[@]} -gt 0 ]]; then
  echo "deps.sh: installing again what apt removed: ${gone[*]}" >&2
  apt-get install -y -qq --no-install-recommends "${gone[@]}" >/dev/null
  mapfile -t gone < <(not_installed "${want[@]}")
  if [[ ${#gone[@]} -gt 0 ]]; then
    echo "deps.sh: still not installed: ${gone[*]}" >&2
    echo "hint: run 'apt-get install ${gone[*]}' and read why apt refuses" >&2
    exit 1
  fi
fi
