#!/usr/bin/env bash
# The second baseline of `make bench-lab` (benches/lab.rs): virt-lightning, a tool made to
# start cloud-image VMs on libvirt fast, booting N VMs from the same offline base image.
#
#   virt-lightning.sh install VENV                    # pip install into VENV (once)
#   virt-lightning.sh up VENV WORK N DISK MEMORY_MIB  # prints "NAME ssh N_SECONDS" per node
#   virt-lightning.sh down VENV WORK
#
# DISK is the base image made disk-bootable (bootable-disk.sh): virt-lightning boots
# every VM from its disk (SeaBIOS, `<boot dev='hd'/>`) and has no way to load a kernel
# directly. It is used unmodified, the way its README says: a storage pool at
# /var/lib/virt-lightning/pool whose upstream/ holds DISTRO.qcow2 and DISTRO.yaml, a
# config.ini, a virt-lightning.yaml listing the VMs, `vl up`, `vl down`. Its own
# choices stand: its libvirt NAT network with dnsmasq, i440fx with SeaBIOS, VNC, a
# cloud-init NoCloud ISO per VM (here on a virtio disk: the Debian cloud kernel has no
# IDE driver for its default CD-ROM). `vl up` returns once every VM shows an SSH banner;
# like the tutorial baseline, this script then polls a real login on each node.
# It picks KVM whenever libvirt offers it, so run it where libvirt offers only TCG
# (KTHW_NETNS_NO_KVM=1 scripts/netns-run ...), as kthw-lab would choose on this machine.
#
# Run inside scripts/netns-run: its network, pool and VMs must not touch the host. The
# pool directory is a tmpfs mounted in the namespace's own mount namespace.
set -euo pipefail
# shellcheck source=benches/baseline/poll-logins.sh
source "$(dirname "${BASH_SOURCE[0]}")/poll-logins.sh"

version=2.5.0
user=kthw
distro=kthw-debian12
pool=/var/lib/virt-lightning
net=192.168.123

install() {
    local venv=$1
    if [[ -x $venv/bin/vl ]] && "$venv/bin/vl" --version 2>/dev/null | grep -q " $version\$"; then
        return 0
    fi
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "virt-lightning==$version"
}

up() {
    local venv=$1 work=$2 n=$3 disk=$4 mem=$5
    mkdir -p "$work"
    work=$(cd "$work" && pwd)
    [[ -f $work/id ]] || ssh-keygen -q -t ed25519 -N '' -C bench -f "$work/id"
    mkdir -p "$pool"
    mountpoint -q "$pool" || mount -t tmpfs -o mode=0755 kthw-vl "$pool"
    mkdir -p "$pool/pool/upstream"
    ln -sf "$(readlink -f "$disk")" "$pool/pool/upstream/$distro.qcow2"
    printf 'username: %s\n' "$user" >"$pool/pool/upstream/$distro.yaml"
    cat >"$work/config.ini" <<EOF
[main]
libvirt_uri = qemu:///system
root_password = kthw-bench
storage_pool = virt-lightning
network_name = virt-lightning
network_cidr = $net.0/24
network_auto_clean_up = True
ssh_key_file = $work/id.pub
EOF
    local i
    : >"$work/virt-lightning.yaml"
    for ((i = 0; i < n; i++)); do
        cat >>"$work/virt-lightning.yaml" <<EOF
- name: vl-node-$i
  distro: $distro
  memory: $mem
  vcpus: 1
  disks: [{size: 10}]
  networks: [{ipv4: $net.$((11 + i))/24}]
  metadata_format: {provider: nocloud}
  meta_data_media_type: disk
EOF
    done
    local start=$SECONDS timeout=${BASELINE_TIMEOUT:-900}
    (cd "$work" && timeout "$timeout" "$venv/bin/vl" --config "$work/config.ini" up \
        --virt-lightning-yaml "$work/virt-lightning.yaml" >"$work/vl-up.log" 2>&1) || {
        echo "vl up failed or timed out; its output:" >&2
        tail -n 30 "$work/vl-up.log" >&2
        return 1
    }
    poll_logins "$work/id" "$user" "$net" "$n" vl-node- "$start" "$timeout" ""
}

down() {
    local venv=$1 work=$2
    if [[ -f $work/config.ini ]]; then
        (cd "$work" && "$venv/bin/vl" --config "$work/config.ini" down >"$work/vl-down.log" 2>&1) || {
            echo "vl down failed; its output:" >&2
            tail -n 30 "$work/vl-down.log" >&2
            return 1
        }
    fi
    if mountpoint -q "$pool"; then
        umount "$pool"
        rmdir "$pool" 2>/dev/null || true
    fi
    rm -rf -- "$work"
}

case ${1:-} in
install) shift; install "$@" ;;
up) shift; up "$@" ;;
down) shift; down "$@" ;;
*) echo "usage: $0 install VENV | up VENV WORK N DISK MEMORY_MIB | down VENV WORK" >&2; exit 2 ;;
esac
