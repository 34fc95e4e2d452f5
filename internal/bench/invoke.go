package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/kiln-dev/kiln/internal/guest/task"
	"github.com/kiln-dev/kiln/internal/image"
	"github.com/kiln-dev/kiln/internal/sandbox"
	"github.com/kiln-dev/kiln/internal/snapshot"
	"github.com/kiln-dev/kiln/internal/vmm"
)

// The invoke experiment's functions, sent by source to the kiln agent and
// run the same way by the host rows.
const (
	noopSource  = "def f():\n    return None\n"
	numpySource = "def f(n):\n    import numpy as np\n    return float(np.arange(n).sum())\n"
	numpyArg    = 100
	numpyWant   = "4950.0"
	noopScript  = "pass"
	numpyScript = "import numpy as np; float(np.arange(100).sum())"
	// hostWarmCalls is how often the warm host process calls each function.
	hostWarmCalls = 1000
)

// Invoke rows.
const (
	RowWarmNoop  = "kiln warm VM: no-op"
	RowWarmNumpy = "kiln warm VM: float(np.arange(100).sum())"
	RowProcNoop  = "host python3 -c process per call: no-op"
	RowProcNumpy = "host python3 -c process per call: numpy"
	RowHostNoop  = "host warm python3 process: no-op"
	RowHostNumpy = "host warm python3 process: numpy"
	RowColdPSS   = "cold-booted VM PSS"
	RowClonePSS  = "clone PSS"
	RowPSSRatio  = "clone PSS / cold-booted VM PSS"
)

// invokeRow is one measured row of the invoke experiment.
type invokeRow struct {
	name  string
	vm    bool
	every int // measured in every every-th round (0: every round)
	run   func(ctx context.Context) error
	ms    []float64
	err   error
}

