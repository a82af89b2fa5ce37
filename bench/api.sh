# The Docker Engine API's own cost: `docker run --rm busybox true` through
# `hull system service` vs `hull run --rm busybox true` directly (same
# image, same network). Run by `./dev bench api` inside the emulated KVM host.

hull system service >/tmp/api.log 2>&1 &
api=$!
export DOCKER_HOST=unix://$HULL_ROOT/docker.sock
for i in $(seq 100); do docker version >/dev/null 2>&1 && break; sleep 0.2; done
hull run --rm busybox true >/dev/null 2>&1 # builds the built-in image and its disk
dr= hr=
for i in $(seq "$RUNS"); do
	dr="$dr $(elapsed docker run --rm busybox true)"
	[ "$(last_rc)" = 0 ] || echo "docker run failed ($(last_rc))"
	hr="$hr $(elapsed hull run --rm busybox true)"
	[ "$(last_rc)" = 0 ] || echo "hull run failed ($(last_rc))"
done
echo "api samples: docker$dr; hull$hr"
row "docker run --rm true through the Engine API" "$(median $dr)" "$(median $hr)" "docker CLI 28 -> hull system service; peer: hull run --rm busybox true" s
kill "$api"
