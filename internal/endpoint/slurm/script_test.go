package slurm

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestRenderScript(t *testing.T) {
	worker := []string{"/usr/local/bin/kiln", "worker", "--endpoint", "http://login1:8470", "--token-file", "/st/slurm/token"}
	tests := []struct {
		name   string
		cfg    Config
		params scriptParams
		want   string
	}{
		{
			name:   "defaults",
			cfg:    Config{},
			params: scriptParams{dir: "/st/slurm", worker: worker},
			want: `#!/bin/bash
# kiln's pilot job (a block), written by kiln serve from the [slurm] table of kiln serve's config;
# kiln submits it with sbatch --parsable --export=ALL,KILN_BLOCK_ID=<block>. Edit the config, not this file.
#SBATCH --job-name=kiln-pilot
#SBATCH --output=/st/slurm/pilot-%j.out
#SBATCH --error=/st/slurm/pilot-%j.out
#SBATCH --time=01:00:00
#SBATCH --nodes=1

set -e

# launcher = "srun": one worker on each node of the job; --cpu-bind=none lets it use every CPU
# the job has on its node (it runs its own pool of VMs).
exec srun --ntasks-per-node=1 --cpu-bind=none /usr/local/bin/kiln worker --endpoint http://login1:8470 --token-file /st/slurm/token
`,
		},
		{
			name: "everything",
			cfg: Config{Partition: "debug", Account: "proj1", QOS: "high", Constraint: "cpu&knl", Walltime: "2-00:00:00",
				NodesPerBlock: 4, CPUsPerTask: 16, Mem: "64G", Exclusive: true,
				SchedulerOptions: "  #SBATCH --gres=gpu:1\n#SBATCH --mail-type=END  \n",
				WorkerInit:       "module load qemu\n  export KILN_CACHE=$TMPDIR/kiln  \n\n"},
			params: scriptParams{dir: "/st/slurm", worker: worker, configFile: "/etc/kiln/serve.toml"},
			want: `#!/bin/bash
# kiln's pilot job (a block), written by kiln serve from the [slurm] table of /etc/kiln/serve.toml;
# kiln submits it with sbatch --parsable --export=ALL,KILN_BLOCK_ID=<block>. Edit the config, not this file.
#SBATCH --job-name=kiln-pilot
#SBATCH --output=/st/slurm/pilot-%j.out
#SBATCH --error=/st/slurm/pilot-%j.out
#SBATCH --time=2-00:00:00
#SBATCH --nodes=4
#SBATCH --partition=debug
#SBATCH --account=proj1
#SBATCH --qos=high
#SBATCH --constraint=cpu&knl
#SBATCH --cpus-per-task=16
#SBATCH --mem=64G
#SBATCH --exclusive
# scheduler_options:
#SBATCH --gres=gpu:1
#SBATCH --mail-type=END

set -e

# worker_init:
module load qemu
  export KILN_CACHE=$TMPDIR/kiln

# launcher = "srun": one worker on each node of the job; --cpu-bind=none lets it use every CPU
# the job has on its node (it runs its own pool of VMs).
exec srun --ntasks-per-node=1 --cpus-per-task=16 --cpu-bind=none /usr/local/bin/kiln worker --endpoint http://login1:8470 --token-file /st/slurm/token
`,
		},
		{
			name:   "launcher none, a state directory with a space and a %, arguments to quote",
			cfg:    Config{Launcher: "none", Walltime: "30"},
			params: scriptParams{dir: "/home/a b/100%/slurm", worker: []string{"/opt/kiln dir/kiln", "worker", "--label", "it's", "", "$HOME"}},
			want: `#!/bin/bash
# kiln's pilot job (a block), written by kiln serve from the [slurm] table of kiln serve's config;
# kiln submits it with sbatch --parsable --export=ALL,KILN_BLOCK_ID=<block>. Edit the config, not this file.
#SBATCH --job-name=kiln-pilot
#SBATCH --output="/home/a b/100%%/slurm/pilot-%j.out"
#SBATCH --error="/home/a b/100%%/slurm/pilot-%j.out"
#SBATCH --time=30
#SBATCH --nodes=1

set -e

# launcher = "none": the worker runs in this batch script, on the first node of the job.
exec '/opt/kiln dir/kiln' worker --label 'it'\''s' '' '$HOME'
`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := tt.cfg
			if err := cfg.Validate(); err != nil {
				t.Fatal(err)
			}
			got := renderScript(cfg, tt.params)
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("renderScript(%+v) (-want +got):\n%s", tt.cfg, diff)
			}
			if again := renderScript(cfg, tt.params); again != got {
				t.Errorf("renderScript is not deterministic")
			}
		})
	}
}

