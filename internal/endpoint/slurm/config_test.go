package slurm

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/pelletier/go-toml/v2"
)

// defaults is the zero Config after Validate.
func defaults() Config {
	return Config{Walltime: "01:00:00", NodesPerBlock: 1, MaxBlocks: 1, MaxIdle: Duration{120 * time.Second}, Launcher: "srun"}
}

func TestValidate(t *testing.T) {
	with := func(f func(*Config)) Config {
		c := defaults()
		f(&c)
		return c
	}
	tests := []struct {
		name string
		in   Config
		want Config
		errs []string // substrings of the error, in order; nil: no error
	}{
		{name: "zero gets defaults", in: Config{}, want: defaults()},
		{
			name: "everything set",
			in: Config{Partition: " debug ", Account: "proj1", QOS: "normal", Constraint: "cpu&knl", Walltime: "2-00:30:00",
				NodesPerBlock: 2, CPUsPerTask: 8, Mem: "8G", InitBlocks: 1, MinBlocks: 1, MaxBlocks: 4,
				MaxIdle: Duration{time.Minute}, WorkerInit: "module load x", SchedulerOptions: "#SBATCH --gres=gpu:1",
				Exclusive: true, Launcher: "none"},
			want: Config{Partition: "debug", Account: "proj1", QOS: "normal", Constraint: "cpu&knl", Walltime: "2-00:30:00",
				NodesPerBlock: 2, CPUsPerTask: 8, Mem: "8G", InitBlocks: 1, MinBlocks: 1, MaxBlocks: 4,
				MaxIdle: Duration{time.Minute}, WorkerInit: "module load x", SchedulerOptions: "#SBATCH --gres=gpu:1",
				Exclusive: true, Launcher: "none"},
		},
		{name: "walltime MM:SS", in: Config{Walltime: "30:00"}, want: with(func(c *Config) { c.Walltime = "30:00" })},
		{name: "walltime minutes", in: Config{Walltime: "90"}, want: with(func(c *Config) { c.Walltime = "90" })},
		{name: "walltime D-HH", in: Config{Walltime: "1-12"}, want: with(func(c *Config) { c.Walltime = "1-12" })},
		{name: "bad walltime", in: Config{Walltime: "1:2:3:4"}, errs: []string{`[slurm] walltime = "1:2:3:4": want HH:MM:SS`}},
		{name: "walltime zero", in: Config{Walltime: "00:00:00"}, errs: []string{`walltime = "00:00:00": must be more than zero`}},
		{name: "walltime word", in: Config{Walltime: "UNLIMITED"}, errs: []string{`walltime = "UNLIMITED"`}},
		{name: "min over max", in: Config{MinBlocks: 3, MaxBlocks: 2}, errs: []string{"min_blocks = 3 is more than max_blocks = 2: lower min_blocks or raise max_blocks"}},
		{name: "min over default max", in: Config{MinBlocks: 2}, errs: []string{"min_blocks = 2 is more than max_blocks = 1"}},
		{name: "init over max", in: Config{InitBlocks: 5, MaxBlocks: 2}, errs: []string{"init_blocks = 5 is more than max_blocks = 2"}},
		{name: "negatives", in: Config{NodesPerBlock: -1, CPUsPerTask: -2, MaxBlocks: -1, MinBlocks: -1, InitBlocks: -1, MaxIdle: Duration{-time.Second}},
			errs: []string{"nodes_per_block = -1", "cpus_per_task = -2", "max_blocks = -1", "min_blocks = -1", "init_blocks = -1", "max_idle = -1s: must not be negative"}},
		{name: "bad mem", in: Config{Mem: "8GB"}, errs: []string{`mem = "8GB": want a number of megabytes`}},
		{name: "mem megabytes", in: Config{Mem: "4000"}, want: with(func(c *Config) { c.Mem = "4000" })},
		{name: "partition with a space", in: Config{Partition: "a b"}, errs: []string{`partition = "a b": must not contain spaces`}},
		{name: "account with a newline", in: Config{Account: "a\n#SBATCH --x"}, errs: []string{`account = "a\n#SBATCH --x"`}},
		{name: "qos with a quote", in: Config{QOS: `a"`}, errs: []string{`qos = "a\""`}},
		{name: "launcher", in: Config{Launcher: "mpirun"}, errs: []string{`launcher = "mpirun": want "srun" (one worker per node) or "none"`}},
		{name: "scheduler_options with a command", in: Config{SchedulerOptions: "#SBATCH --gres=gpu:1\nmodule load cuda"},
			errs: []string{`scheduler_options line 2 "module load cuda": want #SBATCH lines only (shell commands go in worker_init)`}},
		{name: "scheduler_options blank lines and comments", in: Config{SchedulerOptions: "\n#SBATCH --gres=gpu:1\n\n# a comment\n"},
			want: with(func(c *Config) { c.SchedulerOptions = "\n#SBATCH --gres=gpu:1\n\n# a comment\n" })},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := tt.in
			err := c.Validate()
			if tt.errs == nil {
				if err != nil {
					t.Fatalf("Validate(%+v) = %v, want nil", tt.in, err)
				}
				if diff := cmp.Diff(tt.want, c); diff != "" {
					t.Errorf("Validate(%+v) left (-want +got):\n%s", tt.in, diff)
				}
				return
			}
			if err == nil {
				t.Fatalf("Validate(%+v) = nil, want an error with %q", tt.in, tt.errs)
			}
			msg := err.Error()
			for _, want := range tt.errs {
				i := strings.Index(msg, want)
				if i < 0 {
					t.Fatalf("Validate(%+v) = %q, want it to contain %q (in this order: %q)", tt.in, err, want, tt.errs)
				}
				msg = msg[i+len(want):]
			}
		})
	}
}

