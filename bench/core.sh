# Core figures: boot, container start, exec, stdout throughput, VMM memory,
# start at density. Run by `./dev bench core` inside the emulated KVM host.

CMDLINE="console=ttyS0 reboot=k panic=1 quiet no_timer_check"
K=/opt/hull/bzImage
I=/tmp/trivial.cpio
make_trivial_initrd "$I"
# microvm has no i8042, so the guest resets by triple fault there (reboot=t),
# which -no-reboot turns into QEMU's exit; hull takes the i8042 reset.
qemu_microvm() {
	qemu-system-x86_64 -M microvm -accel kvm -cpu host -m 256 -smp 1 \
		-nodefaults -no-user-config -display none -serial stdio -no-reboot \
		-kernel "$1" -initrd "$2" -append "$(echo "$CMDLINE" | sed 's/reboot=k/reboot=t/')"
}

# Boot to a trivial init and back: hull vs QEMU -M microvm (same bzImage,
# initrd, command line, 1 vCPU, 256 MiB), interleaved.
hb= qb= hv= h5=
for i in $(seq "$RUNS"); do
	hb="$hb $(elapsed hull boot --kernel "$K" --initrd "$I" --cmdline "$CMDLINE" --memory 256)"
	[ "$(last_rc)" = 0 ] || echo "hull boot failed ($(last_rc))"
	qb="$qb $(elapsed qemu_microvm "$K" "$I")"
	[ "$(last_rc)" = 0 ] || echo "qemu microvm failed ($(last_rc))"
	hv="$hv $(elapsed hull boot --kernel /opt/hull/vmlinux --initrd "$I" --cmdline "$CMDLINE" --memory 256)"
	# The peer of a container's start: the same boot with the memory a
	# container gets by default (the guest kernel's memory set-up grows
	# with it).
	h5="$h5 $(elapsed hull boot --kernel /opt/hull/vmlinux --initrd "$I" --cmdline "$CMDLINE" --memory 512)"
done
echo "boot samples: hull(bzImage)$hb; qemu$qb; hull(vmlinux)$hv; hull(vmlinux, 512 MiB)$h5"
boot=$(median $hv)
boot512=$(median $h5)
row "boot to init and back (bzImage)" "$(median $hb)" "$(median $qb)" "hull boot vs QEMU -M microvm, same kernel/initrd/cmdline, 1 vCPU, 256 MiB" s
row "boot to init and back (hull: vmlinux)" "$boot" "$(median $qb)" "as above; hull loads the ELF vmlinux (QEMU cannot without PVH)" s

# A cached image's container vs the boot it costs.
hull run --rm busybox true >/dev/null 2>&1 # builds the built-in image and its disk
rt=
for i in $(seq "$RUNS"); do rt="$rt $(elapsed hull run --rm busybox true)"; done
echo "run samples:$rt"
row "hull run --rm (cached image) true" "$(median $rt)" "$boot512" "peer: hull boot of a trivial init (vmlinux) with the container's default 512 MiB; target <= 1.2x" s

# First run of a new image (its disk built in a build-only VM) vs a cached one.
mkdir -p /tmp/img/bin
cp /bin/busybox /tmp/img/bin/ && ln -s busybox /tmp/img/bin/true && ln -s busybox /tmp/img/bin/sh
fr=
for i in $(seq "$RUNS"); do
	echo "$i" >/tmp/img/iteration
	tar -C /tmp/img -cf /tmp/img.tar .
	hull import /tmp/img.tar "bench-first-$i" >/dev/null 2>&1
	fr="$fr $(elapsed hull run --rm "bench-first-$i" /bin/true)"
done
echo "first-run samples:$fr"
row "first run of a new image (1 layer, 2 MB)" "$(median $fr)" "$(median $rt)" "peer: a later run of a cached image" s

# exec into a running container vs fork+exec timed inside the guest.
# `run -d` returns before the guest is up: the first exec waits for the boot,
# so time only execs into a container that already answered one.
hull run -d --name bench-exec busybox sleep 600 >/dev/null
for i in $(seq 60); do hull exec bench-exec true >/dev/null 2>&1 && break; sleep 0.5; done
et= cli=
for i in $(seq "$RUNS"); do
	et="$et $(elapsed hull exec bench-exec true)"
	cli="$cli $(elapsed hull --version)"
