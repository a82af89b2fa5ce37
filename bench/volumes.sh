# Volume figures: sequential write and read of a 64 MiB file and creating
# 2,000 empty files, on a bind mount (virtio-fs), a named volume (ext4 on
# virtio-blk) and the container's own root (overlay on its scratch disk),
# each beside the same work on the (emulated) host's own file system, the
# directory the bind mount shares. Run by `./dev bench volumes` inside the
# emulated KVM host. 64 MiB, not 256: under TCG a 256 MiB pass takes minutes.

SIZE_MB=64
FILES=2000
N=$((RUNS < 3 ? RUNS : 3))
mkdir -p /srv/bench-share
# One timed pass over directory $1: "write read files" seconds. The same
# function runs on the host and in the container (busybox in both).
PASS='p() {
	t() { a=$(cut -d" " -f1 /proc/uptime); "$@" >/dev/null 2>&1; b=$(cut -d" " -f1 /proc/uptime); awk -v a="$a" -v b="$b" "BEGIN { printf \"%.2f\", b - a }"; }
	mkdir -p "$1/w"
	w=$(t dd if=/dev/zero of="$1/w/big" bs=1M count='$SIZE_MB' conv=fsync)
	r=$(t dd if="$1/w/big" of=/dev/null bs=1M)
	f=$(t sh -c "mkdir $1/w/s && cd $1/w/s && seq 1 '$FILES' | xargs touch && sync")
	rm -rf "$1/w"
	echo "$w $r $f"
}'
eval "$PASS"
hull volume create bench-vol >/dev/null
hull run --rm --network none busybox true >/dev/null 2>&1 # the built-in image and its disk
hw= hr= hf= bw= br= bf= vw= vr= vf= rw= rr= rf=
for i in $(seq "$N"); do
	set -- $(p /srv/bench-share)
	hw="$hw $1" hr="$hr $2" hf="$hf $3"
	out=$(hull run --rm --network none -v /srv/bench-share:/b -v bench-vol:/v busybox sh -c "$PASS"'
		echo "B $(p /b)"; echo "V $(p /v)"; echo "R $(p /r)"')
	echo "$out"
	[ -n "$out" ] || echo "the container run failed"
	set -- $(echo "$out" | grep '^B ')
	bw="$bw $2" br="$br $3" bf="$bf $4"
	set -- $(echo "$out" | grep '^V ')
	vw="$vw $2" vr="$vr $3" vf="$vf $4"
	set -- $(echo "$out" | grep '^R ')
	rw="$rw $2" rr="$rr $3" rf="$rf $4"
done
echo "host:$hw /$hr /$hf; bind:$bw /$br /$bf; volume:$vw /$vr /$vf; root:$rw /$rr /$rf"
how="in the container vs on the emulated host's own file system (RAM), median of $N"
row "write ${SIZE_MB} MiB (dd bs=1M, fsync), bind mount" "$(median $bw)" "$(median $hw)" "virtio-fs (virtiofsd, cache=auto) $how" s
row "write ${SIZE_MB} MiB, named volume" "$(median $vw)" "$(median $hw)" "ext4 on virtio-blk, $how" s
row "write ${SIZE_MB} MiB, container root" "$(median $rw)" "$(median $hw)" "overlay on the scratch disk, $how" s
row "read ${SIZE_MB} MiB back, bind mount" "$(median $br)" "$(median $hr)" "right after the write (warm caches; cache=auto makes the guest re-read through virtio-fs after the reopen); $how" s
row "read ${SIZE_MB} MiB back, named volume" "$(median $vr)" "$(median $hr)" "as above" s
row "read ${SIZE_MB} MiB back, container root" "$(median $rr)" "$(median $hr)" "as above" s
row "create ${FILES} empty files, bind mount" "$(median $bf)" "$(median $hf)" "touch (xargs over seq), then sync; $how" s
row "create ${FILES} empty files, named volume" "$(median $vf)" "$(median $hf)" "as above" s
row "create ${FILES} empty files, container root" "$(median $rf)" "$(median $hf)" "as above" s
hull volume rm bench-vol >/dev/null