// Invoke measures warm invocation latency: a no-op and a small numpy call
// on one warm kiln VM, in a new host python3 process per call and inside
// one warm host python3 process, interleaved; then the memory (PSS) of
// clones restored side by side from one snapshot against a cold-booted VM.
// Runs overrides the calls per kiln row (default 100, 10 with Quick); the
// process rows are sampled every tenth round (2 samples with Quick).
func Invoke(ctx context.Context, o Options) (*Report, error) {
	if err := o.defaults(); err != nil {
		return nil, err
	}
	calls, samples, clones := 100, 10, 10
	if o.Quick {
		calls, samples, clones = 10, 2, 2
	}
	if o.Runs > 0 {
		calls, samples = o.Runs, max(1, o.Runs/10)
	}
	every := max(1, calls/samples)
	noopTask := &task.Task{Kind: task.KindSource, Source: noopSource, Name: "f"}
	numpyTask, err := numpyCall()
	if err != nil {
		return nil, err
	}
	sbOpts := func(mode sandbox.SnapshotMode, st *snapshot.Store) sandbox.Options {
		// Preload numpy whatever the image says, so that the snapshot
		// holds it (the bench spec preloads it too).
		return sandbox.Options{VM: vmConfig(&o), Snapshots: mode, Store: st, Preload: []string{"numpy"}, BootTimeout: 10 * time.Minute, Timeout: 5 * time.Minute}
	}

	var img *image.Image
	var imgErr error
	var warm *sandbox.Sandbox
	if !o.NoVM {
		img, imgErr = invokeImage(ctx, &o)
		if imgErr == nil {
			o.progress("[invoke] starting the warm VM (not measured)")
			t0 := time.Now()
			if warm, imgErr = sandbox.Start(ctx, img, sbOpts(sandbox.SnapshotOff, nil)); imgErr != nil {
				imgErr = fmt.Errorf("starting the warm VM: %w", imgErr)
			} else {
				defer warm.Close()
				o.progress("[invoke] warm VM ready in %.1fs", time.Since(t0).Seconds())
			}
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
	}
	call := func(t *task.Task, want string) func(ctx context.Context) error {
		return func(ctx context.Context) error { return invokeCheck(ctx, warm, t, want) }
	}
	proc := func(script string) func(ctx context.Context) error {
		return func(ctx context.Context) error {
			if _, err := runCmd(ctx, "/usr/bin/python3", "-c", script); err != nil {
				return fmt.Errorf("running a host python3 process: %w (the host rows need Debian's python3-numpy)", err)
			}
			return nil
		}
	}
	var rows []*invokeRow
	if !o.NoVM {
		rows = append(rows,
			&invokeRow{name: RowWarmNoop, vm: true, run: call(noopTask, "null"), err: imgErr},
			&invokeRow{name: RowWarmNumpy, vm: true, run: call(numpyTask, numpyWant), err: imgErr})
	}
	rows = append(rows,
		&invokeRow{name: RowProcNoop, every: every, run: proc(noopScript)},
		&invokeRow{name: RowProcNumpy, every: every, run: proc(numpyScript)})

	// One unmeasured call of every row: the agent has compiled both
	// functions and imported numpy, the host's page cache holds python3
	// and numpy.
	for _, r := range rows {
		if r.err == nil {
			if err := r.run(ctx); err != nil {
				if ctx.Err() != nil {
					return nil, ctx.Err()
				}
				r.err = fmt.Errorf("warming up: %w", err)
			}
		}
	}
	for i := 0; i < calls; i++ {
		var line []string
		for _, r := range rows {
			if r.err != nil || (r.every > 0 && i%r.every != 0) {
				continue
			}
			if err := ctx.Err(); err != nil {
				return nil, err
			}
			t0 := time.Now()
			err := r.run(ctx)
			el := float64(time.Since(t0)) / float64(time.Millisecond)
			if err != nil {
				if ctx.Err() != nil {
					return nil, ctx.Err()
				}
				r.err = err
				o.progress("[invoke] round %d/%d %s FAILED: %v", i+1, calls, r.name, err)
				continue
			}
			r.ms = append(r.ms, el)
			line = append(line, fmt.Sprintf("%s %.1f ms", r.name, el))
		}
		if i%every == 0 || i == calls-1 {
			o.progress("[invoke] round %d/%d: %s", i+1, calls, strings.Join(line, ", "))
		}
	}

	o.progress("[invoke] timing %d calls of each function in one warm host python3 process", hostWarmCalls)
	hostNoop, hostNumpy, hostErr := hostWarm(ctx)
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}

	var mem *cloneMem
	memErr := imgErr
	if !o.NoVM && warm != nil {
		warm.Close() // the clones need the cores
		mem, memErr = measureClones(ctx, &o, img, clones, numpyTask, sbOpts)
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
	}

	rep := &Report{
		Name:    "invoke",
		Title:   "Warm invocation latency and the memory of snapshot clones",
		Env:     DetectEnv(o.Accel, o.Quick),
		Columns: []string{"row", "unit", "n", "min", "p50", "p90", "max", "mean"},
	}
	tcg := func(name string, isVM bool) string {
		if isVM && o.Accel != vmm.KVM {
			return name + " [TCG]"
		}
		return name
	}
	for _, r := range rows {
		if len(r.ms) == 0 {
			rep.Rows = append(rep.Rows, failedRow(tcg(r.name, r.vm), "ms", r.err))
			continue
		}
		rep.Rows = append(rep.Rows, distRow(tcg(r.name, r.vm), "ms", r.ms, sig))
		if r.err != nil {
			rep.Notes = append(rep.Notes, fmt.Sprintf("%s: measured %d times, then failed with: %v", r.name, len(r.ms), r.err))
		}
	}
	for _, h := range []struct {
		name string
		ms   float64
	}{{RowHostNoop, hostNoop}, {RowHostNumpy, hostNumpy}} {
		if hostErr != nil {
			rep.Rows = append(rep.Rows, failedRow(h.name, "ms", hostErr))
			continue
		}
		rep.Rows = append(rep.Rows, []string{h.name, "ms", strconv.Itoa(hostWarmCalls), "", sig(h.ms), "", "", ""})
	}
	if !o.NoVM {
		if mem == nil {
			for _, n := range []struct{ name, unit string }{{RowColdPSS, "MiB"}, {RowClonePSS, "MiB"}, {RowPSSRatio, "ratio"}} {
				rep.Rows = append(rep.Rows, failedRow(tcg(n.name, true), n.unit, memErr))
			}
		} else {
			ratio := make([]float64, len(mem.clones))
			for i, c := range mem.clones {
				ratio[i] = c / mem.cold
			}
			rep.Rows = append(rep.Rows,
				distRow(tcg(RowColdPSS, true), "MiB", []float64{mem.cold}, f1),
				distRow(tcg(RowClonePSS, true), "MiB", mem.clones, f1),
				distRow(tcg(RowPSSRatio, true), "ratio", ratio, f3))
		}
	}
	rep.Notes = append(rep.Notes,
		fmt.Sprintf("Latency rows were interleaved: each of the %d rounds made one call of each kiln row, in table order, and one round in %d (the first, then every %d) also ran the two host process rows. A call is timed by the host's wall clock from sending it to having the checked result. The kiln functions, `def f(): return None` and `def f(n): import numpy as np; return float(np.arange(n).sum())` with n=%d, are sent by source to one warm VM, started once without snapshots, after one unmeasured call of each.", calls, every, every, numpyArg),
		fmt.Sprintf("Process rows start `/usr/bin/python3 -c '%s'` (no-op) and `/usr/bin/python3 -c '%s'` (numpy) per call. Warm host rows: the same two functions called %d times each inside one python3 process after 10 warm-up calls, timed per call with time.perf_counter; the row is the median (p50) only.", noopScript, numpyScript, hostWarmCalls),
		"p50 and p90 interpolate linearly between the sorted samples.")
	if img != nil {
		m := img.Manifest
		rep.Notes = append(rep.Notes, fmt.Sprintf("Image: %s (%s %s root filesystem; guest %d MiB, %d vCPU; the agent preloads numpy).", img.Path, m.Rootfs.Filesystem, m.Rootfs.Compression, m.MemoryMiB, m.VCPUs))
	}
	if !o.NoVM {
		rep.Notes = append(rep.Notes,
			fmt.Sprintf("Memory: one snapshot of the image with numpy preloaded in a private store, then %d clones restored from it and alive side by side, each after serving one `f(%d)` numpy call, and one cold-booted VM (no snapshot) after the same call. PSS is the `Pss:` line of /proc/PID/smaps_rollup of each VMM process, read with all of them running: PSS divides every shared page among the processes mapping it, so a clone's share of the snapshot's RAM file shrinks as clones are added. The ratio row is each clone's PSS over the cold-booted VM's.", clones, numpyArg))
	} else {
		rep.Notes = append(rep.Notes, "--no-vm: the kiln rows and the memory rows were left out.")
	}
	if o.Accel != vmm.KVM && !o.NoVM {
		rep.Notes = append(rep.Notes, "Rows marked [TCG] ran under QEMU's TCG emulator because this machine has no usable /dev/kvm: the guest executes emulated, roughly 10–15× slower than under KVM, so the latency rows are penalised against the host rows, and the VMM's memory includes TCG's own (its translated-code buffer).")
	}
	if err := rep.write(o.Out); err != nil {
		return nil, err
	}
	return rep, nil
}

