package slurm

import (
	"fmt"
	"path/filepath"
	"strings"
)

// JobName is the Slurm job name of every pilot (squeue --name=kiln-pilot
// lists them).
const JobName = "kiln-pilot"

// scriptParams is what the pilot script depends on besides the config.
type scriptParams struct {
	dir        string   // StateDir/slurm, absolute
	worker     []string // the worker's argv
	configFile string   // for the header comment; "" if unknown
}

// renderScript returns the pilot's sbatch script. cfg must be validated.
// The text is deterministic: the same inputs give the same bytes.
func renderScript(cfg Config, p scriptParams) string {
	var b strings.Builder
	line := func(format string, args ...any) { fmt.Fprintf(&b, format+"\n", args...) }
	from := "the [slurm] table of kiln serve's config"
	if p.configFile != "" {
		from = "the [slurm] table of " + p.configFile
	}
	line("#!/bin/bash")
	line("# kiln's pilot job (a block), written by kiln serve from %s;", oneLine(from))
	line("# kiln submits it with sbatch --parsable --export=ALL,KILN_BLOCK_ID=<block>. Edit the config, not this file.")
	out := sbatchValue(filepath.Join(slurmPathEscape(p.dir), "pilot-%j.out"))
	line("#SBATCH --job-name=%s", JobName)
	line("#SBATCH --output=%s", out)
	line("#SBATCH --error=%s", out)
	line("#SBATCH --time=%s", cfg.Walltime)
	line("#SBATCH --nodes=%d", cfg.NodesPerBlock)
	opt := func(key, v string) {
		if v != "" {
			line("#SBATCH --%s=%s", key, v)
		}
	}
	opt("partition", cfg.Partition)
	opt("account", cfg.Account)
	opt("qos", cfg.QOS)
	opt("constraint", cfg.Constraint)
	if cfg.CPUsPerTask > 0 {
		line("#SBATCH --cpus-per-task=%d", cfg.CPUsPerTask)
	}
	opt("mem", cfg.Mem)
	if cfg.Exclusive {
		line("#SBATCH --exclusive")
	}
	if so := strings.TrimSpace(cfg.SchedulerOptions); so != "" {
		line("# scheduler_options:")
		for _, l := range strings.Split(so, "\n") {
			line("%s", strings.TrimSpace(l))
		}
	}
	line("")
	line("set -e")
	if wi := strings.TrimRight(cfg.WorkerInit, " \t\r\n"); strings.TrimSpace(wi) != "" {
		line("")
		line("# worker_init:")
		for _, l := range strings.Split(wi, "\n") {
			line("%s", strings.TrimRight(l, " \t\r"))
		}
	}
	line("")
	argv := shellJoin(p.worker)
	if cfg.Launcher == LauncherNone {
		line("# launcher = \"none\": the worker runs in this batch script, on the first node of the job.")
		line("exec %s", argv)
		return b.String()
	}
	line("# launcher = \"srun\": one worker on each node of the job; --cpu-bind=none lets it use every CPU")
	line("# the job has on its node (it runs its own pool of VMs).")
	srun := "srun --ntasks-per-node=1"
	if cfg.CPUsPerTask > 0 {
		// srun no longer inherits sbatch's --cpus-per-task (Slurm 22.05).
		srun += fmt.Sprintf(" --cpus-per-task=%d", cfg.CPUsPerTask)
	}
	line("exec %s --cpu-bind=none %s", srun, argv)
	return b.String()
}

// oneLine keeps a header comment on one line.
func oneLine(s string) string {
	return strings.Map(func(r rune) rune {
		if r == '\n' || r == '\r' {
			return ' '
		}
		return r
	}, s)
}

// slurmPathEscape doubles the % of a directory name, so sbatch's
// filename patterns (%j, ...) see only the ones kiln adds.
func slurmPathEscape(dir string) string { return strings.ReplaceAll(dir, "%", "%%") }

// sbatchValue quotes a #SBATCH value when it holds spaces: sbatch's own
// parser of #SBATCH lines strips double quotes. Validate and New reject
// the characters that cannot be quoted this way.
func sbatchValue(s string) string {
	if strings.ContainsAny(s, " \t") {
		return `"` + s + `"`
	}
	return s
}

// shellJoin quotes argv for bash: plain words stay as they are, anything
// else is single-quoted.
func shellJoin(argv []string) string {
	q := make([]string, len(argv))
	for i, a := range argv {
		q[i] = shellQuote(a)
	}
	return strings.Join(q, " ")
}

func shellQuote(s string) string {
	if s == "" {
		return "''"
	}
	plain := true
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("@%+=:,./_-", r)) {
			plain = false
			break
		}
	}
	if plain {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
