#!/usr/bin/env bash
# Builds the Bastion container image with podman, without any image registry:
#   1. a Debian bookworm base image straight from the Debian mirror (debootstrap --variant=minbase,
#      then `podman import`), kept and reused while it exists;
#   2. the image from Containerfile, with pip's local index and wheel folders (those this
#      machine's pip is configured with, see `pip config list`) bind-mounted read-only into the
#      build, so torch comes from the same disk as in scripts/setup.sh and no wheel enters the
#      build context.
# Usage: scripts/build-image.sh [--rebuild-base]
# Environment: BASTION_IMAGE (localhost/bastion:latest), BASTION_BASE_IMAGE
#   (localhost/debian-bookworm-base:latest), DEBIAN_MIRROR (http://deb.debian.org/debian),
#   DEBIAN_SECURITY_MIRROR (http://deb.debian.org/debian-security),
#   BASTION_PODMAN_OPTS (global podman flags, e.g. "--storage-driver vfs" where overlay fails),
#   BASTION_BUILD_NETWORK (the build's network mode, default host: apt and pip reach the mirrors
#   the way this machine does), BASTION_TORCH_PACKAGES ("torch==2.14.1 torchvision==0.29.1") and
#   BASTION_TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu for a CPU-only torch, about
#   4 GB smaller than the CUDA wheels this machine's store holds).
# Needs podman (buildah inside) and debootstrap; debootstrap runs as root (through sudo if not).
# Takes about 5 minutes from nothing on 2 cores (debootstrap ~40 s, torch ~3 min); seconds when
# nothing changed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
image=${BASTION_IMAGE:-localhost/bastion:latest}
base=${BASTION_BASE_IMAGE:-localhost/debian-bookworm-base:latest}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
network=${BASTION_BUILD_NETWORK:-host}
read -r -a podman_opts <<< "${BASTION_PODMAN_OPTS:-}"
started=$SECONDS
step() { echo "build-image: [$((SECONDS - started))s] $*" >&2; }
fail() { echo "build-image: error: $*" >&2; exit 1; }
podman() { command podman "${podman_opts[@]}" "$@"; }
scratch=()  # temporary folders, removed on exit
trap 'rm -rf "${scratch[@]}"' EXIT

rebuild_base=0
case "${1:-}" in
    "") ;;
    --rebuild-base) rebuild_base=1 ;;
    *) fail "unknown argument $1 (usage: $0 [--rebuild-base])" ;;
esac
command -v podman >/dev/null || fail "podman is missing (Debian: apt-get install podman buildah)"

build_base() {
    command -v debootstrap >/dev/null || fail "debootstrap is missing (apt-get install debootstrap)"
    local dir as_root=()
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null || fail "debootstrap needs root (or sudo) to build $base"
        as_root=(sudo)
    fi
    dir=$(mktemp -d /var/tmp/bastion-rootfs.XXXXXX)
    step "debootstrap --variant=minbase bookworm from $mirror (about a minute)"
    "${as_root[@]}" debootstrap --variant=minbase bookworm "$dir" "$mirror" > "$dir.log" 2>&1 \
        || { tail -20 "$dir.log" >&2; "${as_root[@]}" rm -rf "$dir"
             fail "debootstrap failed (full log: $dir.log)"; }
    rm -f "$dir.log"
    # apt in the image reads the same mirror, with bookworm's updates and security fixes (the
    # Containerfile upgrades to them); drop the caches debootstrap leaves
    printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb %s bookworm-security main\n' \
        "$mirror" "$mirror" "$security" | "${as_root[@]}" tee "$dir/etc/apt/sources.list" >/dev/null
    "${as_root[@]}" sh -c "rm -rf '$dir'/var/cache/apt/archives/*.deb '$dir'/var/lib/apt/lists/*"
    step "podman import -> $base"
    local imported=0
    "${as_root[@]}" tar -C "$dir" --numeric-owner -c . \
        | podman import --change 'CMD ["/bin/bash"]' - "$base" >/dev/null && imported=1
    "${as_root[@]}" rm -rf "$dir"
    [ "$imported" = 1 ] || fail "podman import of the debootstrapped tree failed"
}

