#!/usr/bin/env bash
# Install what tests/test_slurm.py needs to start a one-node SLURM cluster: the SLURM
# controller, node daemon and client commands, and munge (Debian/Ubuntu, as root).
# Idempotent and quiet: does nothing when they are already installed; without root or
# apt-get it says so and exits 0 (the slurm tests then skip with that reason).
set -euo pipefail
need=()
for prog in slurmctld slurmd sbatch munged; do
    command -v "$prog" >/dev/null 2>&1 || [ -x "/usr/sbin/$prog" ] || need+=("$prog")
done
if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "slurm/ci_install.sh: missing ${need[*]}; needs root and apt-get to install (the slurm tests will skip)" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# slurmctld + slurmd + slurm-client is the server/client subset of the slurm-wlm metapackage
apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null \
    || apt-get install -y -qq slurm-wlm munge >/dev/null
echo "slurm/ci_install.sh: installed $(slurmctld -V 2>/dev/null || echo slurm) and munge"
