package bench

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/kiln-dev/kiln/internal/bench/simfs"
	"github.com/kiln-dev/kiln/internal/guest/task"
	"github.com/kiln-dev/kiln/internal/image"
	"github.com/kiln-dev/kiln/internal/sandbox"
)

// The coldstart job: import numpy, compute a small result, return it.
const (
	jobScript = "import numpy; print(int(numpy.arange(1, 11).prod()))"
	jobSource = "def job():\n    import numpy\n    return int(numpy.arange(1, 11).prod())\n"
	jobWant   = "3628800"
)

// Coldstart rows.
const (
	RowPython    = "python3 process (host, local disk)"
	RowContainer = "container: bwrap over many-files tree on simfs"
	RowCold      = "kiln cold boot, image on simfs"
	RowRestore   = "kiln snapshot restore, image on simfs"
)

type coldRow struct {
	name string
	vm   bool
	run  func(ctx context.Context) error
	secs []float64
	err  error
}

// ColdStart measures the same job (import numpy, compute, return) as a
// plain process, in a container over the many-files tree, as a kiln cold
// boot and as a kiln snapshot restore, with the rows interleaved in one
// run, and reports min, max and mean seconds with ratios to the container.
func ColdStart(ctx context.Context, o Options) (*Report, error) {
	if err := o.defaults(); err != nil {
		return nil, err
	}
	runs := 10
	if o.Quick {
		runs = 2
	}
	if o.Runs > 0 {
		runs = o.Runs
	}
	e, err := prepare(ctx, &o, "numpy")
	if err != nil {
		return nil, err
	}
	sim, err := mountSim(&o, o.Model)
	if err != nil {
		return nil, err
	}
	defer unmountSim(sim, o.Log)
	imgPath := filepath.Join(sim.Mountpoint, e.Image)
	treeRoot := filepath.Join(sim.Mountpoint, e.Tree)
	s, _, _ := Spec("numpy")
	job := &task.Task{Kind: task.KindSource, Source: jobSource, Name: "job"}
	sbOpts := func(mode sandbox.SnapshotMode) sandbox.Options {
		return sandbox.Options{Snapshots: mode, VM: vmConfig(&o), BootTimeout: 10 * time.Minute, Timeout: 5 * time.Minute}
	}
	invoke := func(ctx context.Context, mode sandbox.SnapshotMode, wantRestore bool) error {
		// Each run opens and verifies the image, as kiln run does.
		img, err := image.OpenVerified(imgPath)
		if err != nil {
			return err
		}
		sb, err := sandbox.Start(ctx, img, sbOpts(mode))
		if err != nil {
			return err
		}
		defer sb.Close()
		res, err := sb.Invoke(ctx, job)
		if err != nil {
			return err
		}
		if !res.OK {
			return fmt.Errorf("job failed: %v", res.Error)
		}
		if got := string(res.Value.Data); got != jobWant {
			return fmt.Errorf("job returned %s, want %s", got, jobWant)
		}
		if wantRestore && sb.Restores.Load() == 0 {
			return errors.New("the sandbox cold-booted instead of restoring a snapshot")
		}
		return nil
	}
	checkOut := func(out string) error {
		if strings.TrimSpace(out) != jobWant {
			return fmt.Errorf("job printed %q, want %s", tailStr(out, 300), jobWant)
		}
		return nil
	}
	rows := []*coldRow{
		{name: RowPython, run: func(ctx context.Context) error {
			out, err := runCmd(ctx, "/usr/bin/python3", "-c", jobScript)
			if err != nil {
				return fmt.Errorf("%w (the python3 row needs Debian's python3-numpy on the host)", err)
			}
			return checkOut(out)
		}},
		{name: RowContainer, run: func(ctx context.Context) error {
			out, err := runCmd(ctx, "bwrap", bwrapArgs(treeRoot, s.Env, "python3", "-c", jobScript)...)
			if err != nil {
				return err
			}
			return checkOut(out)
		}},
	}
	if !o.NoVM {
		rows = append(rows,
			&coldRow{name: RowCold, vm: true, run: func(ctx context.Context) error { return invoke(ctx, sandbox.SnapshotOff, false) }},
			&coldRow{name: RowRestore, vm: true, run: func(ctx context.Context) error { return invoke(ctx, sandbox.SnapshotUse, true) }},
		)
		// Create the snapshot (one cold boot and a save) before measuring.
		o.progress("[coldstart] creating the snapshot for the restore row (not measured)")
		if err := invoke(ctx, sandbox.SnapshotAuto, false); err != nil {
			rows[3].err = fmt.Errorf("creating the snapshot: %w", err)
		}
	}
	before := sim.Counts()
	for i := 0; i < runs; i++ {
		for _, r := range rows {
			if r.err != nil {
				continue
			}
			if err := ctx.Err(); err != nil {
				return nil, err
			}
			t0 := time.Now()
			err := r.run(ctx)
			el := time.Since(t0).Seconds()
			if err != nil {
				if ctx.Err() != nil {
					return nil, ctx.Err()
				}
				r.err = err
				o.progress("[coldstart] run %d/%d %-45s FAILED: %v", i+1, runs, r.name, err)
				continue
			}
			r.secs = append(r.secs, el)
			o.progress("[coldstart] run %d/%d %-45s %7.3fs", i+1, runs, r.name, el)
		}
	}
	rep := &Report{
		Name:    "coldstart",
		Title:   "Cold start: import numpy, compute a small result, return it",
		Env:     DetectEnv(o.Accel, o.Quick),
		Models:  []simfs.Params{o.Model},
		Columns: []string{"row", "runs", "min_s", "max_s", "mean_s", "ratio_to_container"},
	}
	var cont float64
	for _, r := range rows {
		if r.name == RowContainer && len(r.secs) > 0 {
			cont = summarize(r.secs).Mean
		}
	}
	for _, r := range rows {
		if len(r.secs) == 0 {
			why := "unavailable"
			if r.err != nil {
				why = "failed: " + strings.ReplaceAll(tailStr(r.err.Error(), 200), "|", "/")
			}
			rep.Rows = append(rep.Rows, []string{r.name, "0", "", "", "", why})
			continue
		}
		st := summarize(r.secs)
		ratio := ""
		if cont > 0 {
			ratio = strconv.FormatFloat(st.Mean/cont, 'f', 2, 64)
		}
		label := r.name
		if r.vm && o.Accel != "kvm" {
			label += " [TCG]"
		}
		rep.Rows = append(rep.Rows, []string{label, strconv.Itoa(st.N), f3(st.Min), f3(st.Max), f3(st.Mean), ratio})
		if r.err != nil {
			rep.Notes = append(rep.Notes, fmt.Sprintf("%s: %d of %d runs failed, the last with: %v", r.name, runs-st.N, runs, r.err))
		}
	}
	d := sim.Counts().Sub(before)
	rep.Notes = append(rep.Notes,
		fmt.Sprintf("Rows were interleaved: each of the %d rounds ran every row once, in table order. Times are wall-clock seconds from starting the process (or sandbox) to having the result; VM rows include opening the image, booting (or restoring) and the agent call.", runs),
		fmt.Sprintf("The simulated filesystem served %d metadata operations and %.1f MB over all rounds (%s).", d.Meta(), float64(d.ReadBytes)/1e6, d))
	if o.Accel != "kvm" {
		rep.Notes = append(rep.Notes, "Rows marked [TCG] ran under QEMU's TCG emulator because this machine has no usable /dev/kvm: the guest kernel and Python execute emulated, roughly 10–15× slower than under KVM, so these rows are penalised against the host rows.")
	}
	if err := rep.write(o.Out); err != nil {
		return nil, err
	}
	pngs, err := plotColdstart(rep, o.Out)
	if err != nil {
		return nil, err
	}
	rep.Files = append(rep.Files, pngs...)
	return rep, nil
}

func shortRow(name string) string {
	switch name {
	case RowPython:
		return "python3 (local)"
	case RowContainer:
		return "bwrap tree (simfs)"
	case RowCold:
		return "kiln cold boot"
	case RowRestore:
		return "kiln restore"
	}
	return name
}
