// Package bench runs kiln's reproducible experiments (files, imports, coldstart against a simulated shared filesystem; boot, invoke on the local disk) and writes CSV, Markdown and PNG results.
//
// Every experiment records the machine, the kernel, the QEMU accelerator and
// the filesystem model's parameters, when it uses one, next to its numbers
// (Env). The model is
// package simfs: a FUSE passthrough that adds latency; it is a model of a
// shared filesystem, not one.
package bench

import (
	"context"
	"encoding/csv"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/google/renameio/v2"
	"golang.org/x/sys/unix"

	"github.com/kiln-dev/kiln/internal/bench/simfs"
	"github.com/kiln-dev/kiln/internal/cache"
	"github.com/kiln-dev/kiln/internal/vm"
	"github.com/kiln-dev/kiln/internal/vmm"
)

// Options configure the experiments. The zero value runs the full versions
// with results in the current directory.
type Options struct {
	Out   string // output directory for CSV, Markdown and PNG files ("" = ".")
	Quick bool   // small sizes and few runs: a smoke test of a few minutes
	// Work holds the generated files, staged trees and images, reused
	// between runs ("" = <cache>/bench). It must be on a local disk.
	Work string
	// Init is the kiln-init binary for building images ("" = build.FindInit()).
	Init string
	// Images maps a package (numpy, scipy, torch) to a prebuilt image of
	// its bench spec, used instead of building one.
	Images map[string]string
	// Model is the filesystem model of the container and VM rows of
	// coldstart and the base of the imports sweep (zero: lustre-idle).
	Model simfs.Params
	// Runs overrides the number of runs per cell (0: 10 for coldstart and
	// 3 for imports, 2 and 1 with Quick).
	Runs int
	// Packages overrides the imports experiment's packages.
	Packages []string
	// NoVM leaves out the rows that boot VMs.
	NoVM  bool
	Accel vmm.Accel // "" = detect
	Log   *slog.Logger
	// Progress receives one line per measurement ("" lines are not sent).
	Progress io.Writer
}

func (o *Options) defaults() error {
	if o.Out == "" {
		o.Out = "."
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.Progress == nil {
		o.Progress = io.Discard
	}
	if o.Model.Name == "" {
		o.Model = simfs.Presets["lustre-idle"]
	}
	if o.Accel == "" {
		o.Accel, _ = vmm.DetectAccel()
	}
	if o.Work == "" {
		w, err := cache.Sub("bench")
		if err != nil {
			return err
		}
		o.Work = w
	}
	if err := os.MkdirAll(o.Out, 0o755); err != nil {
		return fmt.Errorf("creating output directory: %w", err)
	}
	return os.MkdirAll(o.Work, 0o755)
}

func (o *Options) progress(format string, args ...any) {
	fmt.Fprintf(o.Progress, "%s  "+format+"\n", append([]any{time.Now().Format("15:04:05")}, args...)...)
}

// Env describes where an experiment ran.
type Env struct {
	Date    string `json:"date"`
	Host    string `json:"host"`
	CPU     string `json:"cpu"`
	CPUs    int    `json:"cpus"`
	MemMiB  int64  `json:"mem_mib"`
	Kernel  string `json:"kernel"`
	Accel   string `json:"accel"`
	QEMU    string `json:"qemu"`
	Python  string `json:"python"`
	Quick   bool   `json:"quick"`
	Command string `json:"command"`
}

// DetectEnv describes this machine.
func DetectEnv(accel vmm.Accel, quick bool) Env {
	e := Env{Date: time.Now().UTC().Format(time.RFC3339), CPUs: runtime.NumCPU(), Accel: string(accel), Quick: quick}
	e.Host, _ = os.Hostname()
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		e.Kernel = unix.ByteSliceToString(u.Release[:]) + " " + unix.ByteSliceToString(u.Machine[:])
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				e.CPU = strings.TrimSpace(v)
				break
			}
		}
	}
	var si unix.Sysinfo_t
	if unix.Sysinfo(&si) == nil {
		e.MemMiB = int64(si.Totalram) * int64(si.Unit) >> 20
	}
	e.QEMU = firstLine(exec.Command("qemu-system-x86_64", "--version"))
	e.Python = firstLine(exec.Command("/usr/bin/python3", "--version"))
	e.Command = strings.Join(os.Args, " ")
	return e
}