if [ "$rebuild_base" = 1 ] || ! podman image exists "$base"; then
    build_base
else
    step "reusing base image $base (--rebuild-base to make it again)"
fi

# Can this machine run a container with podman's defaults? Where podman may not raise rlimits
# (no CAP_SYS_RESOURCE: root's default nofile/nproc are 1048576) and crun refuses hybrid cgroups,
# runc with the machine's own limits does; the build's RUN steps then use the same.
run_opts=()
if ! out=$(podman run --rm "$base" true 2>&1); then
    step "podman run with its defaults fails here: ${out##*Error: }"
    pid_max=$(cat /proc/sys/kernel/pid_max)
    nproc=$(ulimit -Hu)
    if [ "$nproc" = unlimited ] || [ "$nproc" -gt "$pid_max" ]; then nproc=$pid_max; fi
    fallback=(--ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit "nproc=$nproc:$nproc")
    command -v runc >/dev/null && podman_opts+=(--runtime runc)
    hint=""
    command -v runc >/dev/null || hint=" (runc is not installed: apt-get install runc, then retry)"
    out=$(podman run --rm "${fallback[@]}" "$base" true 2>&1) \
        || fail "podman cannot run a container here, even with ${podman_opts[*]} ${fallback[*]}${hint}:
$out"
    run_opts=("${fallback[@]}")
    step "using podman ${podman_opts[*]} with ${run_opts[*]}"
fi

# pip's settings on this machine, last value of each key winning (pip reads env after files)
declare -A pip_conf=()
while IFS= read -r line; do
    key=${line#*.}; key=${key%%=*}; value=${line#*=}; value=${value#\'}; value=${value%\'}
    case "$key" in index-url|extra-index-url|find-links|constraint|trusted-host|timeout)
        pip_conf[$key]=$value ;;
    esac
done < <(python3 -m pip config list 2>/dev/null || true)

# every local folder or file those settings name is mounted read-only at the same path
volumes=()
mount_local() {
    local path=${1#file://}
    case "$path" in /*) ;; *) return 0 ;; esac
    # a file:// "simple" index links to files beside it (../../files): mount its parent
    case "$path" in */simple|*/simple/) path=$(dirname "${path%/}") ;; esac
    [ -e "$path" ] || return 0
    volumes+=(--volume "$path:$path:ro")
}
context=$(mktemp -d /var/tmp/bastion-build.XXXXXX)
scratch+=("$context")
{
    echo "[global]"
    for key in "${!pip_conf[@]}"; do
        echo "$key = ${pip_conf[$key]}"
        for item in ${pip_conf[$key]}; do mount_local "$item"; done
    done
} > "$context/pip.conf"
# the build's pip trusts what this machine's pip trusts (a proxy's CA included)
ca=${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
if [ -f "$ca" ]; then
    cp "$ca" "$context/ca-certificates.crt"
    echo "cert = /run/bastion-build/ca-certificates.crt" >> "$context/pip.conf"
fi
step "pip settings for the build: $(grep -v '^\[' "$context/pip.conf" | tr '\n' ';')"

args=(--build-arg "BASE_IMAGE=$base")
for name in TORCH_PACKAGES TORCH_INDEX_URL; do
    value=$(printenv "BASTION_$name" || true)
    [ -z "$value" ] || args+=(--build-arg "$name=$value")
done
step "podman build -t $image (installs torch and Bastion; about 4 minutes)"
# --format docker: the OCI image format has no HEALTHCHECK
podman build --format docker --network "$network" "${run_opts[@]}" \
    --volume "$context:/run/bastion-build:ro" "${volumes[@]}" "${args[@]}" \
    -t "$image" -f "$root/Containerfile" "$root" \
    || fail "podman build failed (its output is above)"
size=$(podman image inspect --format '{{.Size}}' "$image")
step "built $image ($((size / 1024 / 1024)) MiB)"