done
inside=$(hull exec bench-exec sh -c 'a=$(cut -d" " -f1 /proc/uptime); for i in $(seq 100); do /bin/true; done; b=$(cut -d" " -f1 /proc/uptime); awk -v a=$a -v b=$b "BEGIN { printf \"%.4f\", (b - a) / 100 }"')
echo "exec samples:$et; in-guest fork+exec: $inside s; hull --version (the CLI's own start):$cli"
row "hull exec C true" "$(median $et)" "$inside" "peer: one fork+exec of /bin/true timed inside the guest (100 runs); the hull CLI alone starts in $(median $cli) s here" s

# VMM memory beyond the guest's RAM: hull's VMM process (`hull __vmm`, the
# monitor's child) with a 256 MiB guest idling, vs QEMU -M microvm idling.
# The monitor (stdio relay, logs) is printed beside it.
hull run -d -m 256m --name bench-rss busybox sleep 600 >/dev/null
sleep 3
mpid=$(hull inspect bench-rss | sed -n 's/.*"Pid": *\([0-9]*\).*/\1/p' | head -1)
hpid=$(awk -v p="$mpid" '$4 == p { print $1; exit }' /proc/[0-9]*/stat 2>/dev/null)
hrss=$(rss_beyond_guest "$hpid" 200)
mrss=$(rss_beyond_guest "$mpid" 200)
d=$(mktemp -d)
mkdir -p "$d/bin" && cp /bin/busybox "$d/bin/" && printf '#!/bin/busybox sh\n/bin/busybox sleep 600\n' >"$d/init" && chmod +x "$d/init"
(cd "$d" && find . | cpio -o -H newc 2>/dev/null) >/tmp/sleep.cpio
qemu_microvm "$K" /tmp/sleep.cpio >/dev/null 2>&1 &
sleep 8
qpid=$(pidof qemu-system-x86_64 | cut -d' ' -f1)
qrss=$(rss_beyond_guest "$qpid" 200)
kill "$qpid" 2>/dev/null
echo "rss: hull VMM pid $hpid: $hrss KiB (its monitor, pid $mpid: $mrss KiB); qemu pid $qpid: $qrss KiB"
row "VMM resident memory beyond guest RAM" "$(awk -v k="$hrss" 'BEGIN { printf "%.1f", k / 1024 }')" "$(awk -v k="$qrss" 'BEGIN { printf "%.1f", k / 1024 }')" "RSS outside guest RAM (its mapping), idle 256 MiB guest; peer QEMU -M microvm" MiB
hull rm -f bench-exec bench-rss >/dev/null 2>&1

# stdout throughput: hull run's stdout vs a pipe inside the same guest, and
# the same with no log: the data path alone (json-file writes a NUL as six
# bytes, \u0000, so zeros cost the log six times their size). Interleaved;
# each sample's MB/s is taken with the run's fixed cost removed.
MB=32
fixed=$(median $rt)
mbps() { awk -v t="$1" -v f="$fixed" -v mb="$MB" 'BEGIN { d = t - f; if (d <= 0.01) d = 0.01; printf "%.2f", mb / d }'; }
hs= hn= ps=
for i in $(seq "$RUNS"); do
	hs="$hs $(mbps "$(elapsed sh -c "hull run --rm busybox sh -c 'head -c ${MB}000000 /dev/zero' | wc -c")")"
	hn="$hn $(mbps "$(elapsed sh -c "hull run --rm --log-driver none busybox sh -c 'head -c ${MB}000000 /dev/zero' | wc -c")")"
	ps="$ps $(hull run --rm busybox sh -c 'a=$(cut -d" " -f1 /proc/uptime); head -c 64000000 /dev/zero | wc -c >/dev/null; b=$(cut -d" " -f1 /proc/uptime); awk -v a=$a -v b=$b "BEGIN { printf \"%.2f\", 64 / (b - a) }"')"
done
pipe=$(median $ps)
echo "stdout MB/s (fixed cost $fixed s): json-file$hs; --log-driver none$hn; guest pipe$ps"
row "container stdout throughput" "$(median $hs)" "$pipe" "$MB MB through hull run's stdout minus the run's fixed cost; peer: 64 MB through a pipe inside the guest" MB/s
row "container stdout throughput, --log-driver none" "$(median $hn)" "$pipe" "as above, with no log written" MB/s

# 8 containers at once vs one.
t0=$(now)
for i in 1 2 3 4 5 6 7 8; do (hull run --rm busybox true >/dev/null 2>&1; echo $? >"/tmp/par.$i") & done
wait
t1=$(now)
ok=$(cat /tmp/par.* | grep -c '^0$')
par=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
row "8 containers at once ($ok/8 exit 0)" "$par" "$(median $rt)" "total wall time of 8 parallel hull run --rm true; peer: one" s
