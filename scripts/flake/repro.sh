#!/bin/sh
# Repeat the phases of tests/guest/workload.sh leading to the parallel writers,
# ITERS times in one boot, each in a fresh directory; stop at the first
# "is not a head" in dmesg.
M=$1
ITERS=$(sed -n 's/.*repro.iters=\([0-9]*\).*/\1/p' /proc/cmdline)
[ -n "$ITERS" ] || ITERS=100
BIG=$(sed -n 's/.*repro.big=\([0-9]*\).*/\1/p' /proc/cmdline)
[ -n "$BIG" ] || BIG=16
echo "REPRO-BEGIN iters=$ITERS big=$BIG"
n=1
while [ $n -le $ITERS ]; do
    D=$M/it$n
    mkdir $D
    if [ "$BIG" -gt 0 ]; then
        dd if=/dev/urandom of=$D/big.bin bs=1M count=$BIG 2>/dev/null
        sum1=$(sha256sum $D/big.bin | cut -d' ' -f1)
        sync
        echo 3 > /proc/sys/vm/drop_caches
        sum2=$(sha256sum $D/big.bin | cut -d' ' -f1)
        [ "$sum1" = "$sum2" ] || echo "REPRO-BADSUM $n"
    fi
    mkdir $D/many
    i=0
    while [ $i -lt 300 ]; do echo "small file $i" > $D/many/f$i; i=$((i + 1)); done
    mkdir $D/par
    for w in 1 2 3 4; do
        (
            j=0
            while [ $j -lt 40 ]; do
                echo "writer $w line $j" >> $D/par/log$w
                echo "writer $w file $j" > $D/par/w${w}_$j
                j=$((j + 1))
            done
        ) &
    done
    wait
    c=$(ls $D/par | wc -l)
    [ "$c" = 164 ] || echo "REPRO-BADCOUNT $n $c"
    if dmesg | grep -q "not a head"; then
        echo "REPRO-NOTAHEAD iter=$n"
        dmesg | tail -n 30
        break
    fi
    rm -rf $D
    echo "REPRO-ITER $n $(cut -d' ' -f1 /proc/uptime)"
    n=$((n + 1))
done
echo "REPRO-END"
