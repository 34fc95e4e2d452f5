package slurm

import (
	"strings"
	"testing"
	"time"
)

// The seeds run on every go test; go test -fuzz=FuzzParseSqueue explores.

func FuzzParseSqueue(f *testing.F) {
	f.Add("101|PD||Resources\n102|R|node[01-04]|None\n")
	f.Add("104|PD||ReqNodeNotAvail, UnavailableNodes:node[1-2]\n")
	f.Add("slurm_load_jobs error: Invalid job id specified\n")
	f.Add("|||\n||\n\n 7 | CG | n1 | None \n9_[1-3]|PD||JobArrayTaskLimit")
	f.Add("\x00|R|\xff|None")
	f.Fuzz(func(t *testing.T, in string) {
		rows, _ := parseSqueue(in)
		for _, r := range rows {
			if !validJobID(r.JobID) || r.Code == "" || r.State == "" {
				t.Fatalf("parseSqueue(%q) gave row %+v", in, r)
			}
			if strings.ContainsAny(r.JobID+r.Code+r.Nodes, "|\n") {
				t.Fatalf("parseSqueue(%q) gave row %+v with a separator inside", in, r)
			}
			if st, _ := stateOf(r.Code); st != r.State {
				t.Fatalf("parseSqueue(%q): row %+v, state of %q is %q", in, r, r.Code, st)
			}
		}
	})
}

func FuzzParseSacct(f *testing.F) {
	f.Add("11|COMPLETED\n12|CANCELLED by 1000\n12.batch|CANCELLED\n")
	f.Add("13|NODE_FAIL\ngarbage\n|\n14|\n")
	f.Add("Slurm accounting storage is disabled\n")
	f.Fuzz(func(t *testing.T, in string) {
		rows, _ := parseSacct(in)
		for id, r := range rows {
			if id != r.JobID || !validJobID(id) || strings.Contains(id, ".") || r.Raw == "" {
				t.Fatalf("parseSacct(%q) gave %q: %+v", in, id, r)
			}
		}
	})
}

func FuzzParseSbatch(f *testing.F) {
	f.Add("123\n")
	f.Add("123;cluster\n")
	f.Add("sbatch: warning\n9\n")
	f.Add(";;\n\n")
	f.Fuzz(func(t *testing.T, in string) {
		id, err := parseSbatch(in)
		if err == nil && (id == "" || strings.Trim(id, "0123456789") != "") {
			t.Fatalf("parseSbatch(%q) = %q, not a job id", in, id)
		}
	})
}

func FuzzParseWalltime(f *testing.F) {
	for _, s := range []string{"01:00:00", "30:00", "90", "2-00:00:00", "1-12", "1-12:30", "-5", "1:2:3:4", "999999:999999:999999", "1-", "1000000-0"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		d, err := parseWalltime(in)
		if err == nil && (d < 0 || d%time.Second != 0) {
			t.Fatalf("parseWalltime(%q) = %v", in, d)
		}
		if err == nil && strings.Trim(in, "0123456789:-") != "" {
			t.Fatalf("parseWalltime(%q) = %v, want an error for a non-numeric limit", in, d)
		}
	})
}

func FuzzDurationText(f *testing.F) {
	for _, s := range []string{"120", "1.5", "2m", "1h30m", "-3", "soon", "", "1e300", "NaN", "Inf", "0x10"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		var d Duration
		if err := d.UnmarshalText([]byte(in)); err != nil {
			return
		}
		if d.Duration < 0 {
			t.Fatalf("UnmarshalText(%q) = %v, negative", in, d.Duration)
		}
		b, _ := d.MarshalText()
		var back Duration
		if err := back.UnmarshalText(b); err != nil || back != d {
			t.Fatalf("UnmarshalText(MarshalText(%v) = %q) = %v, %v", d.Duration, b, back.Duration, err)
		}
	})
}

func FuzzConfigLines(f *testing.F) {
	f.Add("debug", "proj", "normal", "cpu", "01:00:00", "8G", "module load x", "#SBATCH --gres=gpu:1")
	f.Add("a\nb", "x y", "'", "\\", "1", "", "\x00", "echo hi")
	f.Fuzz(func(t *testing.T, part, acct, qos, constraint, wall, mem, init, sched string) {
		c := Config{Partition: part, Account: acct, QOS: qos, Constraint: constraint, Walltime: wall, Mem: mem, WorkerInit: init, SchedulerOptions: sched}
		if c.Validate() != nil {
			return
		}
		// A valid config cannot end sbatch's #SBATCH block early nor put
		// a command before set -e.
		script := renderScript(c, scriptParams{dir: "/st/slurm", worker: []string{"w"}})
		head, _, ok := strings.Cut(script, "\nset -e\n")
		if !ok {
			t.Fatalf("no set -e in\n%s", script)
		}
		for i, line := range strings.Split(head, "\n") {
			if line != "" && !strings.HasPrefix(line, "#") {
				t.Fatalf("line %d %q of the #SBATCH block is not a comment:\n%s", i+1, line, script)
			}
		}
	})
}

// FuzzShellQuote checks shellQuote against a small model of how bash reads
// plain words and single-quoted strings.
func FuzzShellQuote(f *testing.F) {
	for _, s := range []string{"plain", "", "it's", "$HOME", "a b", "''", "\n"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		q := shellQuote(in)
		if got, ok := bashWord(q); !ok || got != in {
			t.Fatalf("shellQuote(%q) = %q, which bash reads as %q (ok %v)", in, q, got, ok)
		}
	})
}

// bashWord reads one word made of safe plain characters, '...' strings
// and \' escapes; ok is false for anything else.
func bashWord(q string) (string, bool) {
	var b strings.Builder
	for i := 0; i < len(q); {
		switch c := q[i]; {
		case c == '\'':
			j := strings.IndexByte(q[i+1:], '\'')
			if j < 0 {
				return "", false
			}
			b.WriteString(q[i+1 : i+1+j])
			i += j + 2
		case c == '\\' && i+1 < len(q) && q[i+1] == '\'':
			b.WriteByte('\'')
			i += 2
		case c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("@%+=:,./_-", c) >= 0:
			b.WriteByte(c)
			i++
		default:
			return "", false
		}
	}
	return b.String(), q != ""
}