func numpyCall() (*task.Task, error) {
	args, err := task.JSONValue([]any{numpyArg})
	if err != nil {
		return nil, err
	}
	return &task.Task{Kind: task.KindSource, Source: numpySource, Name: "f", Args: &args}, nil
}

// invokeImage is the bench's numpy image (Options.Images[numpy] when
// given, else the default boot variant's, built on the local disk),
// opened, verified and read once.
func invokeImage(ctx context.Context, o *Options) (*image.Image, error) {
	path := o.Images["numpy"]
	if path == "" {
		var err error
		if path, _, err = localImage(ctx, o, "numpy", BootVariants[0].Name, BootVariants[0].Build); err != nil {
			return nil, fmt.Errorf("building the numpy image: %w", err)
		}
	}
	img, err := openWarm(path)
	if err != nil {
		return nil, fmt.Errorf("opening the numpy image: %w", err)
	}
	return img, nil
}

// invokeCheck makes one call and checks that it returned want (JSON).
func invokeCheck(ctx context.Context, sb *sandbox.Sandbox, t *task.Task, want string) error {
	if sb == nil {
		return errors.New("no warm VM")
	}
	res, err := sb.Invoke(ctx, t)
	if err != nil {
		return fmt.Errorf("invoking %s: %w", t.Name, err)
	}
	if !res.OK {
		return fmt.Errorf("invoking %s: the function failed: %v", t.Name, res.Error)
	}
	if res.Value == nil || string(res.Value.Data) != want {
		got := "no value"
		if res.Value != nil {
			got = string(res.Value.Data)
		}
		return fmt.Errorf("invoking %s: got %s, want %s", t.Name, got, want)
	}
	return nil
}

