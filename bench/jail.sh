# The VMM's jail: what it costs a container's start. Run by `./dev bench jail`
# inside the emulated KVM host: `hull run --rm busybox true` with the jail
# (the default) and with HULL_JAIL=off (the VMM still a process of its own,
# unconfined), interleaved.

mount -t cgroup2 none /sys/fs/cgroup 2>/dev/null # the cgroup limits are part of the cost
hull run --rm busybox true >/dev/null 2>&1 # builds the built-in image and its disk
on= off=
for i in $(seq "$RUNS"); do
	on="$on $(elapsed hull run --rm busybox true)"
	[ "$(last_rc)" = 0 ] || echo "jailed run failed ($(last_rc))"
	off="$off $(elapsed env HULL_JAIL=off hull run --rm busybox true)"
	[ "$(last_rc)" = 0 ] || echo "unjailed run failed ($(last_rc))"
done
echo "jail samples: on$on; off$off"
row "hull run --rm busybox true, jailed VMM" "$(median $on)" "$(median $off)" "peer: the same with HULL_JAIL=off (namespaces, pivot_root, ids, caps, rlimits, cgroup skipped)" s
