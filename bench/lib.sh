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

# Resident memory (KiB) of process $1 outside its guest's RAM: outside
# mappings of at least $2 MiB and, given the guest's size $3 (MiB), outside
# hull's guest RAM range. hull's VMM maps the kernel and initramfs into that
# range, which splits it into pieces; the one of vmlinux at file offset
# 0x200000 is the kernel's first segment, at guest-physical 16 MiB
# (`readelf -l vmlinux`), which places the whole range.
rss_beyond_guest() {
	awk -v min="$(($2 * 1024 * 1024))" -v guest="$((${3:-0} * 1024 * 1024))" '
		function hex(s, i, n) {
			n = 0
			for (i = 1; i <= length(s); i++) n = n * 16 + index("0123456789abcdef", substr(s, i, 1)) - 1
			return n
		}
		/^[0-9a-f]+-[0-9a-f]+ / {
			split($1, r, "-"); k++; lo[k] = hex(r[1]); hi[k] = hex(r[2])
			if ($NF ~ /\/vmlinux$/ && $3 == "00200000") base = lo[k] - 16 * 1024 * 1024
		}
		/^Rss:/ { rss[k] = $2 }
		END {
			for (i = 1; i <= k; i++) {
				inside = guest > 0 && base > 0 && lo[i] >= base && hi[i] <= base + guest
				if (!inside && hi[i] - lo[i] < min) total += rss[i]
			}
			print total + 0
		}' "/proc/$1/smaps"
}