var hostWarmRe = regexp.MustCompile(`KILN_WARM_(NOOP|NUMPY)_MS=([0-9.eE+-]+)`)

// hostWarm calls both functions in one warm host python3 process and
// returns their median call times in milliseconds.
func hostWarm(ctx context.Context) (noopMS, numpyMS float64, err error) {
	src := func(s string) string { b, _ := json.Marshal(s); return string(b) } // a JSON string is a Python literal
	script := strings.Join([]string{
		"import statistics, time",
		"def load(src):",
		"    ns = {}",
		"    exec(src, ns)",
		"    return ns['f']",
		"def med(f, *a):",
		"    for _ in range(10):",
		"        f(*a)",
		"    ts = []",
		fmt.Sprintf("    for _ in range(%d):", hostWarmCalls),
		"        t = time.perf_counter()",
		"        f(*a)",
		"        ts.append(time.perf_counter() - t)",
		"    return statistics.median(ts) * 1000",
		"print('KILN_WARM_NOOP_MS=%.9f' % med(load(" + src(noopSource) + ")))",
		fmt.Sprintf("print('KILN_WARM_NUMPY_MS=%%.9f' %% med(load(%s), %d))", src(numpySource), numpyArg),
	}, "\n")
	out, err := runCmd(ctx, "/usr/bin/python3", "-c", script)
	if err != nil {
		return 0, 0, fmt.Errorf("running the warm host python3 process: %w", err)
	}
	got := map[string]float64{}
	for _, m := range hostWarmRe.FindAllStringSubmatch(out, -1) {
		v, err := strconv.ParseFloat(m[2], 64)
		if err == nil && v > 0 {
			got[m[1]] = v
		}
	}
	if got["NOOP"] == 0 || got["NUMPY"] == 0 {
		return 0, 0, fmt.Errorf("parsing the warm host python3 process's output: want KILN_WARM_NOOP_MS and KILN_WARM_NUMPY_MS, got %q", tailStr(out, 300))
	}
	return got["NOOP"], got["NUMPY"], nil
}

// cloneMem is the PSS in MiB of clones and of a cold-booted VM.
type cloneMem struct {
	cold   float64
	clones []float64
}

