#!/bin/busybox sh
# PID 1 of the test guest: load the virtio-fs modules, mount, run the workload, power off.
echo "ACTORFS-INIT"  # the kernel booted (tests/guest/run.py waits for this line)
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules/order); do
    insmod "/modules/$m" || echo "ACTORFS-INSMOD-FAIL $m"
done
mkdir -p /mnt
if mount -t virtiofs actorfs /mnt; then
    echo "ACTORFS-MOUNTED"
    # actorfs.reboot=1: the first boot reboots at once, still mounted (no DESTROY),
    # so the second boot's INIT arrives on a session the backend thinks is live.
    if grep -q actorfs.reboot=1 /proc/cmdline && [ ! -e /mnt/.rebooted ]; then
        echo "first boot" > /mnt/.rebooted
        sync
        echo "ACTORFS-REBOOTING"
        reboot -f
    fi
    sh /workload.sh /mnt
    cd /
    sync
    if umount /mnt; then echo "ACTORFS-UMOUNTED"; else echo "ACTORFS-UMOUNT-FAIL"; fi
else
    echo "ACTORFS-MOUNT-FAIL"
fi
poweroff -f
