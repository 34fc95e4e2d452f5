#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for kiln's Slurm provider and
# its end-to-end tests (issue 11): munged, slurmctld and slurmd, with the
# node "localhost" in partition "debug". Debian 12, as root (re-runs itself
# under sudo otherwise). .ci/run calls "start" before the tests.
#
#   scripts/slurm-dev.sh start    install slurm-wlm and munge if missing, write
#                                 /etc/slurm/slurm.conf if absent (or written by
#                                 this script), start the daemons not running,
#                                 wait until the node is idle
#   scripts/slurm-dev.sh stop     stop the daemons this script started, only those
#   scripts/slurm-dev.sh status   which daemons run, who started them, sinfo
#
# Both start and stop are idempotent. The PIDs of the daemons it started are
# recorded in /run/kiln-slurm-dev/pids; daemons that were already running
# (a real cluster, another developer's) are used and never stopped.
set -euo pipefail

conf=/etc/slurm/slurm.conf
marker="# Written by kiln's scripts/slurm-dev.sh; it rewrites this file, delete this line to keep your own."
statedir=/run/kiln-slurm-dev
pids=$statedir/pids

say() { echo "slurm-dev: $*"; }
die() { echo "slurm-dev: $*" >&2; exit 1; }

if [ "$(id -u)" != 0 ] && [ "${1:-}" != status ]; then
	command -v sudo >/dev/null || die "run as root (the daemons need it)"
	exec sudo "$0" "$@"
fi

# alive NAME PID: PID is a live process whose name starts with NAME
# (Debian's slurmctld is a link to slurmctld-wlm).
alive() {
	local comm
	[ -n "$2" ] && comm=$(cat "/proc/$2/comm" 2>/dev/null) && [[ $comm == "$1"* ]]
}

# running NAME: some process of that name runs, ours or not (pgrep cannot
# match slurmctld-wlm: its patterns stop at 15 characters).
running() {
	local f comm
	for f in /proc/[0-9]*/comm; do
		{ read -r comm <"$f"; } 2>/dev/null || continue
		[[ $comm == "$1" || $comm == "$1-wlm" ]] && return 0
	done
	return 1
}

# wait_for SECONDS WHAT COMMAND...: polls COMMAND until it succeeds.
wait_for() {
	local limit=$1 what=$2 t0=$SECONDS
	shift 2
	until "$@" >/dev/null 2>&1; do
		if [ $((SECONDS - t0)) -ge "$limit" ]; then
			die "waited ${limit}s for $what; see /var/log/slurm/ and /var/log/munge/"
		fi
		sleep 0.2
	done
}