func firstLine(cmd *exec.Cmd) string {
	out, err := cmd.Output()
	if err != nil {
		return "unavailable"
	}
	l, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
	return l
}

// markdown renders the environment as a bullet list.
func (e Env) markdown() string {
	accel := e.Accel
	if accel != string(vmm.KVM) {
		accel += " (no usable /dev/kvm: every VM row is emulated, roughly 10–15× slower than under KVM)"
	}
	quick := ""
	if e.Quick {
		quick = "\n- **--quick run**: reduced sizes and runs; a smoke test, not a measurement"
	}
	return fmt.Sprintf("- date: %s, host %s\n- CPU: %s × %d, memory %d MiB\n- kernel: %s\n- QEMU: %s, accelerator **%s**\n- python: %s%s\n",
		e.Date, e.Host, e.CPU, e.CPUs, e.MemMiB, e.Kernel, e.QEMU, accel, e.Python, quick)
}

// Report is one experiment's result table.
type Report struct {
	Name    string         `json:"name"` // file stem: files, imports, coldstart, boot, invoke
	Title   string         `json:"title"`
	Env     Env            `json:"env"`
	Models  []simfs.Params `json:"models"` // every filesystem model the table uses
	Columns []string       `json:"columns"`
	Rows    [][]string     `json:"rows"`
	Notes   []string       `json:"notes"`
	Files   []string       `json:"files"` // written files
}

// write stores the CSV and Markdown files; plots are added by the experiment.
func (r *Report) write(dir string) error {
	csvPath := filepath.Join(dir, r.Name+".csv")
	var b strings.Builder
	w := csv.NewWriter(&b)
	w.Write(r.Columns)
	w.WriteAll(r.Rows)
	if err := w.Error(); err != nil {
		return fmt.Errorf("writing %s: %w", csvPath, err)
	}
	if err := writeAtomic(csvPath, []byte(b.String())); err != nil {
		return err
	}
	mdPath := filepath.Join(dir, r.Name+".md")
	if err := writeAtomic(mdPath, []byte(r.Markdown())); err != nil {
		return err
	}
	r.Files = append(r.Files, csvPath, mdPath)
	return nil
}

// Table renders just the result table as Markdown.
func (r *Report) Table() string {
	var b strings.Builder
	b.WriteString("| " + strings.Join(r.Columns, " | ") + " |\n|")
	for range r.Columns {
		b.WriteString("---|")
	}
	b.WriteString("\n")
	for _, row := range r.Rows {
		b.WriteString("| " + strings.Join(row, " | ") + " |\n")
	}
	return b.String()
}

// Markdown renders the whole report: title, table, notes, models, environment.
func (r *Report) Markdown() string {
	var b strings.Builder
	fmt.Fprintf(&b, "## %s\n\n%s\n", r.Title, r.Table())
	for _, n := range r.Notes {
		fmt.Fprintf(&b, "\n%s\n", n)
	}
	if len(r.Models) > 0 {
		b.WriteString("\nFilesystem model (simulated, see docs/benchmarks.md; kernel entry/attr/negative timeouts 0):\n\n")
		for _, m := range r.Models {
			fmt.Fprintf(&b, "- `%s`\n", m)
		}
	}
	fmt.Fprintf(&b, "\nEnvironment:\n\n%s", r.Env.markdown())
	return b.String()
}

func writeAtomic(path string, data []byte) error {
	if err := renameio.WriteFile(path, data, 0o644, renameio.WithTempDir(filepath.Dir(path)), renameio.WithStaticPermissions(0o644)); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	return nil
}

// Experiments lists the experiments in the order All runs them.
var Experiments = []string{"files", "imports", "coldstart", "boot", "invoke"}

// vmOnly are the experiments whose every row boots a VM: All leaves them
// out with NoVM.
var vmOnly = map[string]bool{"boot": true}

func errNoVM(name string) error {
	return fmt.Errorf("the %s experiment only boots VMs: run it without --no-vm", name)
}

// Run runs one experiment by name.
func Run(ctx context.Context, name string, o Options) (*Report, error) {
	switch name {
	case "files":
		return Files(ctx, o)
	case "imports":
		return Imports(ctx, o)
	case "coldstart":
		return ColdStart(ctx, o)
	case "boot":
		return Boot(ctx, o)
	case "invoke":
		return Invoke(ctx, o)
	}
	return nil, fmt.Errorf("unknown experiment %q: want %s or all", name, strings.Join(Experiments, ", "))
}