// TestShellQuote runs quoted arguments through bash and checks that it
// hands the program the same bytes.
func TestShellQuote(t *testing.T) {
	bash, err := exec.LookPath("bash")
	if err != nil {
		t.Skip("no bash")
	}
	args := []string{"plain", "", " ", "it's", `"double"`, "$HOME", "`id`", "a\nb", "\\", "*", "~", "a=b", "--x=$(id)", "ünïcode", "!", "#not a comment", ";&|<>()", "\t", "'", "''"}
	script := `for a in ` + shellJoin(args) + `; do printf '%s\0' "$a"; done`
	out, err := exec.Command(bash, "--noprofile", "--norc", "-c", script).Output()
	if err != nil {
		t.Fatalf("bash -c %q: %v", script, err)
	}
	got := strings.Split(strings.TrimSuffix(string(out), "\x00"), "\x00")
	if diff := cmp.Diff(args, got); diff != "" {
		t.Errorf("bash read shellJoin(%q) as (-want +got):\n%s", args, diff)
	}
}

func TestNewWritesFiles(t *testing.T) {
	dir := t.TempDir()
	p, err := New(Config{}, Options{StateDir: dir, WorkerCommand: []string{"sleep", "300"}, Token: "s3cret"})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	if want := filepath.Join(dir, "slurm", "pilot.sbatch"); p.Script() != want {
		t.Errorf("Script() = %q, want %q", p.Script(), want)
	}
	for _, f := range []struct {
		path string
		mode os.FileMode
	}{{filepath.Join(dir, "slurm"), os.ModeDir | 0o700}, {TokenFile(dir), 0o600}, {p.Script(), 0o600}} {
		st, err := os.Stat(f.path)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode() != f.mode {
			t.Errorf("mode of %s = %v, want %v", f.path, st.Mode(), f.mode)
		}
	}
	if b, _ := os.ReadFile(TokenFile(dir)); string(b) != "s3cret\n" {
		t.Errorf("token file = %q, want %q", b, "s3cret\n")
	}
	b, _ := os.ReadFile(p.Script())
	if !strings.HasSuffix(string(b), "exec srun --ntasks-per-node=1 --cpu-bind=none sleep 300\n") {
		t.Errorf("pilot script ends %q, want the srun line", b[max(0, len(b)-80):])
	}
	if got := p.Config(); got.MaxBlocks != 1 || got.Walltime != DefaultWalltime {
		t.Errorf("Config() = %+v, want defaults filled", got)
	}
}

func TestNewRejects(t *testing.T) {
	tests := []struct {
		name string
		cfg  Config
		opts Options
		want string
	}{
		{"bad config", Config{MinBlocks: 2}, Options{StateDir: t.TempDir(), WorkerCommand: []string{"x"}}, "min_blocks = 2"},
		{"no state dir", Config{}, Options{WorkerCommand: []string{"x"}}, "no state directory"},
		{"no worker", Config{}, Options{StateDir: t.TempDir()}, "no worker command"},
		{"quote in state dir", Config{}, Options{StateDir: t.TempDir() + `/a"b`, WorkerCommand: []string{"x"}}, "choose another state directory"},
	}
	for _, tt := range tests {
		if _, err := New(tt.cfg, tt.opts); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("New(%s) = %v, want an error containing %q", tt.name, err, tt.want)
		}
	}
}
