#!/usr/bin/env bash
# Installs Debian's SLURM daemons, client tools and munge when any is missing, so the tests can start a
# real single-node cluster on a fresh machine. Needs root and apt (Debian/Ubuntu); no services are enabled.
set -euo pipefail

declare -A package_of=(
    [munged]=munge [slurmctld]=slurmctld [slurmd]=slurmd
    [sbatch]=slurm-client [scontrol]=slurm-client [scancel]=slurm-client
    [sinfo]=slurm-client [squeue]=slurm-client [srun]=slurm-client
)
export PATH="$PATH:/usr/sbin:/sbin"

missing=()
for cmd in "${!package_of[@]}"; do
    command -v "$cmd" >/dev/null || missing+=("${package_of[$cmd]}")
done
if ((${#missing[@]} == 0)); then
    exit 0
fi
mapfile -t packages < <(printf '%s\n' "${missing[@]}" | sort -u)

if [[ $(id -u) != 0 ]]; then
    echo "install_slurm.sh: packages ${packages[*]} are missing and installing them needs root" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null; then
    echo "install_slurm.sh: packages ${packages[*]} are missing and apt-get is not available" >&2
    exit 1
fi

start=$SECONDS
log=$(mktemp /tmp/install_slurm.XXXXXX.log)
export DEBIAN_FRONTEND=noninteractive
if ! apt-get update -q >"$log" 2>&1 \
    || ! apt-get install -y -q --no-install-recommends "${packages[@]}" >>"$log" 2>&1; then
    echo "install_slurm.sh: apt-get failed installing ${packages[*]}; last lines of $log:" >&2
    tail -n 15 "$log" >&2
    exit 1
fi
rm -f "$log"
echo "install_slurm.sh: installed ${packages[*]} in $((SECONDS - start)) s"
