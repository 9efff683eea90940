#!/usr/bin/env bash
# Build the offline kthw-lab base image from Debian packages alone (no cloud image
# download): a plain ext4 filesystem image (no partition table, no bootloader) booted
# with libvirt direct kernel boot.
#
#   images/kthw-debian12/build.sh OUTDIR
#
# Writes OUTDIR/disk.qcow2, OUTDIR/vmlinuz, OUTDIR/initrd.img and OUTDIR/manifest.json.
# Idempotent: when OUTDIR already holds a complete build of this very recipe (same
# sha256 of this script), it does nothing. Needs root, mmdebstrap, e2fsprogs, qemu-utils.
# Env: KTHW_MIRROR (default http://deb.debian.org/debian), KTHW_IMAGE_FS_GIB (2),
# KTHW_APT_CACHE (downloaded .debs kept between builds; default OUTDIR/.apt-cache,
# "none" to disable).
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
outdir=$1
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
recipe_sha=$(sha256sum "$here/build.sh" | cut -d' ' -f1)
mirror=${KTHW_MIRROR:-http://deb.debian.org/debian}
fs_gib=${KTHW_IMAGE_FS_GIB:-2}
apt_cache=${KTHW_APT_CACHE:-}

for tool in mmdebstrap mkfs.ext4 qemu-img sha256sum; do
    command -v "$tool" >/dev/null || { echo "build.sh: missing program: $tool" >&2; exit 3; }
done
if [[ $(id -u) -ne 0 ]]; then
    echo "build.sh: must run as root (mmdebstrap --mode=root)" >&2
    exit 3
fi

mkdir -p "$outdir"
outdir=$(cd "$outdir" && pwd)
if [[ -f $outdir/manifest.json && -f $outdir/disk.qcow2 && -f $outdir/vmlinuz && -f $outdir/initrd.img ]] &&
    grep -q "\"recipe_sha256\": \"$recipe_sha\"" "$outdir/manifest.json"; then
    echo "build.sh: $outdir is up to date (recipe $recipe_sha)"
    exit 0
fi

[[ -z $apt_cache ]] && apt_cache=$outdir/.apt-cache
cache_opts=()
if [[ $apt_cache != none ]]; then
    mkdir -p "$apt_cache"
    apt_cache=$(cd "$apt_cache" && pwd)
    # Reuse downloaded packages (mmdebstrap(1), sync-in/sync-out): a rebuild then needs
    # the mirror only for the package lists.
    cache_opts=(
        --skip=essential/unlink
        --setup-hook="mkdir -p \"\$1/var/cache/apt/archives/\""
        --setup-hook="sync-in $apt_cache /var/cache/apt/archives/"
        --customize-hook="sync-out /var/cache/apt/archives $apt_cache"
    )
fi

work=$(mktemp -d "$outdir/.build.XXXXXX")
cleanup() { rm -rf -- "$work"; }
trap cleanup EXIT
trap 'exit 130' INT TERM
start=$(date +%s)

rootfs=$work/rootfs
mkdir "$rootfs"

packages=(
    linux-image-cloud-amd64 initramfs-tools systemd-sysv udev dbus
    openssh-server sudo iproute2 iputils-ping ca-certificates cloud-init
    etcd-server etcd-client containerd runc containernetworking-plugins
    conntrack socat iptables ipset kmod procps e2fsprogs
)

# Modules the guest needs before its root is mounted. A hook (not a conffile of any
# package) so it is in place when the kernel's postinst first runs mkinitramfs.
read -r -d '' initramfs_hook <<'HOOK' || true
#!/bin/sh
[ "$1" = prereqs ] && exit 0
. /usr/share/initramfs-tools/hook-functions
manual_add_modules virtio_pci virtio_blk virtio_net virtio_console ext4 vfat nls_cp437 nls_ascii
HOOK

# The lean first boot (first_boot: kthw-seed in images/kthw-debian12.yaml). The tool boots
# the image with `cloud-init=disabled` and a seed whose kthw/ directory holds the node's
# facts as plain files. The initrd installs them into the root filesystem before systemd
# starts, so the first boot runs no Python and waits for no device but the root disk.
# Booted without cloud-init=disabled, or with a seed without kthw/ (or no seed), it
# leaves the root untouched: cloud-init then works as in a stock cloud image.
read -r -d '' initrd_seed <<'SCRIPT' || true
#!/bin/sh
# kthw-lab: apply the node's seed (second virtio disk, FAT, kthw/ directory).
case "$1" in prereqs) exit 0 ;; esac
. /scripts/functions
# Only when booted for the lean path; otherwise cloud-init owns the first boot.
case " $(cat /proc/cmdline) " in *" cloud-init=disabled "*) ;; *) exit 0 ;; esac
dev=/dev/vdb
[ -b "$dev" ] || exit 0
modprobe -q vfat || true
mnt="${rootmnt}/mnt"
mount -t vfat -o ro "$dev" "$mnt" 2>/dev/null || exit 0
if [ -d "$mnt/kthw" ]; then
    if chroot "${rootmnt}" /usr/libexec/kthw/apply-seed /mnt/kthw; then
        log_success_msg "kthw-seed: applied"
        # The NIC has its address (a seed with `mac` has it applied): systemd-networkd
        # is not needed on this boot. /run moves into the booted system.
        if [ -f "$mnt/kthw/mac" ]; then
            mkdir -p /run/kthw
            : >/run/kthw/network-from-seed
        fi
        # In the kernel log too, so the journal shows when the node was configured.
        echo "kthw-seed: applied" >/dev/kmsg || true
    else
        log_failure_msg "kthw-seed: apply-seed failed"
        echo "kthw-seed: apply-seed failed" >/dev/kmsg || true
    fi
