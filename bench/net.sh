# Network figures: TCP throughput through passt both ways (iperf3 in the
# container and on the emulated host) beside QEMU's microvm on the same passt
# (its stream netdev, the same guest kernel, iperf3 in a busybox initramfs)
# and the same iperf3 over the host's loopback, and the time from
# `hull run -d -p` to the first HTTP answer.
# Run by `./dev bench net` inside the emulated KVM host. Prints, never asserts.

# passt sandboxes itself with pivot_root and a user namespace, which the
# emulated host's initramfs root refuses: the rest runs with a tmpfs as
# the root of its own mount namespace (moved onto /, as switch_root does).
if [ -z "$BENCH_NET_INNER" ]; then
	mkdir -p /newroot && mount -t tmpfs -o size=1200m none /newroot
	for d in bin sbin usr lib lib64 etc opt var root; do [ -e /$d ] && cp -a /$d /newroot/; done
	mkdir -p /newroot/proc /newroot/sys /newroot/dev /newroot/tmp /newroot/run
	cp /opt/bench/lib.sh /opt/bench/net.sh /newroot/ 2>/dev/null
	BENCH_NET_INNER=1 BENCH_RUNS=$RUNS unshare -m sh -c 'mount --make-rprivate /;
		mount --rbind /proc /newroot/proc; mount --rbind /sys /newroot/sys;
		mount --rbind /dev /newroot/dev; mount -t tmpfs none /newroot/tmp;
		mount -t tmpfs none /newroot/run;
		cd /newroot && mount --move . / && exec chroot . sh -c ". /lib.sh; . /net.sh"'
	return 0 2>/dev/null || exit 0
fi

ip link set lo up
ip link set dummy0 up 2>/dev/null || { modprobe dummy && ip link set dummy0 up; }
ip addr add 192.0.2.10/24 dev dummy0
ip route add default via 192.0.2.1 dev dummy0

