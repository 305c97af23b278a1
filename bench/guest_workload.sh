#!/bin/sh
# The benchmark's guest half: timed phases over a virtio-fs mount, run by the
# test guest's init (tests/guest/init.sh) in place of its functional workload.
# One "BENCH phase seconds" line per phase between the report markers; time is
# read from /proc/uptime (10 ms steps: every phase here takes far longer).
M=$1
N=${BENCH_FILES:-500}
now() { cut -d' ' -f1 /proc/uptime; }
phase() {
    name=$1
    shift
    t0=$(now)
    if "$@" >/dev/null 2>&1; then
        echo "BENCH $name $(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }')"
    else
        echo "BENCHFAIL $name"
    fi
}
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
echo "ACTORFS-REPORT-BEGIN"
mkdir $M/meta
cd $M/meta
phase create sh -c "seq $N | sed s/^/f/ | xargs touch"
phase stat sh -c "ls -l . > /dev/null"
phase rename sh -c "for f in \$(seq $N); do mv f\$f g\$f; done"
phase unlink sh -c "rm -f g*"
cd /
phase seq_write dd if=/dev/zero of=$M/seq.bin bs=1M count=64 conv=fsync
drop
phase seq_read dd if=$M/seq.bin of=/dev/null bs=1M
mkdir $M/x
phase extract tar -xf $M/small.tar -C $M/x
drop
phase read_back sh -c "find $M/x -type f | xargs cat > /dev/null"
echo "ACTORFS-REPORT-END"