fi
umount "$mnt"
exit 0
SCRIPT

# Runs chrooted into the root filesystem from the initrd (no /proc, /dev or /sys there):
# installs hostname, hosts, resolver, network, host key and the lab user, and gives the
# NIC its address and default route (netlink needs none of those mounts), so the node
# answers before systemd starts anything: no systemd-networkd on this path. Every boot,
# idempotently, so a changed seed takes effect on the next boot.
read -r -d '' apply_seed <<'SCRIPT' || true
#!/bin/sh
set -eu
seed=$1
install -m 0644 "$seed/hostname" /etc/hostname
install -m 0644 "$seed/hosts" /etc/hosts
rm -f /etc/resolv.conf
install -m 0644 "$seed/resolv.conf" /etc/resolv.conf
install -D -m 0644 "$seed/eth0.network" /etc/systemd/network/10-kthw-eth0.network
install -m 0600 "$seed/ssh_host_ed25519_key" /etc/ssh/ssh_host_ed25519_key
install -m 0644 "$seed/ssh_host_ed25519_key.pub" /etc/ssh/ssh_host_ed25519_key.pub
user=$(cat "$seed/user")
case "$user" in ""|*[!a-z0-9_-]*) echo "apply-seed: bad user name" >&2; exit 1 ;; esac
if [ -z "$(getent passwd "$user" || true)" ]; then
    useradd --create-home --shell /bin/bash "$user"
fi
printf '%s ALL=(ALL) NOPASSWD:ALL\n' "$user" >/etc/sudoers.d/90-kthw-user
chmod 0440 /etc/sudoers.d/90-kthw-user
home=$(getent passwd "$user" | cut -d: -f6)
install -d -m 0700 -o "$user" -g "$user" "$home/.ssh"
install -m 0600 -o "$user" -g "$user" "$seed/authorized_keys" "$home/.ssh/authorized_keys"
# The NIC with the planned MAC: up, the planned address, the default route; no IPv6
# link-local address (as LinkLocalAddressing=no in eth0.network). A seed without these
# facts (an older kthw-lab's) leaves the network to systemd-networkd and eth0.network.
[ -f "$seed/mac" ] || exit 0
mac=$(cat "$seed/mac")
dev=$(ip -o link | awk -v m="$mac" 'index(tolower($0), "link/ether " tolower(m) " ") { sub(":", "", $2); print $2; exit }')
if [ -z "$dev" ]; then
    echo "apply-seed: no network interface has MAC $mac" >&2
    exit 1
