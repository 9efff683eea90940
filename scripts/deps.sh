#!/usr/bin/env bash
# Install the Debian packages a make target needs, only when some are missing.
# Usage: scripts/deps.sh GROUP...   (groups: build test lab bench)
# Idempotent: when everything is present it changes nothing and needs no network.
#
# qemu comes from one release: qemu-utils from bookworm-backports (10.x) breaks Debian
# 12's qemu-system-common, so when the installed qemu packages come from a backports
# suite, the missing ones are installed from that suite too (`apt-get -t SUITE`); when
# they come from a backports suite that is no enabled apt source, the script stops and
# says what to do instead of letting apt fail ("Resolve generated breaks").
#
# DEPS_SIMULATE=1 asks apt what it would do (apt-get -s, its output shown) and changes
# nothing; with APT_CONFIG pointing at a private apt configuration it is how the tests
# drive this script against a package set of their own.
set -euo pipefail

declare -A GROUPS_PKGS=(
  # Compile the tool: libvirt bindings, libssh2/openssl for ssh2, a C toolchain,
  # protoc and its well-known types for the etcd client's gRPC code.
  [build]="build-essential pkg-config libvirt-dev libssl-dev libssh2-1-dev cmake protobuf-compiler libprotobuf-dev"
  # Everything the tests drive for real: libvirt + qemu (TCG), image building,
  # seed inspection, netlink/nft in namespaces, TLS/kubeconfig checks, etcd, LB baselines,
  # `systemd-analyze verify` of the rendered units. Every package a test names in
  # support::require() is here (tests/suite.rs checks it): a missing tool fails the test.
  [test]="libvirt-daemon-system libvirt-clients libxml2-utils qemu-system-x86 qemu-utils mmdebstrap debian-archive-keyring e2fsprogs util-linux dosfstools mtools nftables iproute2 iputils-ping conntrack procps openssl openssh-server openssh-client etcd-server etcd-client tar systemd apt dpkg"
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

# dpkg's database as apt sees it (APT_CONFIG may point apt at another one).
dpkg_admindir() {
  local STATUS=/var/lib/dpkg/status
  eval "$(apt-config shell STATUS Dir::State::status/f 2>/dev/null)"
  dirname "$STATUS"
}
admindir=$(dpkg_admindir)

not_installed() {
  local p
  for p in "$@"; do
    if ! dpkg-query --admindir="$admindir" -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
      echo "$p"
    fi
  done
}

# The qemu packages that must come from the release of the installed ones.
QEMU_PKGS="qemu-utils qemu-system-x86 qemu-system-common qemu-system-data"

# The backports suite the installed qemu comes from, if any: prints the suite when an
# enabled source offers the installed version; fails, saying what to do, when the
# installed version is a backport no enabled source offers.
qemu_release() {
  local p policy installed suites
  for p in $QEMU_PKGS; do
    policy=$(apt-cache policy "$p" 2>/dev/null) || continue
    installed=$(awk '$1 == "Installed:" {print $2; exit}' <<<"$policy")
    [[ -n $installed && $installed != "(none)" ]] || continue
    # The sources listed under the installed version in the version table
    # (` *** VERSION PRIO`, then `PRIO URI SUITE/COMPONENT ...` lines).
    suites=$(awk -v v="$installed" '
      $1 == "***" { cur = ($2 == v); next }
      NF == 2 && $2 ~ /^-?[0-9]+$/ { cur = ($1 == v); next }
      cur && $1 ~ /^-?[0-9]+$/ && $2 !~ /^\// { split($3, a, "/"); print a[1] }' <<<"$policy")
    local s
    for s in $suites; do
      if [[ $s == *-backports ]]; then
        echo "$s"
        return 0
      fi
    done
    if [[ -z $suites && $installed == *~bpo* ]]; then
      local codename
      codename=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-bookworm}")
      echo "deps.sh: $p $installed is a backport, but no enabled apt source offers it: the qemu packages to install must come from the same release ($p from ${codename}-backports breaks ${codename}'s qemu-system-common)" >&2
      echo "hint: enable ${codename}-backports (echo 'deb http://deb.debian.org/debian ${codename}-backports main' > /etc/apt/sources.list.d/${codename}-backports.list; apt-get update) and run this again, or go back to ${codename}'s $p first (apt-get install --no-install-recommends --allow-downgrades $p/${codename})" >&2
      return 1
    fi
    # Installed from the distribution itself: nothing special.
    return 0
  done
}

mapfile -t missing < <(not_installed "${want[@]}")
if [[ ${#missing[@]} -eq 0 ]]; then
  exit 0
fi
echo "deps.sh: installing ${missing[*]}" >&2
simulate=${DEPS_SIMULATE:-}
if [[ -z $simulate && $(id -u) -ne 0 ]]; then
  echo "deps.sh: need root to install packages (run with sudo)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
release=$(qemu_release) || exit 1
qemu=() rest=()
for p in "${missing[@]}"; do
  if [[ -n $release && " $QEMU_PKGS " == *" $p "* ]]; then qemu+=("$p"); else rest+=("$p"); fi
done

# apt-get install, quiet; under DEPS_SIMULATE only asked, with apt's answer shown.
apt_install() {
  if [[ -n $simulate ]]; then
    echo "deps.sh: apt-get install $*" >&2
    apt-get -s install -y --no-install-recommends "$@"
  else
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  fi
}

if [[ -z $simulate ]]; then apt-get update -qq; else apt-get update -qq >/dev/null; fi
if [[ ${#qemu[@]} -gt 0 ]]; then
  echo "deps.sh: the installed qemu comes from $release: installing ${qemu[*]} from there too" >&2
  apt_install -t "$release" "${qemu[@]}"
fi
if [[ ${#rest[@]} -gt 0 ]]; then
  apt_install "${rest[@]}"
fi
[[ -z $simulate ]] || exit 0
# apt may resolve a conflict by removing a package we want that was installed from
# elsewhere: check the whole list again and put back what went.
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