install() {
	local missing=()
	for tool in sbatch squeue scancel sinfo slurmctld slurmd munged; do
		command -v "$tool" >/dev/null || command -v "/usr/sbin/$tool" >/dev/null || missing+=("$tool")
	done
	[ ${#missing[@]} -eq 0 ] && return
	say "installing slurm-wlm and munge (missing: ${missing[*]})"
	# Recommends would add some thirty plugin and -dev packages the
	# one-node cluster does not use.
	local apt=(apt-get install -y -qq --no-install-recommends slurm-wlm munge)
	if ! DEBIAN_FRONTEND=noninteractive "${apt[@]}" >/dev/null 2>&1; then
		apt-get update -qq
		DEBIAN_FRONTEND=noninteractive "${apt[@]}" >/dev/null
	fi
}

write_conf() {
	if [ -f "$conf" ] && ! grep -qxF "$marker" "$conf"; then
		say "using $conf as it is (not written by this script)"
		return
	fi
	# The node's real size: with config_overrides slurmd would accept any,
	# but sinfo and the scheduler should tell the truth.
	local cpus mem
	cpus=$(nproc)
	mem=$(awk '/^MemTotal:/ { print int($2 / 1024 * 0.9) }' /proc/meminfo)
	mkdir -p /etc/slurm
	cat >"$conf.tmp" <<EOF
$marker
# A one-node cluster for kiln's tests (issue 11). Every path is set here so
# nothing depends on the distribution's defaults.
ClusterName=kiln
SlurmctldHost=localhost
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=1
SlurmdParameters=config_overrides
SlurmUser=root
SlurmdUser=root
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
# Finished jobs stay in squeue for MinJobAge seconds.
MinJobAge=300
# Quick scheduling: a pilot starts within a second or two of sbatch.
SchedulerParameters=sched_interval=2
NodeName=localhost CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
	if cmp -s "$conf.tmp" "$conf"; then
		rm -f "$conf.tmp"
		return
	fi
	mv "$conf.tmp" "$conf"
	say "wrote $conf"
	if running slurmctld; then
		say "slurmctld runs with the previous $conf: restart it (scripts/slurm-dev.sh stop; scripts/slurm-dev.sh start)"
	fi
}

# record NAME PIDFILE: notes the daemon this script just started.
record() {
	local pid=""
	wait_for 10 "$1 to write $2" test -s "$2"
	pid=$(cat "$2")
	alive "$1" "$pid" || die "$1 exited at once; see its log under /var/log/"
	echo "$1 $pid" >>"$pids"
	say "started $1 (pid $pid)"
}

node_state() { sinfo --noheader --nodes=localhost --format=%t 2>/dev/null | head -n1; }

start() {
	install
	write_conf
	mkdir -p "$statedir" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm /run/munge /var/log/munge /var/lib/munge
	chown munge:munge /run/munge /var/log/munge /var/lib/munge
	chmod 0755 /run/munge
	if [ ! -s /etc/munge/munge.key ]; then
		mkdir -p /etc/munge
		/usr/sbin/mungekey --create --keyfile=/etc/munge/munge.key
		chown munge:munge /etc/munge /etc/munge/munge.key
		chmod 0700 /etc/munge
		chmod 0400 /etc/munge/munge.key
	fi
	# Forget daemons recorded by an earlier start that are gone since.
	touch "$pids"
	local name pid
	while read -r name pid; do
		alive "$name" "$pid" && echo "$name $pid"
	done <"$pids" >"$pids.tmp" || true
	mv "$pids.tmp" "$pids"

	if running munged; then
		say "munged already runs"
	else
		runuser -u munge -- /usr/sbin/munged
		record munged /run/munge/munged.pid
	fi
	wait_for 10 "munged to answer" sh -c 'munge -n </dev/null | unmunge'

	if running slurmctld; then
		say "slurmctld already runs"
	else
		rm -f /run/slurm/slurmctld.pid
		/usr/sbin/slurmctld -i
		record slurmctld /run/slurm/slurmctld.pid
	fi
	wait_for 30 "slurmctld to answer (scontrol ping)" sh -c 'scontrol ping | grep -q UP'

	if running slurmd; then
		say "slurmd already runs"
	else
		rm -f /run/slurm/slurmd.pid
		# -N: the node is "localhost" whatever the hostname.
		/usr/sbin/slurmd -N localhost
		record slurmd /run/slurm/slurmd.pid
	fi

	# A node that was down when slurmctld last saw it (a previous run
	# stopped, a state file from elsewhere) comes back down or drained.
	local t0=$SECONDS st
	while :; do
		st=$(node_state)
		case $st in
		idle | mix | alloc | comp) break ;;
		down* | drain* | drng* | fail*) scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true ;;
		esac
		[ $((SECONDS - t0)) -lt 60 ] || die "node localhost is '$st' after 60s; see /var/log/slurm/slurmd.log"
		sleep 0.2
	done
	if [ -s "$pids" ]; then
		say "node localhost is $st (partition debug); stop with: scripts/slurm-dev.sh stop"
	else
		say "node localhost is $st (partition debug); this script started no daemon, so stop leaves them running"
	fi
}

stop() {
	[ -s "$pids" ] || { say "nothing to stop: this script started no daemon"; rm -f "$pids"; return; }
	local name pid t0 line lines
	# Stop in the reverse order of starting: slurmd, slurmctld, munged.
	mapfile -t lines < <(tac "$pids")
	for line in "${lines[@]}"; do
		read -r name pid <<<"$line"
		if ! alive "$name" "$pid"; then
			say "$name (pid $pid) already gone"
			continue
		fi
		kill -TERM "$pid"
		t0=$SECONDS
		while alive "$name" "$pid" && [ $((SECONDS - t0)) -lt 15 ]; do sleep 0.1; done
		if alive "$name" "$pid"; then
			kill -KILL "$pid"
			say "$name (pid $pid) did not stop on SIGTERM within 15s: killed"
		else
			say "stopped $name (pid $pid)"
		fi
	done
	rm -f "$pids"
}

status() {
	local name pid ours
	for name in munged slurmctld slurmd; do
		ours=""
		if [ -s "$pids" ]; then
			pid=$(awk -v n="$name" '$1 == n { p = $2 } END { print p }' "$pids")
			alive "$name" "$pid" && ours=" (started by this script, pid $pid)"
		fi
		if running "$name"; then
			say "$name runs$ours"
		else
			say "$name does not run"
		fi
	done
	if command -v sinfo >/dev/null && running slurmctld; then
		sinfo
	fi
}

case ${1:-} in
start) start ;;
stop) stop ;;
status) status ;;
*) die "usage: $0 start|stop|status" ;;
esac