fi
ip link set dev "$dev" addrgenmode none
ip link set dev "$dev" up
ip address replace "$(cat "$seed/address")" dev "$dev"
ip route replace default via "$(cat "$seed/gateway")" dev "$dev"
SCRIPT

# Grow the root filesystem to the node's overlay size, off the path to the first login
# (cloud-init does this itself when it runs).
read -r -d '' growfs_unit <<'UNIT' || true
[Unit]
Description=Grow the root filesystem to its disk (kthw-lab lean boot)
ConditionKernelCommandLine=cloud-init=disabled
After=local-fs.target

[Service]
Type=oneshot
ExecStart=/sbin/resize2fs /dev/vda

[Install]
WantedBy=multi-user.target
UNIT

# sshd as soon as the journal can take its messages, not after sysinit.target and
# network.target: on the lean path the initrd already gave the NIC its address, and under
# emulation sysinit alone takes several seconds. The stock unit otherwise, but without
# its `sshd -t` check before every start (the configuration is fixed at build time, and
# under emulation that check costs a second). On the cloud-init path, cloud-init.service
# still orders itself before sshd.service (host keys and the user come from it).
# (A larger CPU share for sshd while booting, StartupCPUWeight=, brought the first login
# closer still, but its sessions are the tool's commands, which then starved etcd: the
# whole create took longer. Left out.)
read -r -d '' ssh_unit <<'UNIT' || true
[Unit]
Description=OpenBSD Secure Shell server (kthw-lab: started early)
Documentation=man:sshd(8) man:sshd_config(5)
DefaultDependencies=no
After=systemd-journald.socket auditd.service
Conflicts=shutdown.target
Before=shutdown.target
ConditionPathExists=!/etc/ssh/sshd_not_to_be_run

[Service]
EnvironmentFile=-/etc/default/ssh
ExecStart=/usr/sbin/sshd -D $SSHD_OPTS
ExecReload=/usr/sbin/sshd -t
ExecReload=/bin/kill -HUP $MAINPID
KillMode=process
Restart=on-failure
RestartPreventExitStatus=255
Type=notify
RuntimeDirectory=sshd
RuntimeDirectoryMode=0755

[Install]
WantedBy=multi-user.target
Alias=sshd.service
UNIT

# systemd-networkd only where the initrd did not give the NIC its address (cloud-init
# boots, which write a .network file, or a seed without the address facts). Under
# emulation networkd took 4 s of CPU to start.
read -r -d '' networkd_dropin <<'UNIT' || true
[Unit]
ConditionPathExists=!/run/kthw/network-from-seed
UNIT

# cloud-init: only the NoCloud seed, network written for systemd-networkd.
read -r -d '' cloud_cfg <<'CFG' || true
datasource_list: [NoCloud, None]
system_info:
  network:
    renderers: [networkd]
locale: false
resize_rootfs: noblock
CFG

