#!/usr/bin/env bash
# The offline base image as a disk that boots by itself under a PC BIOS, for tools that
# can only boot a VM from its disk (virt-lightning: `<boot dev='hd'/>`, SeaBIOS).
#
#   bootable-disk.sh IMAGE_DIR OUT.qcow2
#
# IMAGE_DIR is the cached kthw-debian12 image (disk.qcow2: a bare ext4 filesystem,
# vmlinuz, initrd.img). OUT gets an MBR disk with the very same bits inside:
#   p1  FAT16, 64 MiB, bootable: syslinux, the image's vmlinuz and initrd.img
#   p2  the image's ext4 root filesystem, byte for byte
# and the kernel command line of the tutorial baseline (cloud-init configures the
# guest), with root=/dev/vda2. Nothing is mounted: sfdisk writes the table, mkfs.fat and
# mtools write the FAT partition at its offset, syslinux installs through mtools, dd
# places the root filesystem. Needs fdisk, dosfstools, mtools, syslinux, syslinux-common,
# qemu-utils. Idempotent: an OUT newer than the image's disk.qcow2 is left alone.
set -euo pipefail

if [[ $# -ne 2 ]]; then
    echo "usage: $0 IMAGE_DIR OUT.qcow2" >&2
    exit 2
fi
img=$1
out=$2
for tool in sfdisk mkfs.fat mcopy syslinux qemu-img dd; do
    command -v "$tool" >/dev/null || { echo "bootable-disk.sh: missing program: $tool" >&2; exit 3; }
done
mbr=/usr/lib/syslinux/mbr/mbr.bin
[[ -f $mbr ]] || { echo "bootable-disk.sh: missing $mbr (package syslinux-common)" >&2; exit 3; }
if [[ -f $out && $out -nt $img/disk.qcow2 ]]; then
    exit 0
fi

work=$(mktemp -d "$(dirname "$out")/.bootable.XXXXXX")
trap 'rm -rf -- "$work"' EXIT

boot_mib=64
root_bytes=$(qemu-img info --output=json "$img/disk.qcow2" | sed -n 's/.*"virtual-size": \([0-9]*\).*/\1/p')
[[ -n $root_bytes ]] || { echo "bootable-disk.sh: cannot read the size of $img/disk.qcow2" >&2; exit 1; }
boot_start=2048                                   # sectors: 1 MiB
root_start=$((boot_start + boot_mib * 2048))
raw=$work/disk.raw
truncate -s $(((root_start * 512) + root_bytes)) "$raw"
sfdisk --quiet --no-reread --no-tell-kernel "$raw" <<EOF
label: dos
start=$boot_start, size=$((boot_mib * 2048)), type=e, bootable
start=$root_start, size=$((root_bytes / 512)), type=83
EOF
dd if="$mbr" of="$raw" bs=440 count=1 conv=notrunc status=none

mkfs.fat -F 16 --offset=$boot_start -n KTHWBOOT "$raw" $((boot_mib * 1024)) >/dev/null 2>&1
cat >"$work/syslinux.cfg" <<EOF
DEFAULT kthw
PROMPT 0
TIMEOUT 0
LABEL kthw
  LINUX /vmlinuz
  INITRD /initrd.img
  APPEND root=/dev/vda2 rw console=ttyS0,115200 net.ifnames=0
EOF
fat="$raw@@$((boot_start * 512))"
mcopy -i "$fat" "$img/vmlinuz" ::/vmlinuz
mcopy -i "$fat" "$img/initrd.img" ::/initrd.img
mcopy -i "$fat" "$work/syslinux.cfg" ::/syslinux.cfg
syslinux --install --offset $((boot_start * 512)) "$raw"

qemu-img convert -f qcow2 -O raw "$img/disk.qcow2" "$work/root.raw"
dd if="$work/root.raw" of="$raw" bs=1M seek=$((root_start / 2048)) conv=notrunc,sparse status=none
rm -f "$work/root.raw"
qemu-img convert -f raw -O qcow2 "$raw" "$work/out.qcow2"
mv "$work/out.qcow2" "$out"
