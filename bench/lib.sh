# Helpers for the benchmark sections (bench/*.sh), sourced before each one
# inside the emulated KVM host (busybox sh). A section prints its results as
# Markdown table rows: `| what | hull | peer | hull/peer | how |`.

export PATH=/usr/local/bin:/sbin:/usr/sbin:/bin:/usr/bin
export HULL_KERNEL=/opt/hull/vmlinux HULL_ROOT=/var/lib/hull
# passt is only in the emulated host for the sections that list it in their
# .tools: the others measure containers without a network.
command -v passt >/dev/null 2>&1 || export HULL_NETWORK=none
RUNS=${BENCH_RUNS:-5}

# Seconds since boot, with centiseconds (busybox's date has no %N).
now() { cut -d' ' -f1 /proc/uptime; }

# Elapsed seconds of a command (its output discarded). It runs in a command
# substitution, so its exit status is left in /tmp/bench.rc: see last_rc.
elapsed() {
	t0=$(now)
	"$@" >/dev/null 2>&1
	echo $? >/tmp/bench.rc
	t1=$(now)
	awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f\n", b - a }'
}

# The exit status of the last `elapsed` command.
last_rc() { cat /tmp/bench.rc 2>/dev/null || echo '?'; }

# The median of the numbers given as arguments.
median() {
	printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END {
		if (NR == 0) { print "n/a"; exit }
		if (NR % 2) print v[(NR + 1) / 2]; else printf "%.2f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# ratio A B: A/B with two decimals, or n/a.
ratio() {
	awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 > 0 && a + 0 == a) printf "%.2f\n", a / b; else print "n/a" }'
}

# row WHAT HULL PEER HOW [UNIT]: one table row; the ratio is computed.
row() {
	echo "| $1 | $2${5:+ $5} | $3${5:+ $5} | $(ratio "$2" "$3") | $4 |"
}

# A trivial init for boot benchmarks: prints a line and reboots at once.
# Writes the initramfs to $1.
make_trivial_initrd() {
	d=$(mktemp -d)
	mkdir -p "$d/bin"
	cp /bin/busybox "$d/bin/busybox"
	printf '#!/bin/busybox sh\n/bin/busybox echo hull-bench-init\n/bin/busybox reboot -f\n' >"$d/init"
	chmod +x "$d/init"
	(cd "$d" && find . | cpio -o -H newc 2>/dev/null) >"$1"
	rm -rf "$d"
}

# Resident memory (KiB) of process $1 outside mappings of at least $2 MiB
# (the guest's RAM): what the VMM itself costs.
rss_beyond_guest() {
	awk -v min="$(($2 * 1024))" '
		/^[0-9a-f]+-[0-9a-f]+ / { big = 0 }
		/^Size:/ { big = ($2 >= min) }
		/^Rss:/ { if (!big) total += $2 }
		END { print total + 0 }' "/proc/$1/smaps"
}