func TestParseWalltime(t *testing.T) {
	tests := []struct {
		in   string
		want time.Duration
		ok   bool
	}{
		{"01:00:00", time.Hour, true},
		{"1:30:15", time.Hour + 30*time.Minute + 15*time.Second, true},
		{"30:00", 30 * time.Minute, true},
		{"90", 90 * time.Minute, true},
		{"2-00:00:00", 48 * time.Hour, true},
		{"1-12", 36 * time.Hour, true},
		{"1-12:30", 36*time.Hour + 30*time.Minute, true},
		{"0", 0, true},
		{"", 0, false},
		{"-5", 0, false},
		{"1-", 0, false},
		{"1:2:3:4", 0, false},
		{"1::2", 0, false},
		{"1h", 0, false},
		{"+5", 0, false},
		{"1-2-3", 0, false},
		{"99999999999999999999", 0, false},
		{"1000000-0", 0, false}, // 2,700 years: past time.Duration
	}
	for _, tt := range tests {
		got, err := parseWalltime(tt.in)
		if (err == nil) != tt.ok || got != tt.want {
			t.Errorf("parseWalltime(%q) = %v, %v; want %v, ok %v", tt.in, got, err, tt.want, tt.ok)
		}
	}
}

// TestDurationTOML decodes max_idle the way kiln serve reads serve.toml:
// go-toml, strictly, with the [slurm] table inside the file's struct.
func TestDurationTOML(t *testing.T) {
	tests := []struct {
		in   string
		want time.Duration
		err  string
	}{
		{"max_idle = 120", 120 * time.Second, ""},
		{"max_idle = 1.5", 1500 * time.Millisecond, ""},
		{`max_idle = "2m"`, 2 * time.Minute, ""},
		{`max_idle = "90"`, 90 * time.Second, ""},
		{`max_idle = "1h30m"`, 90 * time.Minute, ""},
		{`max_idle = "soon"`, 0, `"soon": want seconds (120) or a duration such as "2m"`},
		{`max_idle = -3`, 0, "out of range"},
		{`max_idle = true`, 0, "want seconds"},
	}
	for _, tt := range tests {
		var f struct {
			Slurm Config `toml:"slurm"`
		}
		dec := toml.NewDecoder(bytes.NewReader([]byte("[slurm]\npartition = \"debug\"\n" + tt.in + "\n")))
		dec.DisallowUnknownFields()
		err := dec.Decode(&f)
		switch {
		case tt.err == "" && err != nil:
			t.Errorf("decoding %q: %v, want %v", tt.in, err, tt.want)
		case tt.err != "" && (err == nil || !strings.Contains(err.Error(), tt.err)):
			t.Errorf("decoding %q: error %v, want one containing %q", tt.in, err, tt.err)
		case tt.err == "" && f.Slurm.MaxIdle.Duration != tt.want:
			t.Errorf("decoding %q: max_idle = %v, want %v", tt.in, f.Slurm.MaxIdle.Duration, tt.want)
		}
	}
	b, err := toml.Marshal(Config{MaxIdle: Duration{90 * time.Second}})
	if err != nil || !strings.Contains(string(b), "max_idle = '1m30s'") {
		t.Errorf("toml.Marshal(max_idle 90s) = %s, %v; want max_idle = '1m30s'", b, err)
	}
}

func TestBlocksWanted(t *testing.T) {
	tests := []struct {
		min, max, queued, running, slots int
		want                             int
	}{
		{0, 2, 0, 0, 4, 0},
		{1, 2, 0, 0, 4, 1},
		{0, 2, 1, 0, 4, 1},
		{0, 2, 4, 0, 4, 1},
		{0, 2, 5, 0, 4, 2},
		{0, 2, 100, 0, 4, 2},
		{0, 10, 3, 6, 4, 3},
		{0, 10, 3, 0, 0, 3},  // slots 0 counts as 1
		{0, 10, 3, 0, -2, 3}, // and so does a negative
		{0, 0, 3, 0, 1, 1},   // unset max_blocks: 1
		{0, 5, -4, -1, 1, 0},
		{2, 5, 1 << 62, 1 << 62, 1, 5},
	}
	for _, tt := range tests {
		cfg := Config{MinBlocks: tt.min, MaxBlocks: tt.max}
		if got := BlocksWanted(cfg, tt.queued, tt.running, tt.slots); got != tt.want {
			t.Errorf("BlocksWanted(min %d max %d, queued %d, running %d, slots %d) = %d, want %d",
				tt.min, tt.max, tt.queued, tt.running, tt.slots, got, tt.want)
		}
	}
}