printf '%s\n' "$initrd_seed" >"$work/kthw-seed.initrd"
printf '%s\n' "$apply_seed" >"$work/apply-seed"
printf '%s\n' "$growfs_unit" >"$work/kthw-growfs.service"
printf '%s\n' "$ssh_unit" >"$work/ssh.service"
printf '%s\n' "$networkd_dropin" >"$work/networkd-lean.conf"
echo "build.sh: mmdebstrap bookworm -> $rootfs"
mmdebstrap --variant=minbase --mode=root --format=directory \
    --aptopt='Apt::Install-Recommends "false"' \
    --dpkgopt='force-unsafe-io' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --include="$(IFS=,; echo "${packages[*]}")" \
    "${cache_opts[@]}" \
    --essential-hook="mkdir -p \"\$1/etc/initramfs-tools/hooks\" && printf '%s\n' '$initramfs_hook' > \"\$1/etc/initramfs-tools/hooks/kthw-virtio\" && chmod 755 \"\$1/etc/initramfs-tools/hooks/kthw-virtio\"" \
    --essential-hook='mkdir -p "$1/etc/initramfs-tools/scripts/local-bottom"' \
    --essential-hook="upload $work/kthw-seed.initrd /etc/initramfs-tools/scripts/local-bottom/kthw-seed" \
    --essential-hook='chmod 0755 "$1/etc/initramfs-tools/scripts/local-bottom/kthw-seed"' \
    --customize-hook="printf '%s\n' '$cloud_cfg' > \"\$1/etc/cloud/cloud.cfg.d/90-kthw.cfg\"" \
    --customize-hook='mkdir -p "$1/usr/libexec/kthw" "$1/etc/systemd/system/systemd-networkd.service.d" "$1/etc/systemd/system/systemd-networkd.socket.d"' \
    --customize-hook="upload $work/apply-seed /usr/libexec/kthw/apply-seed" \
    --customize-hook='chmod 0755 "$1/usr/libexec/kthw/apply-seed"' \
    --customize-hook="upload $work/kthw-growfs.service /etc/systemd/system/kthw-growfs.service" \
    --customize-hook='chroot "$1" systemctl enable kthw-growfs.service' \
    --customize-hook="upload $work/ssh.service /etc/systemd/system/ssh.service" \
    --customize-hook="upload $work/networkd-lean.conf /etc/systemd/system/systemd-networkd.service.d/50-kthw-lean.conf" \
    --customize-hook="upload $work/networkd-lean.conf /etc/systemd/system/systemd-networkd.socket.d/50-kthw-lean.conf" \
    --customize-hook='sed -i "s/^session.*pam_motd\.so.*/# kthw-lab: no motd scripts at every login: &/" "$1/etc/pam.d/sshd"' \
    --customize-hook='ln -sf /dev/null "$1/etc/tmpfiles.d/systemd-nologin.conf"' \
    --customize-hook='printf "/dev/vda / ext4 rw,relatime 0 0\n" > "$1/etc/fstab"' \
    --customize-hook='chroot "$1" systemctl enable systemd-networkd.service' \
    --customize-hook='chroot "$1" systemctl mask e2scrub_reap.service e2scrub_all.timer apt-daily.timer apt-daily-upgrade.timer fstrim.timer dpkg-db-backup.timer systemd-networkd-wait-online.service' \
    --customize-hook='chroot "$1" systemctl mask systemd-update-utmp.service systemd-update-utmp-runlevel.service systemd-sysusers.service modprobe@drm.service modprobe@efi_pstore.service modprobe@fuse.service modprobe@dm_mod.service sys-kernel-debug.mount sys-kernel-tracing.mount dev-hugepages.mount systemd-binfmt.service proc-sys-fs-binfmt_misc.automount getty@tty1.service systemd-user-sessions.service systemd-logind.service systemd-network-generator.service systemd-random-seed.service systemd-remount-fs.service modprobe@configfs.service sys-kernel-config.mount' \
    --customize-hook='chroot "$1" systemctl disable etcd.service containerd.service' \
    --customize-hook='rm -f "$1"/etc/ssh/ssh_host_*' \
    --customize-hook='printf "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin no\nHostKey /etc/ssh/ssh_host_ed25519_key\n" > "$1/etc/ssh/sshd_config.d/50-kthw.conf"' \
    --customize-hook=': > "$1/etc/machine-id"; rm -f "$1/var/lib/dbus/machine-id"' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/log/*.log' \
    --customize-hook='echo kthw > "$1/etc/hostname"' \
    bookworm "$rootfs" "$mirror"
debootstrap_done=$(date +%s)

kernel=$(find "$rootfs/boot" -maxdepth 1 -name 'vmlinuz-*' | sort | tail -n1)
initrd=$(find "$rootfs/boot" -maxdepth 1 -name 'initrd.img-*' | sort | tail -n1)
[[ -n $kernel && -n $initrd ]] || { echo "build.sh: no kernel or initrd in $rootfs/boot" >&2; exit 1; }
kver=${kernel##*/vmlinuz-}
in_initrd=$(chroot "$rootfs" lsinitramfs "/boot/${initrd##*/}")
for m in virtio_blk virtio_net ext4 vfat; do
    if ! grep -q "/$m\.ko" <<<"$in_initrd" &&
        ! grep -q "/$m\.ko\$" "$rootfs/lib/modules/$kver/modules.builtin"; then
        echo "build.sh: module $m is neither in the initrd nor built into $kver" >&2
        exit 1
    fi