// All runs every experiment; a failed experiment does not stop the others,
// and its error is returned joined with the rest.
func All(ctx context.Context, o Options) ([]*Report, error) {
	var reps []*Report
	var errs []error
	for _, n := range Experiments {
		if o.NoVM && vmOnly[n] {
			if o.Progress != nil {
				o.progress("[%s] skipped: every row boots a VM (--no-vm)", n)
			}
			continue
		}
		r, err := Run(ctx, n, o)
		if err != nil {
			if ctx.Err() != nil {
				return reps, ctx.Err()
			}
			errs = append(errs, fmt.Errorf("%s: %w", n, err))
			continue
		}
		reps = append(reps, r)
	}
	return reps, joinErrs(errs)
}

func joinErrs(errs []error) error {
	if len(errs) == 0 {
		return nil
	}
	msgs := make([]string, len(errs))
	for i, e := range errs {
		msgs[i] = e.Error()
	}
	return fmt.Errorf("%d experiment(s) failed: %s", len(errs), strings.Join(msgs, "; "))
}

// mountSim mounts the model over o.Work/sim at a fresh mountpoint.
func mountSim(o *Options, p simfs.Params) (*simfs.FS, error) {
	backing := filepath.Join(o.Work, "sim")
	if err := os.MkdirAll(backing, 0o755); err != nil {
		return nil, err
	}
	mnt, err := os.MkdirTemp("", "kiln-bench-mnt-")
	if err != nil {
		return nil, err
	}
	f, err := simfs.Mount(backing, mnt, p, o.Log)
	if err != nil {
		os.Remove(mnt)
		return nil, err
	}
	return f, nil
}

// unmountSim unmounts and removes the mountpoint.
func unmountSim(f *simfs.FS, log *slog.Logger) {
	if err := f.Unmount(); err != nil {
		log.Warn("unmounting the simulated filesystem", "error", err)
		return
	}
	os.Remove(f.Mountpoint)
}

// stats summarizes repeated measurements in seconds.
type stats struct {
	N              int
	Min, Max, Mean float64
}

func summarize(xs []float64) stats {
	if len(xs) == 0 {
		return stats{}
	}
	s := stats{N: len(xs), Min: xs[0], Max: xs[0]}
	var sum float64
	for _, x := range xs {
		sum += x
		s.Min = min(s.Min, x)
		s.Max = max(s.Max, x)
	}
	s.Mean = sum / float64(len(xs))
	return s
}

// quantile returns the q-quantile (0 ≤ q ≤ 1) of xs, interpolating
// linearly between the sorted samples; 0 for no samples.
func quantile(xs []float64, q float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	pos := q * float64(len(s)-1)
	i := int(pos)
	if i >= len(s)-1 {
		return s[len(s)-1]
	}
	return s[i] + (pos-float64(i))*(s[i+1]-s[i])
}

func median(xs []float64) float64 { return quantile(xs, 0.5) }

func vmConfig(o *Options) vm.Config {
	return vm.Config{Accel: o.Accel, Log: o.Log}
}

// Clean removes the experiments' cached trees, images and test files from
// work ("" = <cache>/bench) and returns the directory and the bytes freed.
// It refuses while the shared-filesystem model is mounted there.
func Clean(work string) (dir string, freed int64, err error) {
	o := Options{Work: work, Out: os.TempDir()}
	if err := o.defaults(); err != nil {
		return "", 0, err
	}
	mounts, err := os.ReadFile("/proc/self/mounts")
	if err == nil && strings.Contains(string(mounts), " "+o.Work+"/") {
		return o.Work, 0, fmt.Errorf("a filesystem is mounted under %s (a kiln bench run?): let it finish, or unmount it, and clean again", o.Work)
	}
	ents, err := os.ReadDir(o.Work)
	if err != nil {
		return o.Work, 0, fmt.Errorf("cleaning %s: %w", o.Work, err)
	}
	for _, e := range ents {
		p := filepath.Join(o.Work, e.Name())
		_ = filepath.WalkDir(p, func(_ string, d fs.DirEntry, err error) error {
			if err == nil && d.Type().IsRegular() {
				if fi, err := d.Info(); err == nil {
					freed += fi.Size()
				}
			}
			return nil
		})
		if err := os.RemoveAll(p); err != nil {
			return o.Work, freed, fmt.Errorf("cleaning %s: %w", o.Work, err)
		}
	}
	return o.Work, freed, nil
}
