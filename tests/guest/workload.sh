#!/bin/sh
# The guest workload over a virtio-fs mount. One line per check ("OK name" or
# "FAIL name: detail"), facts for the host to verify ("FACT key value"), and a
# RESULT line; the host test reads them from the serial console.
M=$1
pass=0
fail=0
t() {
    name=$1
    shift
    if "$@"; then echo "OK $name"; pass=$((pass + 1)); else echo "FAIL $name: $*"; fail=$((fail + 1)); fi
}
eq() { [ "$1" = "$2" ] || { echo "  got [$1] want [$2]"; return 1; }; }

echo "ACTORFS-REPORT-BEGIN"

# files the host put there
t read_host_file eq "$(cat $M/from_host.txt)" "written by the host"
t list_root sh -c "ls $M | grep -qx from_host.txt"

# create, read, overwrite (shorter: truncation), append
echo "first version of the file" > $M/created.txt
t create_read eq "$(cat $M/created.txt)" "first version of the file"
echo "second" > $M/created.txt
t overwrite_truncates eq "$(cat $M/created.txt)" "second"
t overwrite_size eq "$(stat -c %s $M/created.txt)" 7
echo "more" >> $M/created.txt
t append eq "$(cat $M/created.txt)" "$(printf 'second\nmore')"

# directories
mkdir -p $M/dir/sub/deeper
t mkdir_nested test -d $M/dir/sub/deeper
rmdir $M/dir/sub/deeper
t rmdir eq "$(ls $M/dir/sub | wc -l)" 0
t rmdir_non_empty_refused sh -c "! rmdir $M/dir 2>/dev/null"

# rename, also over an existing file and of a directory
echo "moving" > $M/mv_src
mv $M/mv_src $M/mv_dst
t rename sh -c "[ ! -e $M/mv_src ] && [ \"\$(cat $M/mv_dst)\" = moving ]"
echo "old target" > $M/victim
echo "replacement" > $M/winner
mv $M/winner $M/victim
t rename_over_existing sh -c "[ ! -e $M/winner ] && [ \"\$(cat $M/victim)\" = replacement ]"
mv $M/dir/sub $M/dir/renamed_sub
t rename_dir test -d $M/dir/renamed_sub

# symlink, readlink, hard link
ln -s created.txt $M/link
t symlink_readlink eq "$(readlink $M/link)" "created.txt"
t symlink_follow eq "$(head -n 1 $M/link)" "second"
ln $M/created.txt $M/hard
t hardlink_nlink eq "$(stat -c %h $M/created.txt)" 2
t hardlink_same_inode eq "$(stat -c %i $M/hard)" "$(stat -c %i $M/created.txt)"

# links served as links whatever the target (a venv's bin/python), fifos,
# the overlayfs whiteout (c 0 0), and rm -rf of all of it
mkdir -p $M/venv/bin $M/special
ln -s /usr/bin/python3 $M/venv/bin/python
ln -s python $M/venv/bin/python3
ln -s ../../nowhere/at/all $M/venv/bin/dangling
t abs_link_readlink eq "$(readlink $M/venv/bin/python)" "/usr/bin/python3"
t abs_link_lstat eq "$(stat -c %F $M/venv/bin/python)" "symbolic link"
t abs_link_listed eq "$(ls $M/venv/bin | wc -l)" 3
mkfifo $M/special/fifo
t mkfifo eq "$(stat -c %F $M/special/fifo)" "fifo"
mknod $M/special/wh c 0 0
t mknod_whiteout eq "$(stat -c %F:%t:%T $M/special/wh)" "character special file:0:0"
ln -s /etc/passwd $M/special/abs
ln $M/special/abs $M/special/abs_hard
t link_of_abs_link eq "$(stat -c %h $M/special/abs)" 2
mv $M/special/abs_hard $M/venv/moved_link
t rename_abs_link eq "$(readlink $M/venv/moved_link)" "/etc/passwd"
mkdir -p $M/doomed_tree
cp -a $M/venv $M/special $M/doomed_tree/
rm -rf $M/doomed_tree
t rm_rf_links_and_specials test ! -e $M/doomed_tree

# chmod, chown, utime
echo "attrs" > $M/attrs
chmod 640 $M/attrs
t chmod eq "$(stat -c %a $M/attrs)" 640
chown 1234:2345 $M/attrs
t chown eq "$(stat -c %u:%g $M/attrs)" "1234:2345"
touch -t 200102030405.06 $M/attrs
t utime eq "$(stat -c %Y $M/attrs)" 981173106

# unlink
echo "bye" > $M/doomed
rm $M/doomed
t unlink test ! -e $M/doomed

# a large file, checksummed here and (after the caches are dropped) again
dd if=/dev/urandom of=$M/big.bin bs=1M count=16 2>/dev/null
sum1=$(sha256sum $M/big.bin | cut -d' ' -f1)
sync
echo 3 > /proc/sys/vm/drop_caches
sum2=$(sha256sum $M/big.bin | cut -d' ' -f1)
t big_file_reread eq "$sum1" "$sum2"
t big_file_size eq "$(stat -c %s $M/big.bin)" 16777216
echo "FACT big.bin $sum1"

# many small files
mkdir $M/many
i=0
while [ $i -lt 300 ]; do echo "small file $i" > $M/many/f$i; i=$((i + 1)); done
t many_files_count eq "$(ls $M/many | wc -l)" 300
t many_files_content eq "$(cat $M/many/f123)" "small file 123"

# several processes writing at once
mkdir $M/par
for w in 1 2 3 4; do
    (
        j=0
        while [ $j -lt 40 ]; do
            echo "writer $w line $j" >> $M/par/log$w
            echo "writer $w file $j" > $M/par/w${w}_$j
            j=$((j + 1))
        done
    ) &
done
wait
t parallel_files eq "$(ls $M/par | wc -l)" 164
t parallel_logs eq "$(cat $M/par/log1 $M/par/log2 $M/par/log3 $M/par/log4 | wc -l)" 160

t statfs sh -c "df $M >/dev/null"

# a tree the host prepared (tree.count files under tree/), walked twice with the
# guest's caches dropped between: the backend may hold fewer fds than files
if [ -f $M/tree.count ]; then
    want=$(cat $M/tree.count)
    t tree_find eq "$(find $M/tree -type f | wc -l)" "$want"
    t tree_ls_lR sh -c "ls -lR $M/tree >/dev/null"
    echo 3 > /proc/sys/vm/drop_caches
    t tree_find_after_drop eq "$(find $M/tree -type f | wc -l)" "$want"
    t tree_ls_lR_after_drop sh -c "ls -lR $M/tree >/dev/null"
fi

echo "RESULT pass=$pass fail=$fail"
echo "ACTORFS-REPORT-END"
