#!/usr/bin/env bash
# The baseline of `make bench` (benches/lab.rs): N VMs brought up by hand the way the
# hard-way tutorials do it, on the same base image as kthw-lab:
#   a Linux bridge with the gateway address, then per node a qcow2 overlay (qemu-img),
#   a cloud-init NoCloud ISO (genisoimage: meta-data, user-data, network-config),
#   a domain XML given to `virsh define` and `virsh start`, and finally a loop of
#   `ssh ... true` against every node until each accepts a login.
# The image has no bootloader, so the domains use the same direct kernel boot as
# kthw-lab, without `cloud-init=disabled`: cloud-init configures the guest, as in a
# stock cloud image. Memory, vCPUs, machine type and disk bus match kthw-lab's domains;
# like a hand-written domain, it sets no TCG translation-cache size. The ISO is a
# virtio-scsi CD-ROM: the Debian cloud kernel has no AHCI driver for q35's SATA.
#
#   tutorial-lab.sh up WORK N IMAGE_DIR MEMORY_MIB   # prints "ssh N_SECONDS" per node
#   tutorial-lab.sh down WORK
#
# Run it inside scripts/netns-run (its bridge and VMs must not touch the host network).
set -euo pipefail
# shellcheck source=benches/baseline/poll-logins.sh
source "$(dirname "${BASH_SOURCE[0]}")/poll-logins.sh"

br=kthwbase0
net=10.250.0
user=kthw
prefix=base-node-

virsh() { command virsh -q -c qemu:///system "$@"; }

up() {
    local work=$1 n=$2 img=$3 mem=$4
    mkdir -p "$work"
    work=$(cd "$work" && pwd)
    [[ -f $work/id ]] || ssh-keygen -q -t ed25519 -N '' -C bench -f "$work/id"
    ip link add "$br" type bridge
    ip addr add "$net.1/24" dev "$br"
    ip link set "$br" up
    local i name ip mac
    for ((i = 0; i < n; i++)); do
        name=$prefix$i
        ip=$net.$((11 + i))
        mac=$(printf '52:54:00:be:00:%02x' "$i")
        qemu-img create -q -f qcow2 -b "$img/disk.qcow2" -F qcow2 "$work/$name.qcow2" 10G
        mkdir -p "$work/$name-seed"
        cat >"$work/$name-seed/meta-data" <<EOF
instance-id: $name
local-hostname: $name
EOF
        cat >"$work/$name-seed/user-data" <<EOF
#cloud-config
hostname: $name
locale: false
users:
  - name: $user
    shell: /bin/bash
    sudo: "ALL=(ALL) NOPASSWD:ALL"
    ssh_authorized_keys:
      - $(cat "$work/id.pub")
EOF
        cat >"$work/$name-seed/network-config" <<EOF
version: 2
ethernets:
  eth0:
    match:
      macaddress: "$mac"
    set-name: eth0
    addresses: [$ip/24]
    gateway4: $net.1
EOF
        genisoimage -quiet -output "$work/$name-seed.iso" -volid cidata -joliet -rock \
            "$work/$name-seed/meta-data" "$work/$name-seed/user-data" "$work/$name-seed/network-config"
        cat >"$work/$name.xml" <<EOF
<domain type="qemu">
  <name>$name</name>
  <memory unit="MiB">$mem</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch="x86_64" machine="q35">hvm</type>
    <kernel>$img/vmlinuz</kernel>
    <initrd>$img/initrd.img</initrd>
    <cmdline>root=/dev/vda rw console=ttyS0,115200 net.ifnames=0</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <devices>
    <disk type="file" device="disk">
      <driver name="qemu" type="qcow2"/>
      <source file="$work/$name.qcow2"/>
      <target dev="vda" bus="virtio"/>
    </disk>
    <controller type="scsi" model="virtio-scsi"/>
    <disk type="file" device="cdrom">
      <driver name="qemu" type="raw"/>
      <source file="$work/$name-seed.iso"/>
      <target dev="sda" bus="scsi"/>
      <readonly/>
    </disk>
    <interface type="bridge">
      <mac address="$mac"/>
      <source bridge="$br"/>
      <model type="virtio"/>
    </interface>
    <serial type="file">
      <source path="$work/$name.console.log"/>
    </serial>
    <rng model="virtio"><backend model="random">/dev/urandom</backend></rng>
  </devices>
</domain>
EOF
        virsh define "$work/$name.xml" >/dev/null
        virsh start "$name" >/dev/null
    done
    local start=$SECONDS
    poll_logins "$work/id" "$user" "$net" "$n" "$prefix" "$start" "${BASELINE_TIMEOUT:-900}" \
        "console: $work/{node}.console.log"
}

down() {
    local work=$1 d
    for d in $(virsh list --all --name); do
        [[ $d == "$prefix"* ]] || continue
        virsh destroy "$d" >/dev/null 2>&1 || true
        virsh undefine "$d" >/dev/null
    done
    ip link del "$br" 2>/dev/null || true
    rm -rf -- "$work"
}

case ${1:-} in
up) shift; up "$@" ;;
down) shift; down "$@" ;;
*) echo "usage: $0 up WORK N IMAGE_DIR MEMORY_MIB | down WORK" >&2; exit 2 ;;
esac