done
# The lean first boot needs its script and a chroot in the initrd.
for f in 'scripts/local-bottom/kthw-seed' 'bin/chroot'; do
    grep -q "$f\$" <<<"$in_initrd" || { echo "build.sh: the initrd lacks $f" >&2; exit 1; }
done
cp "$kernel" "$work/vmlinuz"
cp "$initrd" "$work/initrd.img"
chmod 0644 "$work/vmlinuz" "$work/initrd.img"

version() { chroot "$rootfs" dpkg-query -W -f='${Version}' "$1" 2>/dev/null || echo unknown; }
versions=""
for p in linux-image-cloud-amd64 systemd openssh-server cloud-init etcd-server containerd runc containernetworking-plugins iptables; do
    versions+="    \"$p\": \"$(version "$p")\","$'\n'
done
versions=${versions%,$'\n'}

echo "build.sh: mkfs.ext4 -d (${fs_gib} GiB sparse) + qemu-img convert"
truncate -s "${fs_gib}G" "$work/disk.raw"
mkfs.ext4 -q -F -L kthw-root -E lazy_itable_init=1,lazy_journal_init=1 -d "$rootfs" "$work/disk.raw"
rootfs_mib=$(du -sm "$rootfs" | cut -f1)
rm -rf -- "$rootfs"
qemu-img convert -f raw -O qcow2 "$work/disk.raw" "$work/disk.qcow2"
rm -f "$work/disk.raw"
end=$(date +%s)

size() { stat -c %s "$1"; }
cat > "$work/manifest.json" <<JSON
{
  "name": "kthw-debian12",
  "suite": "bookworm",
  "boot": "direct-kernel",
  "kernel_version": "$kver",
  "cmdline": "root=/dev/vda rw console=ttyS0,115200 net.ifnames=0",
  "recipe_sha256": "$recipe_sha",
  "built_at": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
  "build_seconds": $((end - start)),
  "mmdebstrap_seconds": $((debootstrap_done - start)),
  "rootfs_mib": $rootfs_mib,
  "filesystem_gib": $fs_gib,
  "sizes": {
    "disk.qcow2": $(size "$work/disk.qcow2"),
    "vmlinuz": $(size "$work/vmlinuz"),
    "initrd.img": $(size "$work/initrd.img")
  },
  "versions": {
$versions
  }
}
JSON

# Publish: manifest last, so a complete manifest means a complete build.
rm -f "$outdir/manifest.json"
for f in disk.qcow2 vmlinuz initrd.img manifest.json; do
    mv -f "$work/$f" "$outdir/$f"
done
if [[ $apt_cache != none ]]; then
    # Keep only the newest version of each package in the cache.
    find "$apt_cache" -maxdepth 1 -name '*.deb' -printf '%f\n' | sort -V |
        awk -F_ '{ if ($1 == prev) print last; prev = $1; last = $0 }' |
        while read -r old; do rm -f -- "$apt_cache/$old"; done
fi
echo "build.sh: done in $((end - start)) s -> $outdir"