// measureClones creates a snapshot in a private store under o.Work,
// restores n clones side by side, each serving one call, boots one VM cold
// for the same call, and reads every VMM process's PSS.
func measureClones(ctx context.Context, o *Options, img *image.Image, n int, call *task.Task, opts func(sandbox.SnapshotMode, *snapshot.Store) sandbox.Options) (*cloneMem, error) {
	dir, err := os.MkdirTemp(o.Work, "invoke-snapshots-")
	if err != nil {
		return nil, fmt.Errorf("creating the private snapshot store: %w", err)
	}
	defer os.RemoveAll(dir)
	st, err := snapshot.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("opening the private snapshot store: %w", err)
	}
	st.Log = o.Log
	o.progress("[invoke] creating the snapshot for the clones (a cold boot with numpy preloaded and a save; not measured)")
	t0 := time.Now()
	first, err := sandbox.Start(ctx, img, opts(sandbox.SnapshotAuto, st))
	if err != nil {
		return nil, fmt.Errorf("creating the snapshot: %w", err)
	}
	created := first.SnapshotsCreated.Load()
	first.Close()
	if created != 1 {
		return nil, errors.New("creating the snapshot: the sandbox created none (see the log: kiln --log-level debug)")
	}
	o.progress("[invoke] snapshot created in %.1fs", time.Since(t0).Seconds())
	var sbs []*sandbox.Sandbox
	defer func() {
		for _, sb := range sbs {
			sb.Close()
		}
	}()
	start := func(what string, mode sandbox.SnapshotMode, st *snapshot.Store) (*sandbox.Sandbox, error) {
		t0 := time.Now()
		sb, err := sandbox.Start(ctx, img, opts(mode, st))
		if err != nil {
			return nil, fmt.Errorf("starting the %s: %w", what, err)
		}
		sbs = append(sbs, sb)
		if mode == sandbox.SnapshotUse && sb.Restores.Load() == 0 {
			return nil, fmt.Errorf("starting the %s: it cold-booted instead of restoring the snapshot", what)
		}
		if err := invokeCheck(ctx, sb, call, numpyWant); err != nil {
			return nil, fmt.Errorf("calling the %s: %w", what, err)
		}
		o.progress("[invoke] %s started and served one call in %.1fs", what, time.Since(t0).Seconds())
		return sb, nil
	}
	var clones []*sandbox.Sandbox
	for i := 0; i < n; i++ {
		sb, err := start(fmt.Sprintf("clone %d/%d", i+1, n), sandbox.SnapshotUse, st)
		if err != nil {
			return nil, err
		}
		clones = append(clones, sb)
	}
	cold, err := start("cold-booted VM", sandbox.SnapshotOff, nil)
	if err != nil {
		return nil, err
	}
	m := &cloneMem{}
	if m.cold, err = vmPSS(cold); err != nil {
		return nil, err
	}
	for _, c := range clones {
		p, err := vmPSS(c)
		if err != nil {
			return nil, err
		}
		m.clones = append(m.clones, p)
	}
	o.progress("[invoke] PSS: cold-booted VM %.1f MiB, clones %s MiB", m.cold, strings.Join(fmtAll(m.clones, f1), ", "))
	return m, nil
}

// vmPSS returns the PSS of a sandbox's VMM process in MiB.
func vmPSS(sb *sandbox.Sandbox) (float64, error) {
	pid := sb.VMPid()
	if pid == 0 {
		return 0, errors.New("reading the VMM's PSS: the sandbox has no VM")
	}
	kb, err := procKB(fmt.Sprintf("/proc/%d/smaps_rollup", pid), "Pss")
	if err != nil {
		return 0, fmt.Errorf("reading the VMM's PSS: %w", err)
	}
	return float64(kb) / 1024, nil
}

// procKB returns the number of a "Field:   N kB" line of a /proc file.
func procKB(path, field string) (int64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, field+":"); ok {
			if f := strings.Fields(rest); len(f) > 0 {
				if kb, err := strconv.ParseInt(f[0], 10, 64); err == nil {
					return kb, nil
				}
			}
		}
	}
	return 0, fmt.Errorf("no %s line in %s", field, path)
}

// distRow renders samples as row, unit, n, min, p50, p90, max, mean.
func distRow(name, unit string, xs []float64, format func(float64) string) []string {
	s := summarize(xs)
	return []string{name, unit, strconv.Itoa(s.N), format(s.Min), format(quantile(xs, 0.5)), format(quantile(xs, 0.9)), format(s.Max), format(s.Mean)}
}

// failedRow is a row without measurements; the reason is in the last column.
func failedRow(name, unit string, err error) []string {
	why := "unavailable"
	if err != nil {
		why = "failed: " + strings.ReplaceAll(tailStr(err.Error(), 200), "|", "/")
	}
	return []string{name, unit, "0", "", "", "", "", why}
}

func fmtAll(xs []float64, format func(float64) string) []string {
	out := make([]string, len(xs))
	for i, x := range xs {
		out[i] = format(x)
	}
	return out
}

// sig formats a positive number with four significant digits in plain
// decimal notation (12.35, 0.1235, 0.00001235), whole numbers from 10,000.
func sig(x float64) string {
	if x <= 0 || math.IsNaN(x) || math.IsInf(x, 0) {
		return strconv.FormatFloat(x, 'g', 4, 64)
	}
	decimals := max(0, 3-int(math.Floor(math.Log10(x))))
	return strconv.FormatFloat(x, 'f', decimals, 64)
}