# An image with busybox and iperf3 (its libraries are at the same paths here).
mkdir -p /tmp/nimg/bin /tmp/nimg/tmp
cp /bin/busybox /tmp/nimg/bin/
for a in $(busybox --list); do [ -e /tmp/nimg/bin/$a ] || ln -s busybox /tmp/nimg/bin/$a; done
cp /usr/bin/iperf3 /tmp/nimg/bin/
for l in /lib64/ld-linux-x86-64.so.2 /lib/x86_64-linux-gnu/*.so*; do
	[ -e "$l" ] || continue
	mkdir -p "/tmp/nimg$(dirname "$l")" && cp -L "$l" "/tmp/nimg$l"
done
tar -C /tmp/nimg -cf /tmp/nimg.tar . && hull import /tmp/nimg.tar nettools >/dev/null

# iperf3 -J gives bits per second; printed as Mbit/s.
mbps() { awk '/"sum_received"/ { s = 1 } s && /"bits_per_second"/ { gsub(/[,]/, ""); printf "%.1f\n", $2 / 1e6; exit }'; }

# Peer: iperf3 over the emulated host's loopback.
iperf3 -s -D -p 5201 >/dev/null 2>&1
sleep 1
peer=$(iperf3 -c 127.0.0.1 -p 5201 -t 5 -J 2>/dev/null | mbps)

# Container -> host: the client in the container reaches the host's
# loopback server through passt's gateway mapping.
c2h=$(hull run --rm nettools iperf3 -c host.hull.internal -p 5201 -t 5 -J 2>/dev/null | mbps)
# Host -> container: a published port; -R would make the same direction.
hull run -d --name iperf -p 5202:5202 nettools iperf3 -s -p 5202 >/dev/null 2>&1
for i in $(seq 1 60); do iperf3 -c 127.0.0.1 -p 5202 -t 1 >/dev/null 2>&1 && break; sleep 1; done
h2c=$(iperf3 -c 127.0.0.1 -p 5202 -t 5 -J 2>/dev/null | mbps)
hull rm -f iperf >/dev/null 2>&1

# The peer VMM: QEMU -M microvm with virtio-net on the same passt (the
# arguments hull gives it, on a UNIX socket), the same kernel, 1 vCPU; its
# guest runs the client, then serves one test on port 80 (published as 5203).
mkdir -p /tmp/qir/bin /tmp/qir/proc /tmp/qir/sys /tmp/qir/dev /tmp/qir/tmp
cp -a /tmp/nimg/lib /tmp/nimg/lib64 /tmp/qir/ 2>/dev/null
cp /bin/busybox /usr/bin/iperf3 /tmp/qir/bin/
cat >/tmp/qir/init <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
ip link set lo up; ip link set eth0 mtu 65520 up
ip addr add 10.0.2.15/24 dev eth0; ip route add default via 10.0.2.2
echo "qemu-c2h=$(iperf3 -c 10.0.2.2 -p 5201 -t 5 -J | awk '/"sum_received"/ { s = 1 } s && /"bits_per_second"/ { gsub(/[,]/, ""); printf "%.1f", $2 / 1e6; exit }')"
echo qemu-ready
iperf3 -s -1 -p 80 >/dev/null 2>&1
reboot -f
EOF
chmod +x /tmp/qir/init
(cd /tmp/qir && find . | cpio -o -H newc 2>/dev/null) >/tmp/qir.cpio
mkdir -p /tmp/qnet && chmod 777 /tmp/qnet
passt -f -e -q -4 --runas 65534:65534 -s /tmp/qnet/sock -a 10.0.2.15 -n 24 -g 10.0.2.2 -m 65520 \
	-t 5203:80 >/dev/null 2>&1 &
qpasst=$!
for i in $(seq 50); do [ -S /tmp/qnet/sock ] && break; sleep 0.1; done
timeout 120 qemu-system-x86_64 -M microvm,acpi=off -accel kvm -cpu host -m 256 -smp 1 \
	-nodefaults -no-user-config -display none -serial file:/tmp/qemu-net.log -no-reboot \
	-kernel /opt/hull/bzImage -initrd /tmp/qir.cpio \
	-append "console=ttyS0 reboot=t panic=1 quiet no_timer_check" \
	-netdev stream,id=n,addr.type=unix,addr.path=/tmp/qnet/sock -device virtio-net-device,netdev=n \
	>/dev/null 2>&1 &
qvm=$!
for i in $(seq 120); do grep -q qemu-ready /tmp/qemu-net.log 2>/dev/null && break; sleep 1; done
qh2c=$(iperf3 -c 127.0.0.1 -p 5203 -t 5 -J 2>/dev/null | mbps)
qc2h=$(sed -n 's/^qemu-c2h=//p' /tmp/qemu-net.log | tr -d '\r')
wait $qvm 2>/dev/null
kill $qpasst 2>/dev/null
echo "throughput (Mbit/s): hull c2h ${c2h:-n/a} h2c ${h2c:-n/a}; qemu c2h ${qc2h:-n/a} h2c ${qh2c:-n/a}; loopback ${peer:-n/a}"
row "TCP container -> host (iperf3, 5 s)" "${c2h:-n/a}" "${qc2h:-n/a}" "hull vs QEMU -M microvm (virtio-net, stream netdev) on the same passt" Mbit/s
row "TCP host -> container (iperf3, 5 s)" "${h2c:-n/a}" "${qh2c:-n/a}" "a published port, hull vs QEMU on the same passt" Mbit/s
row "TCP over the emulated host's loopback (iperf3, 5 s)" "${peer:-n/a}" "n/a" "no VM: what the emulated host itself does" Mbit/s

# From `hull run -d -p` to the first successful HTTP answer.
ft=
for i in $(seq "$RUNS"); do
	t0=$(now)
	hull run -d --name web$i -p 8080:80 busybox sh -c 'mkdir -p /www && echo ok > /www/index.html && exec httpd -f -p 80 -h /www' >/dev/null 2>&1
	n=0
	until timeout 2 wget -q -O /dev/null http://127.0.0.1:8080/ 2>/dev/null || [ $n -ge 300 ]; do n=$((n + 1)); sleep 0.1; done
	t1=$(now)
	[ $n -lt 300 ] && ft="$ft $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f\n", b - a }')"
	hull rm -f web$i >/dev/null 2>&1
done
echo "first-response samples:$ft"
row "hull run -d -p to the first HTTP answer" "$(median $ft)" "n/a" "busybox httpd in the container, wget from the host every 0.1 s" s
